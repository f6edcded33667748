"""Sampling: the DDPM/DDIM loop, argument checking, output conversion, and image-grid helpers.

The loop is table driven. `Schedule.ddpm_coeffs / ddpm_coeffs_clipped / ddim_coeffs` turn the
sampler choice (DDPM variant, DDIM eta, strided timesteps, x0 clipping) into one [S, 6] row of
coefficients per step, and every step is the same two calls:
    eps = model(x_t, t);  x_{t-1} = reverse_step(x_t, eps, i, coeffs, noise=z)
so the reference loop here and the fast loop (ddpm_fast.fast_sampler) differ only in how they run
those two calls, never in the math.

Random numbers (the contract both loops follow), by `noise` mode:
- "generator": a CPU torch.Generator draws x_T first, then one z ~ N(0, I) of x_T's shape per step, in
  step order, whether or not that step's sigma is zero. All of it is drawn on the CPU and moved to the
  device, so a seed gives the same images on any device (up to the model's floating-point differences
  between devices). A list of generators (diffusers' convention) gives each image its own: image k's
  x_T and z come from generator k alone, so an image does not depend on the others in its batch.
- "philox": x_T and every step's z come from the counter-based Philox generator of
  `reference.functional.philox_normal`, keyed by (seed, step, global image index, element), x_T on a
  stream of its own. Image i of a run is the same whatever batch it is drawn in (`image_offset` = the
  batch's first image), and the fast backend draws the very same z inside its fused step, so the two
  backends give the same images up to float32 rounding.
- default (None): "generator" on the reference backend; on the fast backend x_T from the generator and
  the steps' z from in-kernel Philox with a seed drawn from the generator (as before this option).
"""
from __future__ import annotations

import copy
import io
import math
import numbers
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .atomic import write_atomic
from .config import DiffusionConfig, ModelConfig, UNetConfig
from .devices import parse_device
from .reference import functional
from .reference.diffusion import DDPM_VARIANTS, Schedule

__all__ = ["sample", "reference_loop", "make_grid", "save_image_atomic", "image_format_for_path", "image_mode",
           "SAMPLERS", "NOISE_MODES", "OUTPUT_TYPES", "BACKENDS", "DDPM_VARIANTS", "DEFAULT_VARIANT",
           "DEFAULT_DDIM_STEPS", "model_forward", "randn_images"]

SAMPLERS = ("ddpm", "ddim")
NOISE_MODES = ("generator", "philox")
OUTPUT_TYPES = ("pil", "np", "pt")
BACKENDS = ("reference", "fast")
DEFAULT_DDIM_STEPS = 50  # diffusers' DDIMPipeline default
DEFAULT_VARIANT = "labml"  # the DDPM variance; DDIM has its own (eta), so any other variant is refused there
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def sample(model_or_checkpoint, batch_size: int = 16, num_inference_steps: Optional[int] = None,
           sampler: str = "ddpm", eta: float = 0.0, generator: Optional[torch.Generator] = None,
           output_type: str = "pil", progress: bool = True, device=None, dtype=None,
           backend: str = "reference", variant: str = DEFAULT_VARIANT, clip_x0: bool = False,
           config: Optional[ModelConfig] = None, image_size: Union[int, Tuple[int, int], None] = None,
           channels_last: bool = False, noise: Optional[str] = None, seed: Optional[int] = None,
           image_offset: int = 0, model_batch: Optional[int] = None):
    """Draw `batch_size` images from a DDPM model.

    model_or_checkpoint: a UNet (any nn.Module mapping (x [B, C, H, W], t [B] int64) -> eps), or
        anything `load_checkpoint` reads: a model file, a training checkpoint (its EMA weights) or a
        run folder.
    config: the ModelConfig of a module (default: ModelConfig(unet=model.config) with the default
        DiffusionConfig, i.e. data range [-1, 1] and T = 1000: pass the config a loader returned, e.g.
        labml's [0, 1]); must be None for a checkpoint, which carries its own.
    num_inference_steps: S sampler steps, strided over the schedule by Schedule.timesteps(S);
        default T (all steps) for "ddpm", 50 for "ddim".
    sampler: "ddpm" (ancestral; `variant` "labml" = noise at every step as labml does, "paper" = no
        noise at the last step, "posterior" = posterior variance beta_tilde) or "ddim" (`eta` in [0, 1];
        eta must be 0 for "ddpm", and variant must stay "labml" for "ddim").
    clip_x0: clamp the predicted x0 to config.diffusion.data_range at every step.
    generator: a CPU torch.Generator (default: a fresh one seeded from torch's global RNG), or a list
        of batch_size of them, one per image (noise "generator" only).
    noise: "generator", "philox" or None (the backend's default): see the module docstring.
    seed: noise="philox" only: the Philox key, an int in [0, 2^64) (default: drawn from `generator`).
    image_offset: noise="philox" only: the global index of this batch's first image in a larger run, so
        that image_offset + k gets the noise of image k of a one-batch run (see ddpm_fast.runs).
    model_batch: run the model on chunks of exactly this many images (the last one padded) instead of
        the whole batch at once. Convolution and GEMM libraries pick their algorithm, hence their
        summation order, by shape, so an image's bits depend on the batch it is computed in; with a
        fixed model_batch they do not (same device, dtype and thread count).
    device: "cpu" or "cuda[:i]" (default: the module's device; for a checkpoint CUDA when available). A
        module is moved there in place (nn.Module.to), after every argument has been checked; if sampling
        then fails, it is moved back.
    dtype: the model's compute dtype (default: the module's parameter dtype; float32 for a checkpoint);
        x_t stays float32. A module in another dtype is run through a converted copy.
    backend: "reference" (this file's loop) or "fast" (ddpm_fast.fast_sampler).
    channels_last: backend="fast" only: run the UNet's activations in NHWC (see fast_loop).
    image_size: sample at another size than config.unet.image_size (int or (H, W)); the UNet is
        convolutional, but H and W must be divisible by its total downsampling factor.
    output_type: "pil" (list of PIL images; grayscale for 1 channel), "np" (float32 [B, H, W, C] in
        [0, 1], diffusers' convention) or "pt" (float32 CPU tensor [B, C, H, W] in [0, 1]).
    The model runs in eval mode under torch.inference_mode; its training flags are restored afterwards.
    Raises ValueError if the model's output is not a tensor of x_t's shape, or if x_0 is not finite.
    """
    # -- cheap argument checks first, before anything is loaded --------------------------------
    batch_size = _check_int("batch_size", batch_size, low=1)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if variant not in DDPM_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {DDPM_VARIANTS}")
    if sampler == "ddim" and variant != DEFAULT_VARIANT:
        raise ValueError(f"variant={variant!r} only applies to sampler='ddpm' (DDIM's noise is set by eta); "
                         "use sampler='ddpm' or leave variant at its default")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if channels_last and backend != "fast":
        raise ValueError("channels_last=True applies to backend='fast' only")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    eta = float(eta)
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError(f"eta={eta} only applies to sampler='ddim' (DDPM is DDIM with eta=1 and its own "
                         "variance); use sampler='ddim' or eta=0")
    if not isinstance(clip_x0, bool):
        raise ValueError(f"clip_x0 must be a bool, got {clip_x0!r}")
    if num_inference_steps is not None:
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, low=1)
    if model_batch is not None:
        model_batch = _check_int("model_batch", model_batch, low=1)
    generator = _check_generator(generator, batch_size)
    noise, seed, image_offset = _check_noise(noise, seed, image_offset, generator, backend)
    run_dtype = _parse_dtype(dtype) if dtype is not None else None
    dev = parse_device(device) if device is not None else None

    # -- the model and its config -------------------------------------------------------------
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        if config is not None:
            raise ValueError("config must be None when sampling from a checkpoint (it carries its own config)")
        from .checkpoint import load_checkpoint  # late: checkpoint imports safetensors
        if dev is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, config = load_checkpoint(model_or_checkpoint, device=dev, dtype=run_dtype or torch.float32)
    elif isinstance(model_or_checkpoint, torch.nn.Module):
        model = model_or_checkpoint
        model_cfg = getattr(model, "config", None)
        if config is None:
            if not isinstance(model_cfg, UNetConfig):
                raise ValueError("the model has no UNetConfig in .config; pass config=ModelConfig(...)")
            config = ModelConfig(unet=model_cfg, diffusion=DiffusionConfig())
        elif not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        elif isinstance(model_cfg, UNetConfig) and model_cfg != config.unet:
            diff = [f"{k}: model {getattr(model_cfg, k)!r} vs config {getattr(config.unet, k)!r}"
                    for k in model_cfg.to_dict() if getattr(model_cfg, k) != getattr(config.unet, k)]
            raise ValueError("config.unet does not describe this model (" + "; ".join(diff) + ")")
        if dev is None:
            # A model on `meta` (no data) or another unsupported device is refused here, not deep in the loop.
            dev = parse_device(_module_device(model), what="the model's device")
    else:
        raise ValueError("model_or_checkpoint must be an nn.Module or a checkpoint path, got "
                         f"{type(model_or_checkpoint).__name__}")
    if run_dtype is None:
        run_dtype = _module_dtype(model)
    if run_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {run_dtype}")

    ucfg = config.unet
    height, width = _image_hw(ucfg, image_size)
    schedule = Schedule(config.diffusion)
    n_steps = num_inference_steps
    if n_steps is None:
        n_steps = schedule.n_steps if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, schedule.n_steps)
    if n_steps > schedule.n_steps:
        raise ValueError(f"num_inference_steps={n_steps} exceeds the schedule's T={schedule.n_steps}")
    timesteps = schedule.timesteps(n_steps)
    clip = config.diffusion.data_range if clip_x0 else None
    if sampler == "ddim":
        coeffs = schedule.ddim_coeffs(timesteps, eta)
    elif clip_x0:
        coeffs = schedule.ddpm_coeffs_clipped(timesteps, variant)
    else:
        coeffs = schedule.ddpm_coeffs(timesteps, variant)

    loop, loop_kwargs = reference_loop, {}
    if backend == "fast":
        try:
            from .fast_sampler import fast_loop
        except ImportError as e:
            raise RuntimeError(f"backend='fast' is not available: ddpm_fast.fast_sampler cannot be imported "
                               f"({e}); use backend='reference'") from e
        # The fast loop precomputes a time table over the schedule's T steps.
        loop, loop_kwargs = fast_loop, {"n_steps": schedule.n_steps, "channels_last": bool(channels_last)}
    loop_kwargs["model_batch"] = model_batch

    # The initial noise is drawn before anything else from the generator (see the module docstring).
    shape = (batch_size, ucfg.image_channels, height, width)
    if noise == "philox":
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        x_T = functional.philox_normal(shape, seed, 0, device=dev, image_offset=image_offset,
                                       stream=functional.STREAM_X_T)
        loop_kwargs.update(noise="philox", seed=seed, image_offset=image_offset)
    else:
        x_T = randn_images(shape, generator).to(dev)
        # noise None (the fast backend's default): its loop draws a Philox seed from the generator.
        loop_kwargs.update(noise=noise or "philox")
    home = _module_device(model)
    try:
        if home != dev:
            model.to(dev)  # only now that every argument has been checked
        x0 = _run_loop(loop, model, x_T, timesteps, coeffs.to(dev), generator=generator, clip=clip,
                       dtype=run_dtype, progress=progress, backend=backend, **loop_kwargs)
        # One host sync for the whole run: a diverged sample (a broken checkpoint, an fp16 overflow) would
        # otherwise come back as a clamped black or white image that looks like a result.
        if not bool(torch.isfinite(x0).all()):
            bad = int((~torch.isfinite(x0)).sum())
            raise ValueError(f"sampling diverged: {bad} of {x0.numel()} values of x_0 are NaN or Inf (check the "
                             f"model's weights and its diffusion config; dtype was {run_dtype})")
    except BaseException:
        if home != dev:
            model.to(home)  # an error (or Ctrl-C) leaves the caller's model where it was
        raise

    lo, hi = config.diffusion.data_range
    # clone() outside inference mode gives the caller an ordinary tensor (usable with autograd later).
    images = ((x0.to(torch.float32).cpu().clone() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    if output_type == "pt":
        return images.contiguous()
    if output_type == "np":
        return images.permute(0, 2, 3, 1).contiguous().numpy()
    return [_pil_from_hwc(a) for a in _to_uint8_hwc(images)]


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


def _check_generator(generator, batch_size: int):
    if generator is None:
        # Seeded from the global RNG so torch.manual_seed(k) makes a default call reproducible.
        return torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ()).item()))
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}")
        if g.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (device-independent noise), got one on "
                             f"{g.device}")
    if isinstance(generator, (list, tuple)):
        if len(gens) != batch_size:
            raise ValueError(f"a list of generators needs one per image: got {len(gens)} for batch_size={batch_size}")
        return gens
    return generator


def _check_noise(noise, seed, image_offset, generator, backend):
    """(noise mode, seed, image_offset) checked; the mode is None only for the fast backend's default."""
    if noise is not None and noise not in NOISE_MODES:
        raise ValueError(f"unknown noise {noise!r}; choose one of {NOISE_MODES} (or None for the backend's default)")
    if noise is None and (backend == "reference" or isinstance(generator, list)):
        noise = "generator"
    if noise != "philox":
        if seed is not None:
            raise ValueError("seed applies to noise='philox' only (the generator seeds the other modes)")
        if image_offset != 0:
            raise ValueError("image_offset applies to noise='philox' only")
        return noise, None, 0
    if isinstance(generator, list):
        raise ValueError("noise='philox' takes one generator (to draw its seed) or seed=, not a list of generators")
    if seed is not None:
        seed = _check_int("seed", seed, low=0)
        if seed >= 2 ** 64:
            raise ValueError(f"seed must be below 2^64, got {seed}")
    return noise, seed, _check_int("image_offset", image_offset, low=0)


def _run_loop(loop, model, x_T, timesteps, coeffs, *, dtype, backend, **kwargs) -> torch.Tensor:
    """`loop` on `model` in eval mode under inference mode, in `dtype`; training flags restored afterwards."""
    run_model = model
    if _module_dtype(model) != dtype and backend != "fast":
        # Never cast the caller's weights in place. The fast loop converts a copy itself, keyed on the
        # caller's model, so that its kept CUDA graph (and that copy) serve the next call too.
        run_model = copy.deepcopy(model).to(dtype)
    flags = [(m, m.training) for m in run_model.modules()]
    run_model.eval()
    try:
        with torch.inference_mode():
            return loop(run_model, x_T, timesteps, coeffs, dtype=dtype, **kwargs)
    finally:
        for m, was_training in flags:
            m.training = was_training


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


def reference_loop(model, x_T: torch.Tensor, timesteps: torch.Tensor, coeffs: torch.Tensor,
                   generator=None, clip: Optional[Tuple[float, float]] = None,
                   dtype: torch.dtype = torch.float32, progress: bool = True, noise: str = "generator",
                   seed: Optional[int] = None, image_offset: int = 0, model_batch: Optional[int] = None
                   ) -> torch.Tensor:
    """The plain sampling loop: x_T (float32, on the device) -> x_0 (float32).

    timesteps: CPU int64 [S] (descending); coeffs: float32 [S, 6] on x_T's device; noise "generator":
    one z per step from the CPU `generator` (or list of per-image generators); "philox": z =
    philox_normal keyed by (seed, step, image_offset + image, element), the fast kernel's stream.
    model_batch: see model_forward. The caller sets eval mode and inference mode. Same signature as
    ddpm_fast.fast_sampler.fast_loop.
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


# --------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------

def make_grid(images, nrow: Optional[int] = None, padding: int = 2) -> Image.Image:
    """Tile images into one PIL image, `nrow` images per row (default ceil(sqrt(n))), with `padding`
    black pixels between and around them (torchvision's layout).

    images: a list of PIL images of one size, a tensor [B, C, H, W] or an array [B, H, W, C] with
    values in [0, 1] (C = 1 or 3). Grayscale in gives grayscale out.
    """
    arr = _images_to_uint8(images)
    n, h, w, c = arr.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    nrow = _check_int("nrow", nrow, low=1)
    padding = _check_int("padding", padding, low=0)
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = arr[k]
    return _pil_from_hwc(grid)


def image_format_for_path(path, mode: Optional[str] = None) -> str:
    """PIL's format name for `path`'s extension, after checking its directory is writable and, given a
    PIL `mode` ("RGB", "L": see `image_mode`), that PIL can write an image of that mode in that format.

    Raises ValueError naming the problem (unknown extension, a format PIL cannot write in that mode,
    missing or unwritable directory), so a caller can refuse bad output paths before doing any work.
    """
    path = Path(path)
    Image.init()
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write {path}: unknown image extension {ext or '(none)'!r} "
                         "(use .png, .jpg, .bmp, ...)")
    if mode is not None:
        # A trial save of one pixel: PIL registers savers it cannot run (HDF5, GRIB, BUFR, WMF without a
        # handler) and savers for a few modes only (XBM, MSP, Palm, BLP; QOI has no grayscale), and
        # finding out only when the real image is saved would waste the whole sampling run.
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot write {path}: PIL cannot save {mode} images as {fmt} ({e}); "
                             "use .png, .jpg, .bmp, ...") from None
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    return fmt


def image_mode(channels: int) -> str:
    """The PIL mode of an image with `channels` channels, as sample(output_type="pil") makes them
    (make_grid takes 1 or 3 channels only)."""
    if channels not in _IMAGE_MODES:
        raise ValueError(f"cannot make a PIL image with {channels} channels (need 1, 3 or 4)")
    return _IMAGE_MODES[channels]


def save_image_atomic(image: Image.Image, path) -> Path:
    """Write `image` to `path` (format from the extension) so that `path` is either untouched or
    complete: the bytes go to a temporary file in the same directory, are flushed to disk, and
    os.replace moves them into place. Returns the path.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"save_image_atomic expects a PIL image, got {type(image).__name__}")
    path = Path(path)
    fmt = image_format_for_path(path)
    try:
        write_atomic(path, lambda f: image.save(f, format=fmt))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot write {path}: {e}") from e
    return path


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------

def _check_int(name: str, value, low: int) -> int:
    """`value` as a Python int; integer-likes (numpy ints) pass, as plain ints for what comes after."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def _module_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _module_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _image_hw(ucfg: UNetConfig, image_size) -> Tuple[int, int]:
    if image_size is None:
        return ucfg.image_size, ucfg.image_size
    hw = (image_size, image_size) if isinstance(image_size, numbers.Integral) else tuple(image_size)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in hw):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    down = 2 ** (len(ucfg.ch_mults) - 1)
    if hw[0] % down or hw[1] % down:
        raise ValueError(f"image_size {hw} does not fit the model: H and W must be divisible by {down} "
                         f"({len(ucfg.ch_mults)} resolutions)")
    return int(hw[0]), int(hw[1])


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, C]; one rounding rule for every output path."""
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _pil_from_hwc(a: np.ndarray) -> Image.Image:
    gray = image_mode(a.shape[-1]) == "L"
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if gray else a))


def _images_to_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        # Checked first: sparse, nested and meta tensors would fail later in clamp or the copy to the
        # CPU with NotImplementedError, not with a message about the input.
        if images.layout != torch.strided or images.is_nested:
            kind = "nested" if images.is_nested else str(images.layout).replace("torch.", "")
            raise ValueError(f"make_grid expects a dense tensor, got a {kind} tensor")
        if images.device.type not in ("cpu", "cuda"):
            raise ValueError(f"make_grid expects a CPU or CUDA tensor, got one on {images.device}")
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"expected a float tensor [B, C, H, W] in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        arr = _to_uint8_hwc(images.detach().to(torch.float32))
    elif isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype.kind != "f":
            raise ValueError(f"expected a float array [B, H, W, C] in [0, 1], got {images.dtype} {images.shape}")
        arr = _to_uint8_hwc(torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32))
    elif isinstance(images, Sequence) and all(isinstance(im, Image.Image) for im in images):
        if not images:
            raise ValueError("make_grid needs at least one image")
        if len({im.size for im in images}) != 1:
            raise ValueError(f"images differ in size: {sorted({im.size for im in images})}")
        gray = all(im.mode == "L" for im in images)
        arr = np.stack([np.asarray(im.convert("L" if gray else "RGB")) for im in images])
        if gray:
            arr = arr[..., None]
    else:
        raise ValueError("make_grid expects a list of PIL images, a [B, C, H, W] tensor or a [B, H, W, C] array")
    if arr.shape[0] == 0:
        raise ValueError("make_grid needs at least one image")
    if arr.shape[-1] not in (1, 3):
        raise ValueError(f"make_grid supports 1 or 3 channels, got {arr.shape[-1]}")
    return arr


