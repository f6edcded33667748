"""The implicit-GEMM machinery conv2d and conv_transpose2d share: the dispatch knobs, the tile plan
(tile sizes and the K split), the Triton tile pieces (output tile, K-block dot, store with bias) and
the split-K sum kernel, and the argument checks. See ops/conv2d.py for the why and the kernel.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence

import torch

from ._common import HAS_TRITON, OP_DTYPES, dot, pow2_clamp, round_to, sm_count, tl, triton
from ._eager import autocast_hint

__all__ = ["BACKEND", "plan", "prefers_triton", "conv_out_size", "sms", "new_workspace", "check_conv_args", "pair", "pad4"]

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


def pad4(padding: Sequence[int]) -> tuple:
    """A conv's padding as (left, right, top, bottom), F.pad's order: an (h, w) pair pads both sides."""
    if len(padding) == 4:
        return tuple(padding)
    return padding[1], padding[1], padding[0], padding[0]


def conv_out_size(h: int, w: int, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int]) -> tuple:
    """Output (H, W); padding: an (h, w) pair or (left, right, top, bottom)."""
    left, right, top, bottom = pad4(padding)
    return (h + top + bottom - kh) // stride[0] + 1, (w + left + right - kw) // stride[1] + 1


def sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan(batch: int, c_in: int, h: int, w: int, c_out: int, kh: int, kw: int, stride: Sequence[int],
         padding: Sequence[int], dtype: torch.dtype, sms: int = DEFAULT_SMS, split: Optional[int] = None) -> dict:
    """Tile sizes and K split for one conv: BLOCK_M (pixels), BLOCK_N (output channels), BLOCK_K (input
    channels per tap), the number of K splits and K blocks per split. `split` forces the split count."""
    ho, wo = conv_out_size(h, w, kh, kw, stride, padding)
    m = batch * ho * wo
    block_m = pow2_clamp(m, 16, 64)
    block_n = pow2_clamp(c_out, 16, 64)
    # fp32 runs on the CUDA cores (IEEE): a shallower K block keeps the operand tiles in registers.
    block_k = pow2_clamp(c_in, 16, 32 if dtype == torch.float32 else 64)
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


def prefers_triton(pixels: int, c_out: int, dtype: torch.dtype, allow_tf32: bool, sms: int) -> bool:
    """The rule itself: convs in TRITON_DTYPES (fp32 only while TF32 is off: with TF32 on, cuDNN's
    tensor-core path is the one to beat, not measured) whose output (pixels x c_out) has fewer 64x64 tiles
    than MAX_TILES_PER_SM * SMs."""
    if dtype not in TRITON_DTYPES or (dtype == torch.float32 and allow_tf32):
        return False
    return triton.cdiv(pixels, 64) * triton.cdiv(c_out, 64) < MAX_TILES_PER_SM * sms


def new_workspace(n: int, device: torch.device) -> torch.Tensor:
    # The split-K partials (tests wrap this to poison the buffer: every element must be written).
    return torch.empty(n, dtype=torch.float32, device=device)


if HAS_TRITON:

    @triton.jit
    def pixel_tile(M, Co, Ho, Wo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's output tile: pixel and channel indices, their masks, and each pixel's
        (image, row, column) on the Ho x Wo output grid."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        hw = Ho * Wo
        pix = offs_m % hw
        return offs_m, offs_n, offs_m < M, offs_n < Co, offs_m // hw, pix // Wo, pix % Wo

    @triton.jit
    def zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_FAST: tl.constexpr):
        if M_FAST:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the transposed tile, see tile_dot
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        return acc

    @triton.jit
    def tile_dot(acc, x_ptr, w_ptr, x_off, w_off, ci, k_ok, row_ok, offs_n, n_ok, sx_c, sw_o, sw_i,
                  M_FAST: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """acc += one K block: input channels `ci` of one filter tap. x_off: [BLOCK_M] offsets of the tap's
        input pixel per output pixel (row_ok masks padding); w_off: the tap's offset in the weight.
        M_FAST (pixels contiguous in x): the transposed tile [channels, pixels], else [pixels, channels]."""
        if M_FAST:
            a = tl.load(x_ptr + x_off[None, :] + ci[:, None] * sx_c, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + w_off + offs_n[:, None] * sw_o + ci[None, :] * sw_i,
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            out = dot(wt, a, acc, PREC, UPCAST)
        else:
            a = tl.load(x_ptr + x_off[:, None] + ci[None, :] * sx_c, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + w_off + ci[:, None] * sw_i + offs_n[None, :] * sw_o,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            out = dot(a, wt, acc, PREC, UPCAST)
        return out

    @triton.jit
    def store_tile(acc, base, b_ptr, o_m, m_ok, offs_n, n_ok, so_c, HAS_BIAS: tl.constexpr,
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
        tl.store(ptrs, round_to(acc, base.dtype.element_ty, SOFT_BF16), mask=mask)

    @triton.jit
    def split_sum_kernel(ws_ptr, b_ptr, y_ptr, n, C, HW, S, CHANNELS_LAST: tl.constexpr,
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
        tl.store(y_ptr + offs, round_to(acc, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def pair(name: str, v, allow_four: bool = False) -> List[int]:
    """An (h, w) pair of ints; with allow_four also four ints (left, right, top, bottom): conv2d's padding."""
    four = " or four (left, right, top, bottom)" if allow_four else ""
    try:
        pair = [operator.index(e) for e in v]  # 1.9 is an error, as in F.conv2d, not a silent 1
    except TypeError:
        raise TypeError(f"conv2d: {name} must be a pair of ints{four}, got {v!r}") from None
    if len(pair) != 2 and not (allow_four and len(pair) == 4):
        raise ValueError(f"conv2d: {name} must be a pair (h, w){four}, got {list(v)}")
    return pair


def check_conv_args(op: str, x, weight, bias, stride, padding, weight_layout: str) -> None:
    """The checks conv2d and conv_transpose2d share. weight_layout: "oi" ([C_out, C_in, KH, KW], a conv)
    or "io" ([C_in, C_out, K, K], a transposed conv). Output-size checks are the caller's."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in OP_DTYPES:
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
