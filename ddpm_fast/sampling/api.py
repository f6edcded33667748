"""sample(): argument checks, the model and its config, the schedule's coefficient table, the loop, the output.

The loop is table driven. `Schedule.ddpm_coeffs / ddpm_coeffs_clipped / ddim_coeffs` turn the
sampler choice (DDPM variant, DDIM eta, strided timesteps, x0 clipping) into one [S, 6] row of
coefficients per step, and every step is the same two calls:
    eps = model(x_t, t);  x_{t-1} = reverse_step(x_t, eps, i, coeffs, noise=z)
so the reference loop (sampling.reference_loop) and the fast loop (sampling.fast_loop) differ only in
how they run those two calls, never in the math.

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

import numbers
import os
from typing import Optional, Tuple, Union

import torch

from ..config import DDPMUNetConfig, DiffusionConfig, ModelConfig, UNetConfig, check_int
from ..devices import parse_device, parse_dtype
from ..io.images import to_output
from ..reference import functional
from ..reference.diffusion import DDPM_VARIANTS, Schedule
from .checks import (BACKENDS, DEFAULT_DDIM_STEPS, DEFAULT_VARIANT, NOISE_MODES, OUTPUT_TYPES, SAMPLERS, image_hw,
                     module_device, module_dtype, prepared, randn_images)
from .reference_loop import reference_loop

__all__ = ["sample", "sampler_coefficients", "model_defaults"]


def sample(model_or_checkpoint, batch_size: int = 16, num_inference_steps: Optional[int] = None,
           sampler: str = "ddpm", eta: float = 0.0, generator: Optional[torch.Generator] = None,
           output_type: str = "pil", progress: bool = True, device=None, dtype=None,
           backend: str = "reference", variant: Optional[str] = None, clip_x0: Optional[bool] = None,
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
        eta must be 0 for "ddpm", and variant must be None or "labml" for "ddim").
    clip_x0: clamp the predicted x0 at every step to config.diffusion.clip_bounds(). variant, clip_x0 None:
        the model's own (config.diffusion: labml, off; a diffusers model's from its scheduler config).
    generator: a CPU torch.Generator (default: a fresh one seeded from torch's global RNG), or a list
        of batch_size of them, one per image (noise "generator" only).
    noise: "generator", "philox" or None (the backend's default): see the module docstring.
    seed: noise="philox" only: the Philox key, an int in [0, 2^64) (default: drawn from `generator`).
    image_offset: noise="philox" only: the global index of this batch's first image in a larger run, so
        that image_offset + k gets the noise of image k of a one-batch run (see sampling.runs).
    model_batch: run the model on chunks of exactly this many images (the last one padded) instead of
        the whole batch at once. Convolution and GEMM libraries pick their algorithm, hence their
        summation order, by shape, so an image's bits depend on the batch it is computed in; with a
        fixed model_batch they do not (same device, dtype and thread count).
    device: "cpu" or "cuda[:i]" (default: the module's device; for a checkpoint CUDA when available). A
        module is moved there in place (nn.Module.to), after every argument has been checked; if sampling
        then fails, it is moved back.
    dtype: the model's compute dtype (default: the module's parameter dtype; float32 for a checkpoint);
        x_t stays float32. A module in another dtype is run through a converted copy.
    backend: "reference" (sampling.reference_loop) or "fast" (sampling.fast_loop).
    channels_last: backend="fast" only: run the UNet's activations in NHWC (see fast_loop).
    image_size: sample at another size than config.unet.image_size (int or (H, W)); the UNet is
        convolutional, but H and W must be divisible by its total downsampling factor.
    output_type: "pil" (PIL images; grayscale for 1 channel), "np" (float32 [B, H, W, C] in [0, 1]) or "pt".
    The model runs in eval mode under torch.inference_mode; its training flags are restored afterwards.
    Raises ValueError if the model's output is not a tensor of x_t's shape, or if x_0 is not finite.
    """
    _check_sampler_args(batch_size, sampler, variant, output_type, backend, channels_last, eta, clip_x0)
    eta = float(eta)
    if num_inference_steps is not None:
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, low=1)
    if model_batch is not None:
        model_batch = check_int("model_batch", model_batch, low=1)
    generator = _check_generator(generator, batch_size)
    noise, seed, image_offset = _check_noise(noise, seed, image_offset, generator, backend)
    run_dtype = parse_dtype(dtype) if dtype is not None else None
    dev = parse_device(device) if device is not None else None
    model, config, dev = _resolve_model(model_or_checkpoint, config, dev, run_dtype)
    if run_dtype is None:
        run_dtype = parse_dtype(module_dtype(model))

    height, width = image_hw(config.unet, image_size)
    schedule = Schedule(config.diffusion)
    variant, clip_x0 = model_defaults(config.diffusion, sampler, variant, clip_x0)
    timesteps, coeffs = sampler_coefficients(schedule, sampler, num_inference_steps, eta, variant, clip_x0)
    clip = config.diffusion.clip_bounds() if clip_x0 else None
    loop, loop_kwargs = _loop(backend, schedule.n_steps, channels_last)
    loop_kwargs["model_batch"] = model_batch
    x_T = _initial_noise((batch_size, config.unet.image_channels, height, width), noise, seed, image_offset,
                         generator, dev, loop_kwargs)
    home = module_device(model)
    try:
        if home != dev:
            model.to(dev)  # only now that every argument has been checked
        x0 = _run_loop(loop, model, x_T, timesteps, coeffs.to(dev), generator=generator, clip=clip,
                       dtype=run_dtype, progress=progress, backend=backend, **loop_kwargs)
        _check_finite(x0, run_dtype)
    except BaseException:
        if home != dev:
            model.to(home)  # an error (or Ctrl-C) leaves the caller's model where it was
        raise
    return to_output(x0, config.diffusion.data_range, output_type)


def _check_sampler_args(batch_size, sampler, variant, output_type, backend, channels_last, eta, clip_x0) -> None:
    """The cheap checks, before anything is loaded."""
    check_int("batch_size", batch_size, low=1)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if variant is not None and variant not in DDPM_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {DDPM_VARIANTS}")
    if sampler == "ddim" and variant not in (None, DEFAULT_VARIANT):
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
    if sampler == "ddpm" and float(eta) != 0.0:
        raise ValueError(f"eta={float(eta)} only applies to sampler='ddim' (DDPM is DDIM with eta=1 and its own "
                         "variance); use sampler='ddim' or eta=0")
    if clip_x0 is not None and not isinstance(clip_x0, bool):
        raise ValueError(f"clip_x0 must be None or a bool, got {clip_x0!r}")


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
        seed = check_int("seed", seed, low=0)
        if seed >= 2 ** 64:
            raise ValueError(f"seed must be below 2^64, got {seed}")
    return noise, seed, check_int("image_offset", image_offset, low=0)


def _initial_noise(shape, noise, seed, image_offset, generator, dev, loop_kwargs) -> torch.Tensor:
    """x_T, drawn before anything else (see the module docstring); sets the loop's noise arguments."""
    if noise == "philox":
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        loop_kwargs.update(noise="philox", seed=seed, image_offset=image_offset)
        return functional.philox_normal(shape, seed, 0, device=dev, image_offset=image_offset,
                                        stream=functional.STREAM_X_T)
    # noise None (the fast backend's default): its loop draws a Philox seed from the generator.
    loop_kwargs.update(noise=noise or "philox")
    return randn_images(shape, generator).to(dev)


def _resolve_model(model_or_checkpoint, config, dev, run_dtype):
    """(model, its ModelConfig, the device to sample on) from a module or anything load_checkpoint reads."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        if config is not None:
            raise ValueError("config must be None when sampling from a checkpoint (it carries its own config)")
        from ..io.checkpoint import load_checkpoint  # late: the io room imports safetensors

        if dev is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, config = load_checkpoint(model_or_checkpoint, device=dev, dtype=run_dtype or torch.float32)
        return model, config, dev
    if not isinstance(model_or_checkpoint, torch.nn.Module):
        raise ValueError("model_or_checkpoint must be an nn.Module or a checkpoint path, got "
                         f"{type(model_or_checkpoint).__name__}")
    model = model_or_checkpoint
    model_cfg = getattr(model, "config", None)
    if config is None:
        if not isinstance(model_cfg, (UNetConfig, DDPMUNetConfig)):
            raise ValueError("the model has no UNetConfig or DDPMUNetConfig in .config; pass config=ModelConfig(...)")
        config = ModelConfig(unet=model_cfg, diffusion=DiffusionConfig())
    elif not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    elif isinstance(model_cfg, (UNetConfig, DDPMUNetConfig)) and model_cfg != config.unet:
        diff = [f"{k}: model {getattr(model_cfg, k)!r} vs config {getattr(config.unet, k)!r}"
                for k in model_cfg.to_dict() if getattr(model_cfg, k) != getattr(config.unet, k)]
        raise ValueError("config.unet does not describe this model (" + "; ".join(diff) + ")")
    if dev is None:
        # A model on `meta` (no data) or another unsupported device is refused here, not deep in the loop.
        dev = parse_device(module_device(model), what="the model's device")
    return model, config, dev


def model_defaults(diffusion: DiffusionConfig, sampler: str, variant: Optional[str], clip_x0: Optional[bool]
                   ) -> Tuple[str, bool]:
    """(variant, clip_x0) with None replaced by the model's defaults (DDIM has no variant: always labml's)."""
    if variant is None:
        variant = diffusion.variant if sampler == "ddpm" else DEFAULT_VARIANT
    return variant, diffusion.clip_x0 if clip_x0 is None else clip_x0


def sampler_coefficients(schedule: Schedule, sampler: str, num_inference_steps: Optional[int], eta: float,
                         variant: str, clip_x0: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [S] int64, coefficient rows [S, 6] float32) of a sampler over `schedule`."""
    n_steps = num_inference_steps
    if n_steps is None:
        n_steps = schedule.n_steps if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, schedule.n_steps)
    if n_steps > schedule.n_steps:
        raise ValueError(f"num_inference_steps={n_steps} exceeds the schedule's T={schedule.n_steps}")
    timesteps = schedule.timesteps(n_steps)
    if sampler == "ddim":
        return timesteps, schedule.ddim_coeffs(timesteps, eta)
    if clip_x0:
        return timesteps, schedule.ddpm_coeffs_clipped(timesteps, variant)
    return timesteps, schedule.ddpm_coeffs(timesteps, variant)


def _loop(backend: str, n_train_steps: int, channels_last: bool):
    """(loop function, its extra keyword arguments) for `backend`."""
    if backend != "fast":
        return reference_loop, {}
    try:
        from .fast_loop import fast_loop  # late: imports triton and the C++ extension
    except ImportError as e:
        raise RuntimeError(f"backend='fast' is not available: ddpm_fast.sampling.fast_loop cannot be imported "
                           f"({e}); use backend='reference'") from e
    # The fast loop precomputes a time table over the schedule's T steps.
    return fast_loop, {"n_steps": n_train_steps, "channels_last": bool(channels_last)}


def _run_loop(loop, model, x_T, timesteps, coeffs, *, dtype, backend, **kwargs) -> torch.Tensor:
    """`loop` on `model` under inference mode. The reference loop runs on `prepared(model)`; the fast
    loop prepares the model itself, keyed on the caller's model, so that its kept CUDA graph (and any
    converted copy) serve the next call too."""
    if backend == "fast":
        with torch.inference_mode():
            return loop(model, x_T, timesteps, coeffs, dtype=dtype, **kwargs)
    with prepared(model, dtype, x_T.device) as run_model, torch.inference_mode():
        return loop(run_model, x_T, timesteps, coeffs, dtype=dtype, **kwargs)


def _check_finite(x0: torch.Tensor, dtype: torch.dtype) -> None:
    # One host sync for the whole run: a diverged sample (a broken checkpoint, an fp16 overflow) would
    # otherwise come back as a clamped black or white image that looks like a result.
    if not bool(torch.isfinite(x0).all()):
        bad = int((~torch.isfinite(x0)).sum())
        raise ValueError(f"sampling diverged: {bad} of {x0.numel()} values of x_0 are NaN or Inf (check the "
                         f"model's weights and its diffusion config; dtype was {dtype})")
