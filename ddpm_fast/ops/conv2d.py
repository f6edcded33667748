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

import operator
from typing import List, Optional, Sequence

import torch

from ..reference import functional as _ref
from ._eager import autocast_hint, plain_eager
from .attention import _pow2_clamp, _sm_count
from .groupnorm_swish import _out_format, span

try:  # The package must import (and fall back to cuDNN / the reference) where triton is missing.
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    from .attention import _dot, _dot_flags
    from .groupnorm_swish import _round_to

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

__all__ = ["conv2d", "conv2d_triton", "plan", "use_triton", "prefers_triton", "unet_conv_shapes", "HAS_TRITON"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Aim at this many programs per SM when splitting K (enough to hide one program's load latency behind
# another's math), and give each split at least MIN_BLOCKS_PER_SPLIT K blocks so the fp32 partial it
# writes stays small next to the work it does. First guesses, to be tuned with bench_conv2d.py.
PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 4
# The SM count plans assume off the GPU (CPU tests, the interpreter): an H100's.
DEFAULT_SMS = 132
# Elements per program of the split-sum kernel.
SUM_BLOCK = 1024
# int32 offsets inside the kernels: tensors at least this large take cuDNN instead.
MAX_ELEMENTS = 2 ** 31 - 1
# "auto" follows use_triton(); "triton" or "cudnn" force one backend for CUDA tensors (benchmarks, tests).
BACKEND = "auto"
# The rule's two knobs: the dtypes the kernel takes by default (exact fp32 only until a GPU run shows
# it beating cuDNN elsewhere, e.g. bf16 at batch 1 where cuDNN adds two layout transposes per conv) and
# the tile count (64 x 64 output tiles, as a fraction of the SMs) below which cuDNN cannot fill the GPU.
TRITON_DTYPES = (torch.float32,)
MAX_TILES_PER_SM = 1.0


def out_size(h: int, w: int, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int]) -> tuple:
    return (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan(batch: int, c_in: int, h: int, w: int, c_out: int, kh: int, kw: int, stride: Sequence[int],
         padding: Sequence[int], dtype: torch.dtype, sms: int = DEFAULT_SMS, split: Optional[int] = None) -> dict:
    """Tile sizes and K split for one conv: BLOCK_M (pixels), BLOCK_N (output channels), BLOCK_K (input
    channels per tap), the number of K splits and K blocks per split. `split` forces the split count."""
    ho, wo = out_size(h, w, kh, kw, stride, padding)
    m = batch * ho * wo
    block_m = _pow2_clamp(m, 16, 64)
    block_n = _pow2_clamp(c_out, 16, 64)
    # fp32 runs on the CUDA cores (IEEE): a shallower K block keeps the operand tiles in registers.
    block_k = _pow2_clamp(c_in, 16, 32 if dtype == torch.float32 else 64)
    n_kblocks = kh * kw * triton.cdiv(c_in, block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(c_out, block_n)
    if split is None:
        want = PROGRAMS_PER_SM * sms
        split = 1 if tiles >= sms else min(triton.cdiv(want, tiles), max(1, n_kblocks // MIN_BLOCKS_PER_SPLIT))
    split = max(1, min(int(split), n_kblocks))
    per_split = triton.cdiv(n_kblocks, split)
    split = triton.cdiv(n_kblocks, per_split)  # no empty splits
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, split=split, blocks_per_split=per_split,
                tiles=tiles, num_warps=4, num_stages=3)


def use_triton(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
    """The dispatch rule for CUDA tensors (see the module docstring)."""
    # The kernel indexes x in int32 through its strides: a view reaching past that takes cuDNN, whatever
    # BACKEND says.
    if not HAS_TRITON or x.device.type != "cuda" or span(x) > MAX_ELEMENTS:
        return False
    if BACKEND != "auto":
        return BACKEND == "triton"
    b, _, h, w = x.shape
    ho, wo = out_size(h, w, weight.shape[2], weight.shape[3], stride, padding)
    # Fewer tiles than SMs also bounds the output (< SMs * 64 * 64) and its split-K partials (< 2 * SMs
    # copies) far below int32 offsets; x itself can still be large (a big input, a large stride).
    return prefers_triton(b * ho * wo, weight.shape[0], x.dtype, torch.backends.cudnn.allow_tf32, _sms(x.device))


def prefers_triton(pixels: int, c_out: int, dtype: torch.dtype, allow_tf32: bool, sms: int) -> bool:
    """The rule itself: convs in TRITON_DTYPES (fp32 only while TF32 is off: with TF32 on, cuDNN's
    tensor-core path is the one to beat, not measured) whose output (pixels x c_out) has fewer 64x64 tiles
    than MAX_TILES_PER_SM * SMs."""
    if dtype not in TRITON_DTYPES or (dtype == torch.float32 and allow_tf32):
        return False
    return triton.cdiv(pixels, 64) * triton.cdiv(c_out, 64) < MAX_TILES_PER_SM * sms


def _new_output(x: torch.Tensor, c_out: int, ho: int, wo: int) -> torch.Tensor:
    # x's layout when it is dense channels_last, NCHW otherwise (tests wrap this to poison the buffer).
    return torch.empty((x.shape[0], c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _new_workspace(n: int, device: torch.device) -> torch.Tensor:
    # The split-K partials (tests wrap this to poison the buffer: every element must be written).
    return torch.empty(n, dtype=torch.float32, device=device)


if HAS_TRITON:

    @triton.jit
    def _pixel_tile(M, Co, Ho, Wo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's output tile: pixel and channel indices, their masks, and each pixel's
        (image, row, column) on the Ho x Wo output grid."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        hw = Ho * Wo
        pix = offs_m % hw
        return offs_m, offs_n, offs_m < M, offs_n < Co, offs_m // hw, pix // Wo, pix % Wo

    @triton.jit
    def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_FAST: tl.constexpr):
        if M_FAST:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the transposed tile, see _tile_dot
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        return acc

    @triton.jit
    def _tile_dot(acc, x_ptr, w_ptr, x_off, w_off, ci, k_ok, row_ok, offs_n, n_ok, sx_c, sw_o, sw_i,
                  M_FAST: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """acc += one K block: input channels `ci` of one filter tap. x_off: [BLOCK_M] offsets of the tap's
        input pixel per output pixel (row_ok masks padding); w_off: the tap's offset in the weight.
        M_FAST (pixels contiguous in x): the transposed tile [channels, pixels], else [pixels, channels]."""
        if M_FAST:
            a = tl.load(x_ptr + x_off[None, :] + ci[:, None] * sx_c, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + w_off + offs_n[:, None] * sw_o + ci[None, :] * sw_i,
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            out = _dot(wt, a, acc, PREC, UPCAST)
        else:
            a = tl.load(x_ptr + x_off[:, None] + ci[None, :] * sx_c, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + w_off + ci[:, None] * sw_i + offs_n[None, :] * sw_o,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            out = _dot(a, wt, acc, PREC, UPCAST)
        return out

    @triton.jit
    def _store_tile(acc, base, b_ptr, o_m, m_ok, offs_n, n_ok, so_c, HAS_BIAS: tl.constexpr,
                    M_FAST: tl.constexpr, SOFT_BF16: tl.constexpr):
        """Write the tile (+ bias) at base + o_m (per-pixel output offsets) + channel * so_c."""
        if M_FAST:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            ptrs = base + offs_n[:, None] * so_c + o_m[None, :]
            mask = n_ok[:, None] & m_ok[None, :]
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            ptrs = base + o_m[:, None] + offs_n[None, :] * so_c
            mask = m_ok[:, None] & n_ok[None, :]
        tl.store(ptrs, _round_to(acc, base.dtype.element_ty, SOFT_BF16), mask=mask)

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
        offs_m, offs_n, m_ok, n_ok, img, oy, ox = _pixel_tile(M, Co, Ho, Wo, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        iy0 = oy * SH - PH
        ix0 = ox * SW - PW
        x_m = img * sx_n + iy0 * sx_h + ix0 * sx_w  # top-left input offset per pixel (masked below if < 0)
        ci_blocks = tl.cdiv(Ci, BLOCK_K)
        kb0 = pid_s * blocks_per_split
        kb1 = tl.minimum(kb0 + blocks_per_split, KH * KW * ci_blocks)
        acc = _zero_acc(BLOCK_M, BLOCK_N, M_FAST)
        for kb in range(kb0, kb1):
            tap = kb // ci_blocks
            ky = tap // KW
            kx = tap % KW
            ci = (kb % ci_blocks) * BLOCK_K + offs_k
            k_ok = ci < Ci
            iy = iy0 + ky
            ix = ix0 + kx
            row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # zero padding = masked loads
            acc = _tile_dot(acc, x_ptr, w_ptr, x_m + ky * sx_h + kx * sx_w, ky * sw_h + kx * sw_w, ci, k_ok,
                            row_ok, offs_n, n_ok, sx_c, sw_o, sw_i, M_FAST, PREC, UPCAST)
        o_m = img * so_n + oy * so_h + ox * so_w
        _store_tile(acc, out_ptr + pid_s * split_stride, b_ptr, o_m, m_ok, offs_n, n_ok, so_c, HAS_BIAS, M_FAST,
                    SOFT_BF16)

    @triton.jit
    def _split_sum_kernel(ws_ptr, b_ptr, y_ptr, n, C, HW, S, CHANNELS_LAST: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
        # The S fp32 partials of each output element, summed in split order (deterministic), + bias.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(S):
            acc += tl.load(ws_ptr + s * n + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            if CHANNELS_LAST:
                ch = offs % C
            else:
                ch = (offs // HW) % C
            acc += tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, _round_to(acc, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


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
    cfg = plan(b, ci, h, w, co, kh, kw, stride, padding, x.dtype, _sms(x.device), split)
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
        out.numel(), cfg["blocks_per_split"], KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0],
        PW=padding[1], HAS_BIAS=bias is not None and s == 1, M_FAST=x.stride(3) == 1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SOFT_BF16=soft_bf16,
        **_dot_flags(x.dtype, x.device, tf32), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if s > 1:
        n = out.numel()
        wrap_triton(_split_sum_kernel)[(triton.cdiv(n, SUM_BLOCK),)](
            dest, bias_t, out, n, co, ho * wo, s, CHANNELS_LAST=_out_format(x) == torch.channels_last,
            HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK, SOFT_BF16=soft_bf16, num_warps=4)
    return out


# --- the torch.library op ------------------------------------------------------------------------
def _reference_out(x, weight, bias, stride, padding):
    return _ref.conv2d(x, weight, bias, stride, padding)


def _fake(x, weight, bias, stride, padding):
    ho, wo = out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    return _new_output(x, weight.shape[0], ho, wo)


if HAS_TRITON:

    @triton_op("ddpm_fast::conv2d", mutates_args=())
    def _conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                   padding: List[int]) -> torch.Tensor:
        # torch.compile traces this body: CPU tensors and shapes outside the rule trace cuDNN's conv.
        if use_triton(x, weight, stride, padding):
            return conv2d_triton(x, weight, bias, stride, padding)
        return _reference_out(x, weight, bias, stride, padding)

    _conv2d_op.register_kernel("cpu")(_reference_out)
else:

    @torch.library.custom_op("ddpm_fast::conv2d", mutates_args=())
    def _conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                   padding: List[int]) -> torch.Tensor:
        return _reference_out(x, weight, bias, stride, padding)

_conv2d_op.register_fake(_fake)


def _pair(name: str, v) -> List[int]:
    try:
        pair = [operator.index(e) for e in v]  # 1.9 is an error, as in F.conv2d, not a silent 1
    except TypeError:
        raise TypeError(f"conv2d: {name} must be a pair of ints, got {v!r}") from None
    if len(pair) != 2:
        raise ValueError(f"conv2d: {name} must be a pair (h, w), got {list(v)}")
    return pair


def check_conv_args(op: str, x, weight, bias, stride, padding, weight_layout: str) -> None:
    """The checks conv2d and conv_transpose2d share. weight_layout: "oi" ([C_out, C_in, KH, KW], a conv)
    or "io" ([C_in, C_out, K, K], a transposed conv). Output-size checks are the caller's."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    in_dim, out_dim = (1, 0) if weight_layout == "oi" else (0, 1)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{op}: weight must be a 4-D tensor "
                         + ("[C_out, C_in, KH, KW]" if weight_layout == "oi" else "[C_in, C_out, K, K]"))
    if weight.shape[in_dim] != x.shape[1]:
        raise ValueError(f"{op}: weight expects {weight.shape[in_dim]} input channels, x has {x.shape[1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} != x dtype {x.dtype}{autocast_hint(x)}")
    if weight.device != x.device:
        raise RuntimeError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[out_dim],):
            raise ValueError(f"{op}: bias must have shape [{weight.shape[out_dim]}], got {list(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} != x dtype {x.dtype}{autocast_hint(x)}")
        if bias.device != x.device:
            raise RuntimeError(f"{op}: bias is on {bias.device} but x is on {x.device}")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: stride must be >= 1 and padding >= 0, got stride {stride}, padding {padding}")


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
    device; bias: [C_out] or None; stride, padding: (h, w) pairs. The output keeps x's layout (NCHW or
    channels_last). Not differentiable (inference op).
    """
    stride, padding = _pair("stride", stride), _pair("padding", padding)
    _check(x, weight, bias, stride, padding)
    if not use_triton(x, weight, stride, padding):
        # cuDNN / oneDNN called directly: the op's own non-Triton branch, without the custom op's Python
        # dispatch (~10 us per call on the dev CPU, more on the GPU machine's host), as eager use of the
        # fused UNet would otherwise pay it on every conv.
        return _reference_out(x, weight, bias, stride, padding)
    if plain_eager(x, weight, bias):  # see ops/_eager.py
        return conv2d_triton(x, weight, bias, stride, padding)
    return torch.ops.ddpm_fast.conv2d(x, weight, bias, stride, padding)


def unet_conv_shapes(config) -> list:
    """Every distinct (C_in, H, W, C_out, K, stride, has_bias) a UNet of `config` (a UNetConfig) feeds
    this op (K: square kernel size), largest H * W * C_out first. Measured on the meta device."""
    from ._shapes import unet_op_shapes

    def key(x, weight, bias, stride, padding):
        return (x.shape[1], x.shape[2], x.shape[3], weight.shape[0], weight.shape[2], tuple(stride)[0],
                bias is not None)

    return sorted(unet_op_shapes(config, "conv2d", key), key=lambda r: (-r[1] * r[2] * r[3], r))
