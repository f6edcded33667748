"""What both sampling loops share: the sampler names and defaults, the model-output check, and the
one place that decides how the caller's model is run (eval mode, dtype, device, layout, copy or not)."""
from __future__ import annotations

import copy
import numbers
from contextlib import contextmanager
from typing import Optional, Tuple

import torch


SAMPLERS = ("ddpm", "ddim")
NOISE_MODES = ("generator", "philox")
OUTPUT_TYPES = ("pil", "np", "pt")
BACKENDS = ("reference", "fast")
DEFAULT_DDIM_STEPS = 50  # diffusers' DDIMPipeline default
DEFAULT_VARIANT = "labml"  # the DDPM variance; DDIM has its own (eta), so any other variant is refused there


def check_model_output(eps, x: torch.Tensor) -> None:
    """The model's output on the first step must be a floating tensor of x_t's shape (shared by both loops).

    Checked once, on metadata only (no host sync): the reverse step would broadcast an eps of shape
    [B, 1, H, W] over 3 channels and return plausible-looking images of a model that does not fit.
    """
    if not isinstance(eps, torch.Tensor) or not eps.is_floating_point():
        what = f"a {eps.dtype} tensor" if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ValueError(f"the model must return eps as a floating tensor of x_t's shape {tuple(x.shape)}, "
                         f"got {what}")
    if eps.shape != x.shape:
        raise ValueError(f"the model returned eps of shape {tuple(eps.shape)} for x_t of shape {tuple(x.shape)}; "
                         "it must predict the noise of x_t, of the same shape (does config describe the model?)")


def module_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def module_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def prepared(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, channels_last: bool = False):
    """The module to sample with: `model` itself, or a converted copy when its dtype, device or layout
    differ (the caller's weights are never cast in place), in eval mode; training flags are restored
    afterwards. Both loops come through here, so they agree on what happens to the caller's model.

    Only the modules that are in training mode are switched, and only those back: eval() and train()
    walk every module (~0.4 ms for the tiny UNet, more than 1% of a short CPU run).
    """
    p = next(model.parameters(), None)  # None: a module without parameters, nothing to convert
    if channels_last or (p is not None and (p.dtype != dtype or p.device != device)):
        # Outside inference mode even when the caller samples inside it: parameters made there would be
        # inference tensors, which have no version counter for the time table's staleness check. Conv
        # weights in NHWC make the convolutions write NHWC activations, which every later op keeps.
        fmt = torch.channels_last if channels_last else torch.preserve_format
        with torch.inference_mode(False):
            model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=fmt)
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True


def image_hw(ucfg, image_size) -> Tuple[int, int]:
    """(H, W) to sample at: the config's size, or `image_size` (int or (H, W)) if it fits the UNet (ucfg: a
    UNetConfig or DDPMUNetConfig)."""
    if image_size is None:
        return ucfg.image_size, ucfg.image_size
    hw = (image_size, image_size) if isinstance(image_size, numbers.Integral) else tuple(image_size)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in hw):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    down = ucfg.downsample_factor
    if hw[0] % down or hw[1] % down:
        raise ValueError(f"image_size {hw} does not fit the model: H and W must be divisible by {down} "
                         f"({down.bit_length()} resolutions)")
    return int(hw[0]), int(hw[1])


def model_forward(model, x: torch.Tensor, t: torch.Tensor, model_batch: Optional[int], check: bool = False
                  ) -> torch.Tensor:
    """eps = model(x, t), on the whole batch (model_batch None) or on chunks of exactly model_batch images,
    the last padded with copies of its last image (each image's result depends on its own row only, so
    the padding is computed and dropped). check: check_model_output on the first chunk."""
    if model_batch is None or x.shape[0] == model_batch:
        eps = model(x, t)
        if check:
            check_model_output(eps, x)
        return eps
    outs = []
    for start in range(0, x.shape[0], model_batch):
        xc, tc = x[start:start + model_batch], t[start:start + model_batch]
        n = xc.shape[0]
        if n < model_batch:
            xc = torch.cat([xc, xc[-1:].expand(model_batch - n, *xc.shape[1:])])
            tc = torch.cat([tc, tc[-1:].expand(model_batch - n)])
        eps = model(xc, tc)
        if check and start == 0:
            check_model_output(eps, xc)
        outs.append(eps[:n])
    return torch.cat(outs)


def randn_images(shape, generator) -> torch.Tensor:
    """float32 N(0, I) of `shape` on the CPU from one generator, or from a list of shape[0] generators
    (image k from generator k: each image's noise is independent of its batch)."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
