"""The fused reverse-diffusion step, `ddpm_fast::reverse_step`, backed by the C++/CUDA extension.

One kernel gathers the coefficient row `coeffs[step]` on the device, forms x0 (optionally clamped),
the posterior mean and adds sigma * z, with z either passed in or drawn inside the kernel by
Philox4x32-10 keyed by (seed, step, global logical element index) -- the same stream as
`reference.functional.philox_normal` on CPU and CUDA. The global index of element e of a batch whose
first image is image `image_offset` of a larger run is image_offset * per_image + e (per_image: the
elements of one image, numel / x_t.shape[0]), so image i draws the same noise in any batch position. The spec is `reference.functional.reverse_step`.

Ops registered in the `ddpm_fast` namespace (schemas in csrc/bindings.cpp):
    reverse_step(Tensor x_t, Tensor eps, Tensor step, Tensor coeffs, Tensor? noise, int seed,
                 float clip_lo, float clip_hi, bool clip, Tensor? seed_tensor=None, int image_offset=0,
                 Tensor? image_offset_tensor=None) -> Tensor
    reverse_step_(Tensor(a!) x_t, <same arguments>) -> ()          # writes x_{t-1} into x_t
seed_tensor (an int64 scalar, on x_t's device or the CPU) replaces `seed` when given: on CUDA the kernel
reads it, so a captured graph can be replayed for a new sampling run after `seed_tensor.fill_(s)`;
image_offset_tensor replaces image_offset the same way (a new batch of a large run: `.fill_(first)`).
If `ddpm_fast._C` is missing or fails to load, ONE warning is emitted and both ops are defined here
with the reference as their implementation, so `reverse_step` always works (slower, and without
CUDA-graph safety: the reference reads the step on the host). DDPM_FAST_DISABLE_EXT=1 (set before
import) forces that fallback, for comparisons and tests.
"""
from __future__ import annotations

import operator
import os
import warnings
from typing import Optional, Tuple

import torch

from ..reference import functional as _ref
from ._common import out_format

__all__ = ["reverse_step", "reverse_step_", "HAS_EXTENSION", "EXTENSION_HAS_CUDA", "SCHEMAS"]

# Identical to the m.def strings in csrc/bindings.cpp (a test compares them with the loaded op).
SCHEMAS = {
    "reverse_step": "reverse_step(Tensor x_t, Tensor eps, Tensor step, Tensor coeffs, Tensor? noise, int seed, "
                    "float clip_lo, float clip_hi, bool clip, Tensor? seed_tensor=None, int image_offset=0, "
                    "Tensor? image_offset_tensor=None) -> Tensor",
    "reverse_step_": "reverse_step_(Tensor(a!) x_t, Tensor eps, Tensor step, Tensor coeffs, Tensor? noise, int seed, "
                     "float clip_lo, float clip_hi, bool clip, Tensor? seed_tensor=None, int image_offset=0, "
                     "Tensor? image_offset_tensor=None) -> ()",
}
_U64 = (1 << 64) - 1
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "ddpm_fast::reverse_step"


def _check(x_t, eps, step, coeffs, noise, clip_lo, clip_hi, clip, seed_tensor=None, image_offset=0,
           image_offset_tensor=None) -> None:
    """The binding's checks in Python, for the fake (tracing) and the fallback implementations."""
    dev = x_t.device
    if x_t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{_OP}: x_t must be float32, float16 or bfloat16, got {x_t.dtype}")
    if eps.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{_OP}: eps must be float32, float16 or bfloat16, got {eps.dtype}")
    if x_t.dtype != torch.float32 and eps.dtype != x_t.dtype:
        raise TypeError(f"{_OP}: x_t of dtype {x_t.dtype} needs eps of the same dtype (or keep x_t in "
                        f"float32), got eps {eps.dtype}")
    if eps.device != dev:
        raise RuntimeError(f"{_OP}: eps is on {eps.device} but x_t is on {dev}")
    if eps.shape != x_t.shape:
        raise ValueError(f"{_OP}: eps shape {tuple(eps.shape)} differs from x_t shape {tuple(x_t.shape)}")
    if step.dtype != torch.int64:
        raise TypeError(f"{_OP}: step must be an int64 tensor, got {step.dtype}")
    if step.numel() != 1:
        raise ValueError(f"{_OP}: step must hold exactly one index, got shape {tuple(step.shape)}")
    if step.device != dev and step.device.type != "cpu":
        raise RuntimeError(f"{_OP}: step is on {step.device}; it must be on x_t's device ({dev}) or the CPU")
    if coeffs.dtype != torch.float32:
        raise TypeError(f"{_OP}: coeffs must be float32, got {coeffs.dtype}")
    if coeffs.dim() != 2 or coeffs.shape[1] != _ref.N_COEFFS or coeffs.shape[0] < 1:
        raise ValueError(f"{_OP}: coeffs must be a [S, {_ref.N_COEFFS}] table with S >= 1, "
                         f"got shape {tuple(coeffs.shape)}")
    if coeffs.device != dev:
        raise RuntimeError(f"{_OP}: coeffs is on {coeffs.device} but x_t is on {dev}")
    if not coeffs.is_contiguous():
        raise ValueError(f"{_OP}: coeffs must be contiguous (call .contiguous() once when building the table)")
    if noise is not None:
        if noise.device != dev:
            raise RuntimeError(f"{_OP}: noise is on {noise.device} but x_t is on {dev}")
        if noise.shape != x_t.shape:
            raise ValueError(f"{_OP}: noise shape {tuple(noise.shape)} differs from x_t shape {tuple(x_t.shape)}")
        if noise.dtype not in _KERNEL_DTYPES + (torch.float64,):
            raise TypeError(f"{_OP}: noise must be a floating tensor (float32/float16/bfloat16/float64), "
                            f"got {noise.dtype}")
    if seed_tensor is not None:
        if seed_tensor.dtype != torch.int64:
            raise TypeError(f"{_OP}: seed_tensor must be an int64 tensor, got {seed_tensor.dtype}")
        if seed_tensor.numel() != 1:
            raise ValueError(f"{_OP}: seed_tensor must hold exactly one seed, got shape {tuple(seed_tensor.shape)}")
        if seed_tensor.device != dev and seed_tensor.device.type != "cpu":
            raise RuntimeError(f"{_OP}: seed_tensor is on {seed_tensor.device}; it must be on x_t's device ({dev}) "
                               "or the CPU")
    if image_offset < 0:
        raise ValueError(f"{_OP}: image_offset must be >= 0, got {image_offset}")
    if image_offset_tensor is not None:
        if image_offset_tensor.dtype != torch.int64:
            raise TypeError(f"{_OP}: image_offset_tensor must be an int64 tensor, got {image_offset_tensor.dtype}")
        if image_offset_tensor.numel() != 1:
            raise ValueError(f"{_OP}: image_offset_tensor must hold exactly one index, got shape "
                             f"{tuple(image_offset_tensor.shape)}")
        if image_offset_tensor.device != dev and image_offset_tensor.device.type != "cpu":
            raise RuntimeError(f"{_OP}: image_offset_tensor is on {image_offset_tensor.device}; it must be on "
                               f"x_t's device ({dev}) or the CPU")
    if clip and not clip_lo <= clip_hi:  # also rejects NaN bounds
        raise ValueError(f"{_OP}: clip range must satisfy lo <= hi, got ({clip_lo}, {clip_hi})")


# --- the reference as an op implementation (fallback, and CUDA when the extension has no CUDA) ---
def _reference_impl(x_t, eps, step, coeffs, noise, seed, clip_lo, clip_hi, clip, seed_tensor=None, image_offset=0,
                    image_offset_tensor=None):
    _check(x_t, eps, step, coeffs, noise, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor)
    if seed_tensor is not None:
        seed = int(seed_tensor.reshape(()).item())
    if image_offset_tensor is not None:
        image_offset = int(image_offset_tensor.reshape(()).item())
        if image_offset < 0:
            raise ValueError(f"{_OP}: image_offset must be >= 0, got {image_offset}")
    s = int(step.reshape(()).item())
    if not 0 <= s < coeffs.shape[0]:
        raise ValueError(f"{_OP}: step {s} is out of range for a coefficient table of {coeffs.shape[0]} rows")
    out = _ref.reverse_step(x_t, eps, step, coeffs, noise, seed & _U64, (clip_lo, clip_hi) if clip else None,
                            image_offset)
    return out.contiguous(memory_format=out_format(x_t))


def _reference_impl_(x_t, eps, step, coeffs, noise, seed, clip_lo, clip_hi, clip, seed_tensor=None, image_offset=0,
                     image_offset_tensor=None):
    x_t.copy_(_reference_impl(x_t, eps, step, coeffs, noise, seed, clip_lo, clip_hi, clip, seed_tensor, image_offset,
                              image_offset_tensor))


def _load_extension() -> Tuple[bool, bool, Optional[BaseException]]:
    if os.environ.get("DDPM_FAST_DISABLE_EXT", "0") == "1":
        return False, False, RuntimeError("disabled by DDPM_FAST_DISABLE_EXT=1")
    try:
        from .. import _C  # registers ddpm_fast::reverse_step / reverse_step_ from C++
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (undefined symbol, ABI), RuntimeError
        return False, False, e
    return True, bool(getattr(_C, "WITH_CUDA", False)), None


HAS_EXTENSION, EXTENSION_HAS_CUDA, _LOAD_ERROR = _load_extension()
_libs = []  # keep Library objects alive: dropping one unregisters its definitions
if not HAS_EXTENSION:
    warnings.warn(f"ddpm_fast: the C++ extension ddpm_fast._C is not available ({_LOAD_ERROR}); reverse_step "
                  "runs the PyTorch reference instead (build it with `pip install --no-build-isolation -e .`)",
                  RuntimeWarning, stacklevel=2)
    _lib = torch.library.Library("ddpm_fast", "FRAGMENT")
    for _schema in SCHEMAS.values():
        _lib.define(_schema)
    _lib.impl("reverse_step", _reference_impl, "CompositeExplicitAutograd")
    _lib.impl("reverse_step_", _reference_impl_, "CompositeExplicitAutograd")
    _libs.append(_lib)
elif not EXTENSION_HAS_CUDA and torch.cuda.is_available():
    warnings.warn("ddpm_fast: the C++ extension was built without CUDA (torch without CUDA or no CUDA_HOME at "
                  "build time); reverse_step on CUDA tensors runs the PyTorch reference", RuntimeWarning,
                  stacklevel=2)
    _lib = torch.library.Library("ddpm_fast", "IMPL")
    _lib.impl("reverse_step", _reference_impl, "CUDA")
    _lib.impl("reverse_step_", _reference_impl_, "CUDA")
    _libs.append(_lib)


@torch.library.register_fake("ddpm_fast::reverse_step")
def _reverse_step_fake(x_t, eps, step, coeffs, noise, seed, clip_lo, clip_hi, clip, seed_tensor=None, image_offset=0,
                       image_offset_tensor=None):
    _check(x_t, eps, step, coeffs, noise, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor)
    return torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device, memory_format=out_format(x_t))


@torch.library.register_fake("ddpm_fast::reverse_step_")
def _reverse_step_inplace_fake(x_t, eps, step, coeffs, noise, seed, clip_lo, clip_hi, clip, seed_tensor=None,
                               image_offset=0, image_offset_tensor=None):
    _check(x_t, eps, step, coeffs, noise, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor)
    return None


# --- Python wrappers: the reference signature -------------------------------------------------
def seed_arg(seed) -> int:
    """Any integer seed, reduced mod 2^64 like the reference, as the schema's signed int64."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    s = operator.index(seed) & _U64
    return s - (1 << 64) if s >= (1 << 63) else s


def _seed_args(seed) -> Tuple[int, Optional[torch.Tensor]]:
    """(seed, seed_tensor) for the op: an int goes in `seed`; a tensor (an int64 scalar the kernel reads on
    the device, e.g. a CUDA-graph sampler's static seed buffer) in `seed_tensor`."""
    if isinstance(seed, torch.Tensor):
        return 0, seed
    return seed_arg(seed), None


def _image_offset_args(image_offset) -> Tuple[int, Optional[torch.Tensor]]:
    """(image_offset, image_offset_tensor) for the op, as `_seed_args`: an int, or an int64 scalar tensor."""
    if isinstance(image_offset, torch.Tensor):
        return 0, image_offset
    if isinstance(image_offset, bool) or not hasattr(image_offset, "__index__"):
        raise TypeError(f"image_offset must be an integer, got {image_offset!r}")
    value = operator.index(image_offset)
    if not 0 <= value < (1 << 63):
        raise ValueError(f"image_offset must be in [0, 2^63), got {value}")
    return value, None


def _clip_args(clip) -> Tuple[float, float, bool]:
    if clip is None:
        return 0.0, 0.0, False
    try:
        lo, hi = clip
        return float(lo), float(hi), True
    except (TypeError, ValueError):
        raise ValueError(f"reverse_step: clip must be a pair of numbers (lo, hi) or None, got {clip!r}") from None


def _step_arg(step) -> torch.Tensor:
    if isinstance(step, torch.Tensor):
        # Any integer dtype, as the reference's `.to(torch.long)`; the cast is a tiny device op.
        if step.dtype != torch.int64 and not (step.is_floating_point() or step.is_complex()
                                              or step.dtype == torch.bool):
            step = step.to(torch.int64)
        return step
    return torch.tensor(operator.index(step), dtype=torch.int64)


def _no_autograd(op: str, *tensors) -> None:
    # The extension's op has no backward: through the dispatcher, inputs that require grad would give an
    # output without grad_fn (a warning, then None gradients), and the in-place form would write into a
    # leaf autograd tracks. Refuse instead, and point at the differentiable reference.
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} is an inference op without a backward, and an input requires grad: run it "
                           "under torch.no_grad(), or use ddpm_fast.reference.functional.reverse_step")


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, step: torch.Tensor, coeffs: torch.Tensor,
                 noise: Optional[torch.Tensor] = None, seed: int = 0,
                 clip: Optional[Tuple[float, float]] = None, image_offset: int = 0) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} from the coefficient row `coeffs[step]`, fused in one kernel.

    Same contract as `reference.functional.reverse_step`: x_t float32 (or float16/bfloat16 with eps
    of the same dtype) of any shape; eps the same shape, float32/float16/bfloat16; step an integer
    tensor holding one row index (on x_t's device for CUDA-graph capture, or on the CPU; a Python int
    is accepted too); coeffs float32 [S, 6] contiguous on x_t's device (Schedule.ddpm_coeffs,
    ddpm_coeffs_clipped, ddim_coeffs); noise None to draw z in the kernel from Philox keyed by
    (seed, step, image_offset * per_image + element), or a tensor of x_t's shape; seed an integer, or an
    int64 scalar tensor (on x_t's device or the CPU) that the kernel reads; clip (lo, hi) clamps x0;
    image_offset the global index of the batch's first image (x_t.shape[0] images), an integer >= 0 or an
    int64 scalar tensor read like seed.
    Returns a new tensor of x_t's dtype, contiguous (channels_last when x_t is channels_last).
    A step outside [0, S) raises, except for a step tensor on CUDA, where reading it would sync:
    there every output element is NaN instead.
    """
    _no_autograd("reverse_step", x_t, eps, coeffs, noise)
    lo, hi, do_clip = _clip_args(clip)
    seed, seed_t = _seed_args(seed)
    offset, offset_t = _image_offset_args(image_offset)
    return torch.ops.ddpm_fast.reverse_step(x_t, eps, _step_arg(step), coeffs, noise, seed, lo, hi, do_clip, seed_t,
                                            offset, offset_t)


def reverse_step_(x_t: torch.Tensor, eps: torch.Tensor, step: torch.Tensor, coeffs: torch.Tensor,
                  noise: Optional[torch.Tensor] = None, seed: int = 0,
                  clip: Optional[Tuple[float, float]] = None, image_offset: int = 0) -> torch.Tensor:
    """In-place `reverse_step`: writes x_{t-1} into x_t and returns x_t.

    The form for a CUDA-graph sampler: x_t is the static state buffer, eps the UNet's static output
    and step a device int64 scalar refilled before each replay (`step.fill_(i)` or `copy_`), so the
    captured launch reads the new row and draws fresh Philox noise for every step; a device seed tensor
    lets the same graph serve another sampling run (`seed.fill_(s)`), and a device image_offset tensor
    another batch of a large run (`image_offset.fill_(first)`). eps (and noise)
    may be x_t itself but must not partially overlap it.
    """
    _no_autograd("reverse_step_", x_t, eps, coeffs, noise)
    lo, hi, do_clip = _clip_args(clip)
    seed, seed_t = _seed_args(seed)
    offset, offset_t = _image_offset_args(image_offset)
    torch.ops.ddpm_fast.reverse_step_(x_t, eps, _step_arg(step), coeffs, noise, seed, lo, hi, do_clip, seed_t, offset,
                                      offset_t)
    return x_t
