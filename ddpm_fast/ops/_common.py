"""The floor every op file stands on: Triton's availability, the GPU's SM count, tile-size helpers,
strided reach, the output layout rule, the dot-precision flags and the two Triton helpers several
kernels share, and `define_op`, the one way an op is registered. No op file imports another's privates.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

try:  # The package must import (and every op fall back to its reference) where triton is missing.
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without a working triton
    triton = tl = triton_op = wrap_triton = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "wrap_triton", "define_op", "sm_count", "pow2_clamp", "next_pow2", "span",
           "out_format", "new_output", "INT32_MAX", "dot_flags", "dot", "round_to"]

INT32_MAX = 2 ** 31 - 1
# The floating dtypes every fused op takes (statistics and accumulation are fp32 whatever they are).
OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def define_op(name: str, body: Callable, cpu_kernel: Callable, fake: Callable,
              cuda_fallback: Optional[Callable] = None):
    """Register `ddpm_fast::<name>` and return it.

    body: the op's implementation, annotated (torch.library reads the schema from the annotations);
    with triton it is a `triton_op`, so torch.compile traces through its kernel launches.
    cpu_kernel: what CPU tensors run (the interpreter is for tests, not for use); without triton every
    device runs it, or `cuda_fallback` on CUDA where the CPU kernel is CPU-only (the C++ kernels).
    fake: the explicit shape/stride rule (triton_op would otherwise trace the launcher).
    """
    if HAS_TRITON:
        op = triton_op(f"ddpm_fast::{name}", mutates_args=())(body)
        op.register_kernel("cpu")(cpu_kernel)
    else:  # pragma: no cover - exercised only on machines without triton
        op = torch.library.custom_op(f"ddpm_fast::{name}", mutates_args=())(body)
        op.register_kernel("cpu")(cpu_kernel)
        op.register_kernel("cuda")(cuda_fallback or cpu_kernel)
    op.register_fake(fake)
    return op


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def span(t: torch.Tensor, dims=None) -> int:
    """1 + the largest element offset of t over `dims` (default: all): what a kernel indexing t through
    its strides must represent, which for a strided view can exceed numel()."""
    dims = range(t.dim()) if dims is None else dims
    return 1 + sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0)


def out_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last output for a dense channels_last input, NCHW-contiguous for everything else."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def new_output(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like x in `out_format(x)`. empty_like for the dense layouts, where it keeps
    exactly that format: ~1.5 us, against ~4.5 us for torch.empty(..., memory_format=...) (CPU, per call)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))


def dot_flags(dtype: torch.dtype, device: torch.device, allow_tf32: Optional[bool] = None) -> dict:
    """The `dot` flags for operands of `dtype` on `device`.

    PREC 0: 16-bit operands on tensor cores; 1: fp32 in IEEE; 2: fp32 through TF32 (only when torch
    allows TF32 matmuls, as cuBLAS would; `allow_tf32` overrides that flag, e.g. with cuDNN's for
    convs). UPCAST: the CPU interpreter has no bf16 dot and a slow fp16 one, so 16-bit operands go to
    fp32 there: exact, as the products of 16-bit values are exact in fp32 and the GPU's tensor cores
    accumulate in fp32 too.
    """
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
        prec = 2 if (device.type == "cuda" and tf32) else 1
    else:
        prec = 0
    return dict(PREC=prec, UPCAST=(dtype != torch.float32 and device.type != "cuda"))


if HAS_TRITON:

    @triton.jit
    def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b with the precision `dot_flags` chose."""
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif PREC == 1:
            out = tl.dot(a, b, acc, input_precision="ieee")
        elif PREC == 2:
            out = tl.dot(a, b, acc, input_precision="tf32")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def round_to(v, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
        """fp32 -> dtype, round to nearest even. The Triton interpreter truncates fp32 -> bf16 (the GPU
        rounds), so under it (SOFT_BF16) the rounding is done on the bits first; the cast is then exact."""
        if SOFT_BF16 and dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(dtype)
else:  # pragma: no cover
    dot = round_to = None
