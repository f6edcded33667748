"""The plain sampling loop: the reference UNet call and the reference reverse step, noise from a CPU generator."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..reference import functional
from .checks import NOISE_MODES, model_forward, randn_images


def reference_loop(model, x_T: torch.Tensor, timesteps: torch.Tensor, coeffs: torch.Tensor,
                   generator=None, clip: Optional[Tuple[float, float]] = None,
                   dtype: torch.dtype = torch.float32, progress: bool = True, noise: str = "generator",
                   seed: Optional[int] = None, image_offset: int = 0, model_batch: Optional[int] = None
                   ) -> torch.Tensor:
    """The plain sampling loop: x_T (float32, on the device) -> x_0 (float32).

    timesteps: CPU int64 [S] (descending); coeffs: float32 [S, 6] on x_T's device; noise "generator":
    one z per step from the CPU `generator` (or list of per-image generators); "philox": z =
    philox_normal keyed by (seed, step, image_offset + image, element), the fast kernel's stream.
    model_batch: see sampling.checks.model_forward. The caller sets eval mode and inference mode. The fast loop
    (sampling.fast_loop) takes the same arguments.
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    if noise == "philox" and seed is None:
        raise ValueError("noise='philox' needs a seed")
    device = x_T.device
    x = x_T.to(torch.float32)
    b = x.shape[0]
    coeffs = coeffs.to(device)
    rows = torch.arange(len(timesteps), device=device)  # row indices live on the device: no host sync
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=not progress, desc="sampling", unit="step")):
        t_batch = torch.full((b,), t, dtype=torch.long, device=device)
        eps = model_forward(model, x.to(dtype), t_batch, model_batch, check=i == 0).to(torch.float32)
        if noise == "philox":  # z drawn inside the step, keyed by row i as the fused kernel keys it
            x = functional.reverse_step(x, eps, rows[i], coeffs, seed=seed, clip=clip, image_offset=image_offset)
        else:
            z = randn_images(x.shape, generator).to(device)
            x = functional.reverse_step(x, eps, rows[i], coeffs, noise=z, clip=clip)
    return x
