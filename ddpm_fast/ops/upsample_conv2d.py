"""The DDPM UNet's Upsample: `ddpm_fast::upsample_conv2d`, nearest x2 then a 3x3 conv (padding 1), run as
one 4x4 stride-2 padding-1 transposed conv with a folded kernel, so the 4x larger upsampled tensor is
never written.

Spec: `ddpm_fast.reference.functional.upsample_conv2d`.

Fold: per axis, output 2i sees u[2i-1], u[2i], u[2i+1] = x[i-1], x[i], x[i] through taps w0, w1, w2, and
output 2i+1 sees x[i], x[i], x[i+1]. A stride-2 padding-1 transposed conv with 4 taps W gives output
o = 2i + k - 1 from input i through W[k]: 2i <- x[i] W[1] + x[i-1] W[3], 2i+1 <- x[i] W[2] + x[i+1] W[0].
So W = [w2, w1 + w2, w0 + w1, w0]; in 2-D the fold runs over both axes (W2 = A w A^T with A below),
exact in exact arithmetic. The fold sums up to four taps in fp32 and rounds once to the weights' dtype
(for fp16/bf16 that one rounding is the only difference from the reference's arithmetic besides the
summation order).

CUDA: the folded weight goes to `ops.conv_transpose2d` (its Triton kernel where its rule picks it, cuDNN
elsewhere). CPU: see CPU_FOLDED below.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import functional as _ref
from . import _conv_gemm as G
from ._common import HAS_TRITON, define_op, out_format
from ._eager import plain_eager
from .conv_transpose2d import conv_transpose2d, conv_transpose2d_triton

__all__ = ["upsample_conv2d", "upsample_conv2d_triton", "upsample_conv2d_folded", "fold_weight", "CPU_FOLDED", "HAS_TRITON"]

# The 4x3 per-axis fold: row k of A holds the 3x3 taps that transposed-conv tap k sums (see above).
_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))

# CPU: the folded transposed conv (torch's F.conv_transpose2d) or the reference (interpolate + conv).
# Measured on the 2026-12-02 dev VM (Intel Xeon, AVX-512; 1 thread, fp32, batch 1, median of 5, fold included, one run), C_in = C_out:
#   C=256 4x4: ref 0.59 ms, folded 6.63 | 8x8: 2.15 vs 5.84 | 16x16: 7.44 vs 7.50 | C=512 8x8: 8.02 vs 22.27
#   C=512 16x16: 29.4 vs 38.1 | C=256 32x32: 34.9 vs 23.7 | 64x64: 115 vs 87 | C=128 64x64: 26.5 vs 28.9
#   C=128 128x128: 152 vs 153.
# oneDNN's transposed conv loses at every cifar10-32 shape and most 256x256 ones (it wins only at C=256,
# 32..64 px), so the CPU runs the reference.
CPU_FOLDED = False


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3] conv weight -> the equivalent [Ci, Co, 4, 4] ConvTranspose2d(4, 2, 1) weight, folded
    in fp32 (fp64 for fp64) and rounded once to weight's dtype."""
    acc = torch.promote_types(weight.dtype, torch.float32)  # fp64 weights (tests) fold in fp64
    a = torch.tensor(_FOLD, dtype=acc, device=weight.device)
    folded = torch.einsum("kp,oipq,lq->iokl", a, weight.to(acc), a)
    return folded.to(weight.dtype).contiguous()


def _out(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fmt = out_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def _cpu(x, weight, bias):
    if CPU_FOLDED:
        return _out(x, torch.nn.functional.conv_transpose2d(x, fold_weight(weight), bias, 2, 1))
    return _out(x, _ref.upsample_conv2d(x, weight, bias))


def upsample_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           split: Optional[int] = None) -> torch.Tensor:
    """Raw Triton launcher (no input validation; use `upsample_conv2d`): the fold, then conv_transpose2d's
    Triton kernel, whatever its rule says. CUDA tensors, or CPU ones under TRITON_INTERPRET=1. `split`
    forces the K split per parity class."""
    return conv_transpose2d_triton(x, fold_weight(weight), bias, split=split)


def upsample_conv2d_folded(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           force_triton: bool = False) -> torch.Tensor:
    """The fast path without input validation: the fold, then `ops.conv_transpose2d` (its Triton kernel
    where its rule picks it, cuDNN elsewhere), or its Triton kernel whatever the rule says when
    `force_triton` (= upsample_conv2d_triton)."""
    if force_triton:
        return upsample_conv2d_triton(x, weight, bias)
    return conv_transpose2d(x, fold_weight(weight), bias, (2, 2), (1, 1))


def _run(x, weight, bias):
    if x.device.type != "cuda":
        return _cpu(x, weight, bias)
    return upsample_conv2d_folded(x, weight, bias)


def _fake(x, weight, bias):
    b, _, h, w = x.shape
    return torch.empty((b, weight.shape[0], 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                       memory_format=out_format(x))


def _upsample_conv2d_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _run(x, weight, bias)


_upsample_conv2d_op = define_op("upsample_conv2d", _upsample_conv2d_body, _cpu, _fake)


def _check(x, weight, bias) -> None:
    G.check_conv_args("upsample_conv2d", x, weight, bias, (1, 1), (1, 1), "oi")
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"upsample_conv2d: weight must be [C_out, C_in, 3, 3], got {list(weight.shape)}")


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Nearest-neighbour x2 then a 3x3 conv with padding 1 (see `reference.functional.upsample_conv2d`).

    x: [B, C_in, H, W]; weight: [C_out, C_in, 3, 3]; bias: [C_out] or None; one float dtype and device.
    Returns [B, C_out, 2H, 2W] in x's layout (NCHW or channels_last). Not differentiable (inference op).
    """
    _check(x, weight, bias)
    if plain_eager(x, weight, bias):  # see ops/_eager.py
        return _run(x, weight, bias)
    return torch.ops.ddpm_fast.upsample_conv2d(x, weight, bias)
