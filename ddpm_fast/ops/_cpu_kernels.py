"""The C++ CPU kernels of the fused ops (csrc/<op>_cpu.cpp in ddpm_fast._C), as out-variant ops.

`ddpm_fast::groupnorm_swish_out` and `ddpm_fast::residual_add_out` write into a buffer the caller
allocated; each op file's CPU kernel allocates its output in the op's format and calls them, so on CPU
tensors `ddpm_fast::<op>` (through the dispatcher or the eager bypass) runs C++, and the Triton kernel
stays the CUDA implementation. Where the extension is missing, was built before these kernels existed,
or is disabled (DDPM_FAST_DISABLE_EXT=1, as for reverse_step), `out_op` returns None and the op file
runs the reference instead (the one warning about the missing extension comes from ops/reverse_step.py).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import _cpu_program

__all__ = ["out_op", "direct_op", "HAS_CPU_KERNELS"]

_NAMES = ("groupnorm_swish_out", "residual_add_out")


def _load() -> bool:
    if os.environ.get("DDPM_FAST_DISABLE_EXT", "0") == "1":
        return False
    try:
        from .. import _C  # noqa: F401 - registers the ops
    except Exception:  # noqa: BLE001 - ImportError, OSError (ABI): reverse_step.py warns about it
        return False
    return all(hasattr(torch.ops.ddpm_fast, name) for name in _NAMES)


HAS_CPU_KERNELS = _load()


def out_op(name: str) -> Optional[torch._ops.OpOverload]:
    """`torch.ops.ddpm_fast.<name>_out.default` when the C++ kernel is available, else None."""
    if not HAS_CPU_KERNELS:
        return None
    packet = getattr(torch.ops.ddpm_fast, name + "_out", None)  # None from a build that predates the kernel
    return None if packet is None else packet.default


def direct_op(name: str, suffix: str = "_out") -> Optional[Callable]:
    """The same out-variant kernel as `out_op(name)`, bound straight from ddpm_fast._C (no dispatcher:
    ~1 us a call instead of ~5). Only for plain eager calls on real CPU tensors (ops/_eager.py): it
    knows no fake tensors, dispatch modes or tracing. While a CPU program records (ops/_cpu_program.py)
    each call is one of its units. None where `out_op` is None or the extension predates these bindings."""
    if not HAS_CPU_KERNELS:
        return None
    from .. import _C
    binding = getattr(_C, name + suffix, None)  # suffix "_new": the variant that allocates its output
    if binding is None:
        return None

    def call(*args):
        # A recording CPU program (ops/_cpu_program.py) cannot see pybind calls: each one is a unit of it.
        return _cpu_program.unit(binding, args)

    call.__name__ = call.__qualname__ = name + suffix
    return call


if HAS_CPU_KERNELS:
    # The out-variants mutate `out` and return nothing: under tracing (torch.compile of a fused UNet on
    # CPU traces each op's body) the fake writes nothing either.
    @torch.library.register_fake("ddpm_fast::groupnorm_swish_out")
    def _groupnorm_swish_out_fake(x, weight, bias, num_groups, eps, add, swish, out):
        return None

    @torch.library.register_fake("ddpm_fast::residual_add_out")
    def _residual_add_out_fake(x, bias, residual, residual_bias, out):
        return None
