"""The fast path: one module per fused op, each registered as a torch.library op `ddpm_fast::<name>`
with a CPU kernel, a fake (meta) kernel and a CUDA kernel (Triton, or the C++/CUDA extension).

This namespace exports the same op names and signatures as `ddpm_fast.reference.functional`, so a
UNet runs on it by swapping `F`: `fused(model)` does that for every block, `unfused(model)` undoes it.
The device choice stays out of model code: each op has a CPU and a CUDA kernel; plain eager calls run
the one for the tensors' device directly, everything else (compile, export, dispatch modes) goes
through the dispatcher (see _eager.py).

Each op function has its module's name, so `ddpm_fast.ops.groupnorm_swish` is the function; reach a
module's other names with `from ddpm_fast.ops.groupnorm_swish import groupnorm_swish_triton` (or
`importlib.import_module("ddpm_fast.ops.groupnorm_swish")`).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from . import _conv_gemm
from ._cpu_conv import AVAILABLE as CPU_PACKED_CONVS, packing as cpu_conv_packing
from ._cpu_program import record as record_cpu_program
from .attention import attention
from .conv2d import conv2d
from .conv_transpose2d import conv_transpose2d
from .groupnorm_swish import groupnorm_swish
from .residual_add import residual_add
from .reverse_step import reverse_step, reverse_step_
from .time_embedding import time_embedding
from .upsample_conv2d import upsample_conv2d

__all__ = ["attention", "conv2d", "conv_transpose2d", "groupnorm_swish", "residual_add", "reverse_step", "reverse_step_", "time_embedding", "upsample_conv2d",
           "fused", "cpu_conv_packing", "CPU_PACKED_CONVS", "record_cpu_program",
           "unfused", "is_fused", "dispatch_key"]

class _FastNamespace(types.SimpleNamespace):
    """What a fused block calls through (`self.F.<op>`): the fast ops under the reference's names.

    An object rather than this module because modules cannot be pickled: a fused model must survive
    copy.deepcopy (sample() copies a model to change its dtype), pickle and torch.save. It pickles as
    a reference to the one instance, so `m.F is _FAST` still holds after a copy.
    """

    def __reduce__(self):
        return (_fast_namespace, ())


def _fast_namespace() -> "_FastNamespace":
    return _FAST


_FAST = _FastNamespace(**{name: globals()[name] for name in
                          ("attention", "conv2d", "conv_transpose2d", "groupnorm_swish", "residual_add",
                           "reverse_step", "time_embedding", "upsample_conv2d")})


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


def dispatch_key() -> tuple:
    """The process-wide switches that change which kernel an op runs (TF32 for cuBLAS and cuDNN, the
    convs' backend knob): what a captured CUDA graph bakes in besides its inputs."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, _conv_gemm.BACKEND)
