"""The plain sampling loop: the reference UNet call and the reference reverse step, noise from a CPU generator."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..reference import functional
from .checks import check_model_output


def reference_loop(model, x_T: torch.Tensor, timesteps: torch.Tensor, coeffs: torch.Tensor,
                   generator: torch.Generator, clip: Optional[Tuple[float, float]] = None,
                   dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
    """x_T (float32, on the device) -> x_0 (float32).

    timesteps: CPU int64 [S] (descending); coeffs: float32 [S, 6] on x_T's device; noise drawn from the
    CPU `generator`, one z of x_T's shape per step, in step order. The caller sets eval mode and
    inference mode (sampling.checks.prepared).
    """
    device = x_T.device
    x = x_T.to(torch.float32)
    b = x.shape[0]
    coeffs = coeffs.to(device)
    rows = torch.arange(len(timesteps), device=device)  # row indices live on the device: no host sync
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=not progress, desc="sampling", unit="step")):
        t_batch = torch.full((b,), t, dtype=torch.long, device=device)
        eps = model(x.to(dtype), t_batch)
        if i == 0:
            check_model_output(eps, x)
        eps = eps.to(torch.float32)
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
        x = functional.reverse_step(x, eps, rows[i], coeffs, noise=z, clip=clip)
    return x
