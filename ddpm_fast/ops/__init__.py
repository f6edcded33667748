"""The fast path: one module per fused op, each registered as a torch.library op `ddpm_fast::<name>`
with a CPU kernel, a fake (meta) kernel and a CUDA kernel (Triton, or the C++/CUDA extension).

This namespace exports the same op names and signatures as `ddpm_fast.reference.functional`, so a
UNet runs on it by swapping `F`: `fused(model)` does that for every block, `unfused(model)` undoes it.
The device choice stays out of model code: each op has a CPU and a CUDA kernel; plain eager calls run
the one for the tensors' device directly, everything else (compile, export, dispatch modes) goes
through the dispatcher (see _eager.py).
"""
from __future__ import annotations

import sys

from torch import nn

from .attention import attention
from .conv2d import conv2d
from .conv_transpose2d import conv_transpose2d
from .groupnorm_swish import groupnorm_swish
from .residual_add import residual_add
from .reverse_step import reverse_step, reverse_step_
from .time_embedding import time_embedding

__all__ = ["attention", "conv2d", "conv_transpose2d", "groupnorm_swish", "residual_add", "reverse_step", "reverse_step_", "time_embedding", "fused",
           "unfused", "is_fused"]

# The namespace object the UNet's blocks call through (`self.F.<op>`): this package itself.
_FAST = sys.modules[__name__]


def _ops_modules(model: nn.Module):
    from ..reference.unet import OpsModule

    return [m for m in model.modules() if isinstance(m, OpsModule)]


def fused(model: nn.Module) -> nn.Module:
    """Route every fusible step of `model` (in place) through the fast ops; returns the model.

    Weights, module tree and state_dict are untouched: only each block's `F` namespace changes.
    """
    for m in _ops_modules(model):
        m.F = _FAST
    return model


def unfused(model: nn.Module) -> nn.Module:
    """Undo `fused`: every block calls the reference functional again."""
    for m in _ops_modules(model):
        m.__dict__.pop("F", None)  # fall back to the class default, reference.functional
    return model


def is_fused(model: nn.Module) -> bool:
    mods = _ops_modules(model)
    return bool(mods) and all(m.F is _FAST for m in mods)
