"""The UNet's convolutions: `ddpm_fast::conv2d`, an implicit-GEMM Triton kernel with split-K for the
small-batch shapes where cuDNN leaves the GPU idle, cuDNN everywhere else.

Spec: `ddpm_fast.reference.functional.conv2d` (F.conv2d: zero padding, no dilation, one group).

Why: on the first H100 profile (cifar35m, batch 1, fp32 with TF32 off) cuDNN ran all 61 convs with one
32x32-tile FFMA kernel, 4.1 ms of a 5.3 ms forward, ~2.5 TFLOP/s of the ~67 the CUDA cores can do. The
GEMM behind a conv at batch 1 is small and deep: M = H*W output pixels (1024 down to 16), N = C_out
(128..256), K = C_in*9 (up to 3456). 32x32 output tiles give 8-128 programs for 132 SMs, each walking the
whole K alone. Here K is split over S programs as well (S chosen so that about two programs land on
each SM), each writes an fp32 partial, and a second small kernel sums the S partials in a fixed order
(deterministic, unlike atomics) and adds the bias.

Kernel: output tile [pixels x channels] accumulated over K blocks; a K block is one filter tap (ky, kx)
and BLOCK_K input channels, so the tap's offsets are scalars and only channels vary along the block.
All strides are arguments (NCHW, channels_last, any weight layout). For NCHW input the pixels are the
contiguous axis, so the kernel computes the transposed tile (channels x pixels: `M_FAST`) to keep the
lanes of a warp on consecutive addresses of x and of the output; for channels_last it is the other way.
Accumulation is fp32: IEEE fp32 dots for fp32 (TF32 only when torch allows it for cuDNN convs, as cuDNN
would), tensor-core dots with fp32 accumulation for fp16/bf16. One rounding to the output dtype.

Dispatch (`use_triton`): fp32 (TF32 off) on CUDA where the output has fewer 64x64 tiles than the GPU
has SMs, i.e. where cuDNN cannot fill it without splitting K. A first rule, not yet measured on a GPU:
`benchmarks/bench_conv2d.py` times both at every preset shape and decides it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..reference import functional as _ref
from . import _conv_gemm as G, _cpu_conv
from ._common import HAS_TRITON, define_op, dot_flags, out_format, span, tl, triton, wrap_triton
from ._conv_gemm import (check_conv_args, conv_out_size as out_size, new_workspace as _new_workspace, pad4,
                         pair as _pair, plan, prefers_triton)
from ._eager import plain_eager


__all__ = ["conv2d", "conv2d_triton", "plan", "use_triton", "prefers_triton", "HAS_TRITON"]

def use_triton(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
    """The dispatch rule for CUDA tensors (see the module docstring)."""
    # The kernel indexes x in int32 through its strides: a view reaching past that takes cuDNN, whatever
    # BACKEND says.
    if not HAS_TRITON or x.device.type != "cuda" or span(x) > G.MAX_ELEMENTS:
        return False
    if G.BACKEND != "auto":
        return G.BACKEND == "triton"
    b, _, h, w = x.shape
    ho, wo = out_size(h, w, weight.shape[2], weight.shape[3], stride, padding)
    # Fewer tiles than SMs also bounds the output (< SMs * 64 * 64) and its split-K partials (< 2 * SMs
    # copies) far below int32 offsets; x itself can still be large (a big input, a large stride).
    return prefers_triton(b * ho * wo, weight.shape[0], x.dtype, torch.backends.cudnn.allow_tf32, G.sms(x.device))


def _new_output(x: torch.Tensor, c_out: int, ho: int, wo: int) -> torch.Tensor:
    # x's layout when it is dense channels_last, NCHW otherwise (tests wrap this to poison the buffer).
    return torch.empty((x.shape[0], c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=out_format(x))


if HAS_TRITON:

    # Sizes are not specialised (Triton would compile a variant per "divisible by 16" pattern of each,
    # ~20 variants per preset, each compiled in the sampler's warm-up); strides are, so a unit stride is
    # known at compile time.
    @triton.jit(do_not_specialize=["Ci", "H", "W", "Co", "Ho", "Wo", "M", "split_stride", "blocks_per_split"])
    def _conv_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, Ci, H, W, Co, Ho, Wo, M,
                          sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w, so_n, so_c, so_h, so_w,
                          split_stride, blocks_per_split,
                          KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                          PH: tl.constexpr, PW: tl.constexpr, HAS_BIAS: tl.constexpr, M_FAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PREC: tl.constexpr, UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr):
        pid_s = tl.program_id(2)
        offs_m, offs_n, m_ok, n_ok, img, oy, ox = G.pixel_tile(M, Co, Ho, Wo, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        iy0 = oy * SH - PH
        ix0 = ox * SW - PW
        x_m = img * sx_n + iy0 * sx_h + ix0 * sx_w  # top-left input offset per pixel (masked below if < 0)
        ci_blocks = tl.cdiv(Ci, BLOCK_K)
        kb0 = pid_s * blocks_per_split
        kb1 = tl.minimum(kb0 + blocks_per_split, KH * KW * ci_blocks)
        acc = G.zero_acc(BLOCK_M, BLOCK_N, M_FAST)
        for kb in range(kb0, kb1):
            tap = kb // ci_blocks
            ky = tap // KW
            kx = tap % KW
            ci = (kb % ci_blocks) * BLOCK_K + offs_k
            k_ok = ci < Ci
            iy = iy0 + ky
            ix = ix0 + kx
            row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # zero padding = masked loads
            acc = G.tile_dot(acc, x_ptr, w_ptr, x_m + ky * sx_h + kx * sx_w, ky * sw_h + kx * sw_w, ci, k_ok,
                            row_ok, offs_n, n_ok, sx_c, sw_o, sw_i, M_FAST, PREC, UPCAST)
        o_m = img * so_n + oy * so_h + ox * so_w
        G.store_tile(acc, out_ptr + pid_s * split_stride, b_ptr, o_m, m_ok, offs_n, n_ok, so_c, HAS_BIAS, M_FAST,
                    SOFT_BF16)


def conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                  padding: Sequence[int], split: Optional[int] = None,
                  allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """Raw Triton launcher (no input validation; use `conv2d`). CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1. `split` forces the K split; `allow_tf32` defaults to cuDNN's flag."""
    if not HAS_TRITON:
        raise RuntimeError("conv2d_triton needs triton, which is not importable here")
    b, ci, h, w = x.shape
    co, _, kh, kw = weight.shape
    ho, wo = out_size(h, w, kh, kw, stride, padding)
    out = _new_output(x, co, ho, wo)
    if out.numel() == 0:
        return out
    cfg = plan(b, ci, h, w, co, kh, kw, stride, padding, x.dtype, G.sms(x.device), split)
    # Only the top/left pad moves the window; the bottom/right one is the masks' `iy < H`, `ix < W`
    # (an asymmetric pad costs nothing: no padded copy of x).
    pad_left, _, pad_top, _ = pad4(padding)
    s = cfg["split"]
    tf32 = torch.backends.cudnn.allow_tf32 if allow_tf32 is None else allow_tf32
    # Partials in fp32, each split a dense copy of the output's layout, so the sum kernel walks them linearly.
    dest = out if s == 1 else _new_workspace(s * out.numel(), x.device)
    so = out.stride()
    # Without a bias, any valid pointer that is never read; an input, not the output, so that tracing
    # (torch.compile's view of which kernel arguments are written) sees no aliasing.
    bias_t = bias.contiguous() if bias is not None else x
    grid = (triton.cdiv(b * ho * wo, cfg["BLOCK_M"]), triton.cdiv(co, cfg["BLOCK_N"]), s)
    soft_bf16 = x.device.type == "cpu"
    wrap_triton(_conv_gemm_kernel)[grid](
        x, weight, bias_t, dest, ci, h, w, co, ho, wo, b * ho * wo, *x.stride(), *weight.stride(), *so,
        out.numel(), cfg["blocks_per_split"], KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=pad_top,
        PW=pad_left, HAS_BIAS=bias is not None and s == 1, M_FAST=x.stride(3) == 1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SOFT_BF16=soft_bf16,
        **dot_flags(x.dtype, x.device, tf32), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if s > 1:
        n = out.numel()
        wrap_triton(G.split_sum_kernel)[(triton.cdiv(n, G.SUM_BLOCK),)](
            dest, bias_t, out, n, co, ho * wo, s, CHANNELS_LAST=out_format(x) == torch.channels_last,
            HAS_BIAS=bias is not None, BLOCK=G.SUM_BLOCK, SOFT_BF16=soft_bf16, num_warps=4)
    return out


# --- the torch.library op ------------------------------------------------------------------------
def _reference_out(x, weight, bias, stride, padding):
    left, right, top, bottom = pad4(padding)
    if left == right and top == bottom:  # a symmetric 4-value pad: F.conv2d pads it without a copy
        padding = (top, left)
    # Asymmetric (the DDPM Downsample's (0, 1, 0, 1)): the spec's F.pad copy, then cuDNN / oneDNN.
    return _ref.conv2d(x, weight, bias, stride, padding)


def _fake(x, weight, bias, stride, padding):
    ho, wo = out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    return _new_output(x, weight.shape[0], ho, wo)


def _conv2d_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                 padding: List[int]) -> torch.Tensor:
    # torch.compile traces this body: CPU tensors and shapes outside the rule trace cuDNN's conv.
    if use_triton(x, weight, stride, padding):
        return conv2d_triton(x, weight, bias, stride, padding)
    return _reference_out(x, weight, bias, stride, padding)


_conv2d_op = define_op("conv2d", _conv2d_body, _reference_out, _fake)


def _check(x, weight, bias, stride, padding) -> None:
    check_conv_args("conv2d", x, weight, bias, stride, padding, "oi")
    ho, wo = out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: a {weight.shape[2]}x{weight.shape[3]} kernel does not fit the "
                         f"{x.shape[2]}x{x.shape[3]} input with padding {padding}")


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int]) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (zero padding, no dilation, one group), on the fast
    path's kernel where `use_triton` picks it and cuDNN elsewhere.

    x: [B, C_in, H, W]; weight: [C_out, C_in, KH, KW], both float32/float16/bfloat16 of one dtype and
    device; bias: [C_out] or None; stride: an (h, w) pair; padding: an (h, w) pair or four values (left,
    right, top, bottom), F.pad's order (the DDPM Downsample's (0, 1, 0, 1)). The output keeps x's layout
    (NCHW or channels_last). Not differentiable (inference op).
    """
    if isinstance(x, torch.Tensor) and x.is_cpu:  # a call the sampler's packing scope checked and ran before
        y = _cpu_conv.conv2d_repeat(x, weight, bias, stride, padding)
        if y is not None:
            return y
    given = stride, padding
    stride, padding = _pair("stride", stride), _pair("padding", padding, allow_four=True)
    _check(x, weight, bias, stride, padding)
    if not use_triton(x, weight, stride, padding):
        # cuDNN / oneDNN called directly: the op's own non-Triton branch, without the custom op's Python
        # dispatch (~10 us per call on the dev CPU, more on the GPU machine's host), as eager use of the
        # fused UNet would otherwise pay it on every conv. Inside the fast sampler's packing scope a
        # CPU conv runs oneDNN on a weight packed once for the run (ops/_cpu_conv.py).
        left, right, top, bottom = pad4(padding)
        if x.device.type == "cpu" and left == right and top == bottom:
            y = _cpu_conv.conv2d_packed(x, weight, bias, stride, (top, left))
            if y is not None:
                _cpu_conv.remember_conv2d(x, weight, bias, *given, stride, (top, left))
                return y
        return _reference_out(x, weight, bias, stride, padding)
    if plain_eager(x, weight, bias):  # see ops/_eager.py
        return conv2d_triton(x, weight, bias, stride, padding)
    return torch.ops.ddpm_fast.conv2d(x, weight, bias, stride, padding)
