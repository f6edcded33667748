"""The UNet's Upsample: `ddpm_fast::conv_transpose2d`, a 4x4 stride-2 padding-1 transposed convolution as
four 2x2 convolutions (one per output parity) in one split-K Triton launch, cuDNN elsewhere.

Spec: `ddpm_fast.reference.functional.conv_transpose2d` (F.conv_transpose2d, no output padding, no
dilation, one group).

Why: in the first H100 profile (cifar35m, batch 1, fp32, TF32 off) the three Upsamples ran as cuDNN FFT
and dgrad kernels (fft2d_r2c, a complex gemv, flip_filter, dgrad2d) for ~0.25 ms of a 5.3 ms forward:
small next to the convs then, ~15% of a step once `conv2d` takes the convs (see ops/conv2d.py).

Math: output row oy = 2 i + a (parity a in {0, 1}) receives input row i + dy through filter row ky with
ky = 3 - a - 2 t and dy = t - 1 + a for t in {0, 1} (the two taps of ky = oy + 1 - 2 iy that exist);
the same for columns with (b, u, kx, dx). So each parity class (a, b) is a 2x2 convolution of the input
over H x W positions: an implicit GEMM with M = B*H*W pixels, N = C_out, K = 4*C_in, as in conv2d. One
launch covers the four classes (grid axis 2 = parity x split), K is split like conv2d's (fp32 partials,
summed in split order by conv2d's split-sum kernel, which also adds the bias).

Dispatch: the same rule as conv2d (exact fp32 with fewer 64x64 output tiles than SMs per class), and
only for the Upsample's geometry (4x4, stride 2, padding 1); not yet measured on a GPU.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..reference import functional as _ref
from . import _conv_gemm as G, _cpu_conv
from ._common import HAS_TRITON, define_op, dot_flags, out_format, span, tl, triton, wrap_triton
from ._eager import plain_eager

__all__ = ["conv_transpose2d", "conv_transpose2d_triton", "supported", "use_triton",
           "HAS_TRITON"]

# The one geometry the kernel implements: the labml Upsample's ConvTranspose2d(C, C, 4, 2, 1).
KERNEL, STRIDE, PADDING = 4, 2, 1


def out_size(h: int, w: int, k: int, stride: Sequence[int], padding: Sequence[int]) -> tuple:
    return (h - 1) * stride[0] - 2 * padding[0] + k, (w - 1) * stride[1] - 2 * padding[1] + k


def supported(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
    """Whether the Triton kernel implements this geometry (4x4 filter, stride 2, padding 1)."""
    return (tuple(weight.shape[2:]) == (KERNEL, KERNEL) and tuple(stride) == (STRIDE, STRIDE)
            and tuple(padding) == (PADDING, PADDING))


def use_triton(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
    """conv2d's rule, applied per parity class (B*H*W pixels each), for the supported geometry only."""
    # int32 offsets: the input through its strides, and the output (4x the input's pixels).
    if (not HAS_TRITON or x.device.type != "cuda" or not supported(weight, stride, padding)
            or span(x) > G.MAX_ELEMENTS or 4 * x.numel() > G.MAX_ELEMENTS):
        return False
    if G.BACKEND != "auto":
        return G.BACKEND == "triton"
    b, _, h, w = x.shape
    return (G.prefers_triton(b * h * w, weight.shape[1], x.dtype, torch.backends.cudnn.allow_tf32,
                              G.sms(x.device)))


def _new_output(x: torch.Tensor, c_out: int, ho: int, wo: int) -> torch.Tensor:
    # x's layout when it is dense channels_last, NCHW otherwise (tests wrap this to poison the buffer).
    return torch.empty((x.shape[0], c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=out_format(x))


if HAS_TRITON:

    @triton.jit(do_not_specialize=["Ci", "H", "W", "Co", "M", "split_stride", "blocks_per_split", "n_split"])
    def _upsample_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, Ci, H, W, Co, M,
                              sx_n, sx_c, sx_h, sx_w, sw_i, sw_o, sw_h, sw_w, so_n, so_c, so_h, so_w,
                              split_stride, blocks_per_split, n_split,
                              HAS_BIAS: tl.constexpr, M_FAST: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                              UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr):
        # Output pixel (2i + pa, 2j + pb) of parity class (pa, pb) = sum over taps (t, u) in {0,1}^2 and
        # input channels of x[i + t - 1 + pa, j + u - 1 + pb] * w[ci, co, 3 - pa - 2t, 3 - pb - 2u].
        pid_z = tl.program_id(2)
        parity = pid_z // n_split
        pid_s = pid_z % n_split
        pa = parity // 2
        pb = parity % 2
        # Each parity class's outputs sit on the H x W grid of input positions (i, j).
        offs_m, offs_n, m_ok, n_ok, img, iy0, ix0 = G.pixel_tile(M, Co, H, W, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        ci_blocks = tl.cdiv(Ci, BLOCK_K)
        kb0 = pid_s * blocks_per_split
        kb1 = tl.minimum(kb0 + blocks_per_split, 4 * ci_blocks)
        acc = G.zero_acc(BLOCK_M, BLOCK_N, M_FAST)
        for kb in range(kb0, kb1):
            tap = kb // ci_blocks
            t = tap // 2
            u = tap % 2
            iy = iy0 + (t - 1 + pa)
            ix = ix0 + (u - 1 + pb)
            ci = (kb % ci_blocks) * BLOCK_K + offs_k
            k_ok = ci < Ci
            row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            w_off = (3 - pa - 2 * t) * sw_h + (3 - pb - 2 * u) * sw_w
            acc = G.tile_dot(acc, x_ptr, w_ptr, img * sx_n + iy * sx_h + ix * sx_w, w_off, ci, k_ok, row_ok,
                            offs_n, n_ok, sx_c, sw_o, sw_i, M_FAST, PREC, UPCAST)
        o_m = img * so_n + (2 * iy0 + pa) * so_h + (2 * ix0 + pb) * so_w
        G.store_tile(acc, out_ptr + pid_s * split_stride, b_ptr, o_m, m_ok, offs_n, n_ok, so_c, HAS_BIAS,
                    M_FAST, SOFT_BF16)


def conv_transpose2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            stride: Sequence[int] = (STRIDE, STRIDE), padding: Sequence[int] = (PADDING, PADDING),
                            split: Optional[int] = None, allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """Raw Triton launcher (no input validation; use `conv_transpose2d`) for the supported geometry.
    CUDA tensors, or CPU ones under TRITON_INTERPRET=1. `split` forces the K split per parity class."""
    if not HAS_TRITON:
        raise RuntimeError("conv_transpose2d_triton needs triton, which is not importable here")
    if not supported(weight, stride, padding):
        raise ValueError("conv_transpose2d_triton implements only a 4x4 filter with stride 2 and padding 1")
    b, ci, h, w = x.shape
    co = weight.shape[1]
    ho, wo = out_size(h, w, KERNEL, stride, padding)
    out = _new_output(x, co, ho, wo)
    if out.numel() == 0:
        return out
    # Per parity class: a 2x2 "conv" over the h x w input positions (planned as a 2x2 conv of an
    # (h+1) x (w+1) input, which has h x w outputs; only the tiles and the split are taken from it). The
    # four classes share the GPU, so each plans for a quarter of the SMs.
    cfg = G.plan(b, ci, h + 1, w + 1, co, 2, 2, (1, 1), (0, 0), x.dtype, max(1, G.sms(x.device) // 4),
                     split)
    s = cfg["split"]
    tf32 = torch.backends.cudnn.allow_tf32 if allow_tf32 is None else allow_tf32
    dest = out if s == 1 else G.new_workspace(s * out.numel(), x.device)
    bias_t = bias.contiguous() if bias is not None else x  # never read without a bias (an input: no aliasing)
    m = b * h * w
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(co, cfg["BLOCK_N"]), 4 * s)
    soft_bf16 = x.device.type == "cpu"
    wrap_triton(_upsample_gemm_kernel)[grid](
        x, weight, bias_t, dest, ci, h, w, co, m, *x.stride(), *weight.stride(), *out.stride(), out.numel(),
        cfg["blocks_per_split"], s, HAS_BIAS=bias is not None and s == 1, M_FAST=x.stride(3) == 1,
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
    y = _ref.conv_transpose2d(x, weight, bias, stride, padding)
    fmt = out_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def _fake(x, weight, bias, stride, padding):
    ho, wo = out_size(x.shape[2], x.shape[3], weight.shape[2], stride, padding)
    return _new_output(x, weight.shape[1], ho, wo)


def _conv_transpose2d_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           stride: List[int], padding: List[int]) -> torch.Tensor:
    if use_triton(x, weight, stride, padding):
        return conv_transpose2d_triton(x, weight, bias, stride, padding)
    return _reference_out(x, weight, bias, stride, padding)


_conv_transpose2d_op = define_op("conv_transpose2d", _conv_transpose2d_body, _reference_out, _fake)


def _check(x, weight, bias, stride, padding) -> None:
    G.check_conv_args("conv_transpose2d", x, weight, bias, stride, padding, "io")
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"conv_transpose2d: weight must have a square filter, got {list(weight.shape[2:])}")
    ho, wo = out_size(x.shape[2], x.shape[3], weight.shape[2], stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv_transpose2d: padding {padding} leaves no output for a {x.shape[2]}x{x.shape[3]} input")


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                     padding: Sequence[int]) -> torch.Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding) (no output padding, no dilation, one group), on
    the fast path's kernel where `use_triton` picks it (the Upsample's 4x4 / 2 / 1 geometry) and cuDNN
    elsewhere.

    x: [B, C_in, H, W]; weight: [C_in, C_out, K, K], both float32/float16/bfloat16 of one dtype and
    device; bias: [C_out] or None; stride, padding: (h, w) pairs. The output keeps x's layout (NCHW or
    channels_last). Not differentiable (inference op).
    """
    stride = G.pair("stride", stride)
    padding = G.pair("padding", padding)
    _check(x, weight, bias, stride, padding)
    if not use_triton(x, weight, stride, padding):  # direct call, as in conv2d
        y = _cpu_conv.conv_transpose2d_packed(x, weight, bias, stride, padding) if x.device.type == "cpu" else None
        return y if y is not None else _reference_out(x, weight, bias, stride, padding)
    if plain_eager(x, weight, bias):  # see ops/_eager.py
        return conv_transpose2d_triton(x, weight, bias, stride, padding)
    return torch.ops.ddpm_fast.conv_transpose2d(x, weight, bias, stride, padding)
