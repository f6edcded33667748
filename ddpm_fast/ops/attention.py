"""Fused AttentionBlock: `ddpm_fast::attention`, the fast path of `reference.functional.attention`.

The block is three launches, none of which makes a layout copy (with the Triton core):

1. qkv = tokens @ proj_weight^T on cuBLAS (no bias). x is read in place as the transposed operand
   x.reshape(B, C, N)^T, so the NCHW -> tokens permute costs nothing. This is the biggest GEMM of
   the block (3 * heads * d_k outputs per token) and has no epilogue left to fuse (its bias is
   folded into step 2), so nothing is gained by writing it in Triton, and cuBLAS's tuned kernels
   are the safer bet for speed across batch sizes (C up to 1024, 3 * C outputs).
2. The attention core, a flash-attention style Triton kernel over strided q/k/v views of qkv
   (labml's per-head interleaving: the row of head h is [q_h | k_h | v_h], each d_k wide). Online
   softmax in fp32, no N x N matrix in memory. The projection bias is added to q and k tiles as they
   are loaded, and to the output (softmax rows sum to 1, so P (V + 1 b^T) = P V + 1 b^T). The head
   dimension is tiled (d_k = 1024 in labml-cifar32): QK^T accumulates over BLOCK_DK chunks, and each
   program owns a BLOCK_DV slice of the output, recomputing the scores per slice. That recompute is
   cheap exactly where it is used (few tokens, or a grid too small to fill the GPU) and keeps the
   fp32 accumulator in registers. The output is written token-major [B, N, heads * d_k].
3. The output projection in Triton, with bias + residual + NCHW store in its epilogue. On cuBLAS this
   would be a GEMM (+ bias), a residual-add pass and a token-major -> NCHW copy: two extra reads
   and writes of [B, C, N] and two extra launches; here it is one kernel. The GEMM is small (C <= 1024
   outputs per token, K = heads * d_k), a size where a plain tl.dot tile loop should run close to
   cuBLAS, so the fused epilogue is expected to win (bench_attention.py measures it).
   The residual it adds is x, or the op's `residual` argument when given (the DDPM UNet's block feeds
   GroupNorm(h) as x and adds h): the same read in the same epilogue, either way no extra pass.

SDPA dispatch: `core_backend` is the one place that picks the core. fp32 blocks above a measured work
size run the core on SDPA (the Triton core's IEEE-fp32 dots lose to it there, see FP32_SDPA_MIN_WORK);
`SDPA_CORE_SHAPES` names further (tokens, d_k, dtype) shapes that a GPU measurement sends to SDPA at every
batch. There the core runs through F.scaled_dot_product_attention and steps 1 and 3 stay as above.

Numerics: scores, scale and softmax in fp32; P is rounded to the input dtype for the P V product (as
flash-attention does); fp32 inputs use IEEE fp32 dots unless torch allows TF32 for matmuls.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference import functional as ref
from ._common import (HAS_TRITON, OP_DTYPES, define_op, dot, dot_flags, new_output, out_format, pow2_clamp, sm_count, tl, triton,
                      wrap_triton)
from . import _cpu_conv
from ._cpu_kernels import direct_op, out_op
from ._eager import autocast_hint, plain_eager


__all__ = ["attention", "attention_cpu", "attention_triton", "flash_attention_triton", "core_backend", "SDPA_CORE_SHAPES",
           "HAS_TRITON"]

_DTYPES = OP_DTYPES
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# SDPA dispatch: the one place that decides which core runs at a shape.
# Key: (tokens N, head width d_k, dtype). Value: the measurement that decided it, e.g.
#   "H100 bf16 B=64: sdpa 41.0 us vs triton 55.2 us (benchmarks/results/attention-<date>.json)".
# Add a row only for a shape where sdpa beat triton at every benchmarked batch, timed on the GPU's
# own clock (CUDA graphs: test_attention_block's *-graph providers). Eager timings of the core
# (test_attention_core) are host-bound on the H100 machines (~200 us per Triton launch sequence vs
# ~10 us for SDPA) and say nothing about the kernels.
# ---------------------------------------------------------------------------------------------
SDPA_CORE_SHAPES: Dict[Tuple[int, int, torch.dtype], str] = {}

# fp32 rule, from the H100 run of 2026-11-26 (benchmarks/results/gpu-2026-11-26/bench-ops.md, whole
# block in a CUDA graph, fast-graph vs sdpa-graph; work = batch * heads * tokens^2 * d_k):
#   SDPA faster:  N=256 d=256 B=64 (0.41x), N=256 d=256 B=1 (0.84x, work 2^24), N=256 d=128 B=64 (0.52x),
#                 N=16 d=1024 B=64 (0.66x, 2^24), N=16 d=256 B=64 (0.94x, 2^22)
#   Triton faster: N=16 d=1024 B=1 (1.23x, 2^18), N=16 d=256 B=1 (1.33x), N=16 d=128 B=64 (1.07x, 2^21),
#                 N=64 d=64 B=64 (1.09x, 2^24: narrow heads do not recompute scores per d_v slice), and
#                 every d_k <= 64 case; a tie at N=256 d=128 B=1 (1.02x for Triton, 2^23).
# So fp32 with d_k >= 128 and work >= 2^22 goes to SDPA; fp16/bf16 stay on Triton (it won every case).
FP32_SDPA_MIN_DK = 128
FP32_SDPA_MIN_WORK = 1 << 22


def core_backend(n_tokens: int, d_k: int, dtype: torch.dtype, batch_heads: int = 1) -> str:
    """'sdpa' where measurements say SDPA's core is faster (see above), else 'triton'.

    batch_heads: batch size times heads of the call (the fp32 rule depends on the work per call).
    """
    n_tokens, d_k = int(n_tokens), int(d_k)
    if (n_tokens, d_k, dtype) in SDPA_CORE_SHAPES:
        return "sdpa"
    if dtype == torch.float32 and d_k >= FP32_SDPA_MIN_DK and \
            int(batch_heads) * n_tokens * n_tokens * d_k >= FP32_SDPA_MIN_WORK:
        return "sdpa"
    return "triton"


# ---------------------------------------------------------------------------------------------
# Tile choice. Not autotuned: the block is called ~10^5 times per sampling run and must be
# capturable, so the config is a pure function of the shape. Unmeasured heuristics, to be tuned
# with benchmarks/bench_attention.py on the GPU.
# ---------------------------------------------------------------------------------------------
def _programs_wanted(device: torch.device) -> int:
    # On the GPU: one program per SM at least (small-batch sampling leaves most SMs idle otherwise).
    # On the CPU interpreter, fewer, bigger programs run faster, so ask for no split at all.
    if device.type != "cuda":
        return 1
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _flash_config(bh: int, n_q: int, n_kv: int, d: int, dtype: torch.dtype, programs: int) -> dict:
    block_m = pow2_clamp(n_q, 16, 64)
    block_n = pow2_clamp(n_kv, 16, 64)
    # q chunk stays in registers when d fits one chunk; fp32 tiles are twice the bytes, so half as wide.
    block_dk = pow2_clamp(d, 16, 64 if dtype == torch.float32 else 128)
    # Output slice: up to 256 columns (a 64 x 256 fp32 accumulator is 64 registers a thread at 8
    # warps); fp32 V tiles are twice the shared memory, so 128.
    block_dv = pow2_clamp(d, 16, 128 if dtype == torch.float32 else 256)

    def grid_size() -> int:
        return triton.cdiv(n_q, block_m) * triton.cdiv(d, block_dv) * bh

    # Too few programs for the GPU: split the output columns first (costs a score recompute per
    # split), then the query rows.
    while grid_size() < programs:
        if block_dv > 64:
            block_dv //= 2
        elif block_m > 16:
            block_m //= 2
        elif block_dv > 32:
            block_dv //= 2
        else:
            break
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv)


_SMEM_BUDGET = 160 * 1024  # of the H100's 227 KB a block may use: headroom for layout-conversion scratch


def _flash_launch_params(cfg: dict, d: int, esize: int) -> dict:
    """NUM_DK, warps and pipeline depth for a tile choice.

    Triton pipelines only the innermost loop: the key loop (K and V tiles) when the head fits one
    chunk, else the head-dim loop (q and k chunks, V then single-buffered). Stages are cut until the
    buffers fit the shared-memory budget.
    """
    bm, bn, bdk, bdv = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_DK"], cfg["BLOCK_DV"]
    num_dk = triton.cdiv(d, bdk)
    if num_dk == 1:
        fixed, per_stage = bm * bdk * esize, bn * (bdk + bdv) * esize
    else:
        fixed, per_stage = bn * bdv * esize, (bm + bn) * bdk * esize
    stages = 3
    while stages > 1 and fixed + stages * per_stage > _SMEM_BUDGET:
        stages -= 1
    return dict(NUM_DK=num_dk, num_warps=8 if bm * bdv >= 64 * 128 else 4, num_stages=stages)


def _out_proj_config(b: int, n: int, c: int, dtype: torch.dtype, programs: int) -> dict:
    block_t = pow2_clamp(n, 16, 64)
    block_k = 32 if dtype == torch.float32 else 64
    block_c = 64
    while block_c > 16 and triton.cdiv(c, block_c) * triton.cdiv(n, block_t) * b < programs:
        block_c //= 2
    return dict(BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=4)


if HAS_TRITON:

    @triton.jit
    def _load_rows(base, rows, cols, s_row, s_col, row_ok, col_ok, bias_base, s_bias, HAS_BIAS: tl.constexpr):
        """A [rows, cols] tile (zero outside the masks), plus a per-column bias added in fp32."""
        t = tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_base + cols * s_bias, mask=col_ok, other=0.0)
            t = (t.to(tl.float32) + bias.to(tl.float32)[None, :]).to(t.dtype)
        return t

    @triton.jit
    def _flash_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, qb_ptr, kb_ptr, vb_ptr,
        s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
        s_qbh, s_qbd, s_kbh, s_kbd, s_vbh, s_vbd,
        n_heads, n_q, n_kv, head_dim, qk_scale,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, NUM_DK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Program (query block, output-column block, batch * head).
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        pid_bh = tl.program_id(2)
        b = (pid_bh // n_heads).to(tl.int64)  # batch offsets can pass 2^31 elements
        h = pid_bh % n_heads
        q_base = q_ptr + b * s_qb + h * s_qh
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        qb_base = qb_ptr + h * s_qbh
        kb_base = kb_ptr + h * s_kbh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_DK)
        m_ok = offs_m < n_q
        v_ok = offs_v < head_dim

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        if NUM_DK == 1:  # the whole head fits one chunk: load q once, keep it in registers
            q_res = _load_rows(q_base, offs_m, offs_k, s_qn, s_qd, m_ok, offs_k < head_dim,
                               qb_base, s_qbd, HAS_BIAS)
        for n0 in range(0, n_kv, BLOCK_N):
            offs_kv = n0 + offs_n
            n_ok = offs_kv < n_kv
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if NUM_DK == 1:
                k = _load_rows(k_base, offs_kv, offs_k, s_kn, s_kd, n_ok, offs_k < head_dim,
                               kb_base, s_kbd, HAS_BIAS)
                s = dot(q_res, tl.trans(k), s, PREC, UPCAST)
            else:  # wide heads: accumulate q k^T over head-dim chunks (q chunks come from L1/L2)
                for c in range(NUM_DK):
                    dk = c * BLOCK_DK + offs_k
                    dk_ok = dk < head_dim
                    q = _load_rows(q_base, offs_m, dk, s_qn, s_qd, m_ok, dk_ok, qb_base, s_qbd, HAS_BIAS)
                    k = _load_rows(k_base, offs_kv, dk, s_kn, s_kd, n_ok, dk_ok, kb_base, s_kbd, HAS_BIAS)
                    s = dot(q, tl.trans(k), s, PREC, UPCAST)
            # Online softmax in base 2: the scale carries log2(e), all in fp32.
            # fp32 scale: torch.compile hands Python floats to Triton kernels as fp64 scalars, which would
            # turn the softmax state (and the accumulator) fp64.
            s = tl.where(n_ok[None, :], s * tl.full([], qk_scale, tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_kv[:, None] * s_vn + offs_v[None, :] * s_vd,
                        mask=n_ok[:, None] & v_ok[None, :], other=0.0)
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
            m_i = m_new

        out = acc / l_i[:, None]
        if HAS_BIAS:  # v's bias passes through the (row-stochastic) softmax unchanged
            out += tl.load(vb_ptr + h * s_vbh + offs_v * s_vbd, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        o_base = o_ptr + b * s_ob + h * s_oh
        tl.store(o_base + offs_m[:, None] * s_on + offs_v[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & v_ok[None, :])

    @triton.jit
    def _out_proj_residual_kernel(
        o_ptr, w_ptr, bias_ptr, x_ptr, y_ptr,
        s_ob, s_on, s_ok, s_wc, s_wk, s_bias, s_xb, s_xc, s_xn, s_yb, s_yc, s_yn,
        n_chan, n_tokens, k_dim,
        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # y[b, c, t] = x[b, c, t] + bias[c] + sum_k w[c, k] o[b, t, k]: a [channels, tokens] tile of
        # the NCHW output, so the store (and the residual read) run along contiguous tokens.
        pid_c = tl.program_id(0)
        pid_t = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)
        c_ok = offs_c < n_chan
        t_ok = offs_t < n_tokens
        o_base = o_ptr + b * s_ob
        acc = tl.zeros([BLOCK_C, BLOCK_T], tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_dim
            w = tl.load(w_ptr + offs_c[:, None] * s_wc + kk[None, :] * s_wk,
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            o = tl.load(o_base + kk[:, None] * s_ok + offs_t[None, :] * s_on,
                        mask=k_ok[:, None] & t_ok[None, :], other=0.0)
            acc = dot(w, o, acc, PREC, UPCAST)
        mask = c_ok[:, None] & t_ok[None, :]
        bias = tl.load(bias_ptr + offs_c * s_bias, mask=c_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * s_xb + offs_c[:, None] * s_xc + offs_t[None, :] * s_xn, mask=mask, other=0.0)
        y = acc + bias[:, None] + x.to(tl.float32)
        tl.store(y_ptr + b * s_yb + offs_c[:, None] * s_yc + offs_t[None, :] * s_yn,
                 y.to(y_ptr.dtype.element_ty), mask=mask)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable here; use ddpm_fast.ops.attention (reference fallback)")


def _check_bias(name: str, t: Optional[torch.Tensor], heads: int, d: int, like: torch.Tensor) -> None:
    if t is not None and (tuple(t.shape) != (heads, d) or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"flash_attention_triton: {name} must be [{heads}, {d}] {like.dtype} on {like.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                           q_bias: Optional[torch.Tensor] = None, k_bias: Optional[torch.Tensor] = None,
                           v_bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                           block_m: Optional[int] = None, block_n: Optional[int] = None,
                           block_dk: Optional[int] = None, block_dv: Optional[int] = None) -> torch.Tensor:
    """softmax((q + q_bias)(k + k_bias)^T * scale) (v + v_bias) with the Triton core.

    q: [B, H, Nq, d], k and v: [B, H, Nk, d], any strides; the biases (all three or none): [H, d].
    out: optional [B, H, Nq, d] buffer to write (any strides); otherwise one is allocated
    token-major, i.e. the returned [B, H, Nq, d] tensor is a view of a contiguous [B, Nq, H, d].
    block_*: override the tile sizes (powers of two >= 16), for tests of the tiling paths.
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    _require_triton()
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention_triton: q, k, v must be 4-D [B, H, N, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, heads, n_q, d = q.shape
    n_kv = k.shape[2]
    if tuple(k.shape) != (bsz, heads, n_kv, d) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"flash_attention_triton: k and v must be [{bsz}, {heads}, Nk, {d}] alike, got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attention_triton: q, k, v must share one of {_DTYPES}, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise RuntimeError(f"flash_attention_triton: q, k, v on different devices: "
                           f"{q.device}, {k.device}, {v.device}")
    has_bias = q_bias is not None or k_bias is not None or v_bias is not None
    if has_bias:
        if q_bias is None or k_bias is None or v_bias is None:
            raise ValueError("flash_attention_triton: give all of q_bias, k_bias, v_bias or none")
        for name, t in (("q_bias", q_bias), ("k_bias", k_bias), ("v_bias", v_bias)):
            _check_bias(name, t, heads, d, q)
    if out is None:
        out = torch.empty((bsz, n_q, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"flash_attention_triton: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    if n_kv == 0:
        raise ValueError("flash_attention_triton: softmax over zero keys is undefined (Nk == 0)")

    cfg = _flash_config(bsz * heads, n_q, n_kv, d, q.dtype, _programs_wanted(q.device))
    for key, val in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_DK", block_dk), ("BLOCK_DV", block_dv)):
        if val is not None:
            if val < 16 or val & (val - 1):
                raise ValueError(f"flash_attention_triton: {key.lower()} must be a power of two >= 16, got {val}")
            cfg[key] = val
    launch = _flash_launch_params(cfg, d, q.element_size())
    qb, kb, vb = (q_bias, k_bias, v_bias) if has_bias else (q, q, q)  # unused pointers when no bias
    sb = [s for t in (qb, kb, vb) for s in ((t.stride(0), t.stride(1)) if has_bias else (0, 0))]
    grid = (triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DV"]), bsz * heads)
    wrap_triton(_flash_attn_fwd_kernel)[grid](
        q, k, v, out, qb, kb, vb, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sb,
        heads, n_q, n_kv, d, float(scale) * _LOG2E,
        HAS_BIAS=has_bias, **cfg, **launch, **dot_flags(q.dtype, q.device))
    return out


def _qkv_projection(x3: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """tokens @ weight^T (+ bias) -> [B, N, 3 * heads * d_k], reading x3 = [B, C, N] in place."""
    bsz, c, n = x3.shape
    tokens = x3.transpose(1, 2)  # [B, N, C] view: a transposed operand for cuBLAS, no copy
    wt = weight.t()
    if tokens.stride(0) == n * tokens.stride(1):  # channels_last input: one [B*N, C] GEMM
        flat = tokens.reshape(bsz * n, c)
        qkv = torch.mm(flat, wt) if bias is None else torch.addmm(bias, flat, wt)
        return qkv.view(bsz, n, -1)
    wt = wt.expand(bsz, c, wt.shape[1])  # stride-0 batch: a strided-batched GEMM, weight read once per batch
    return torch.bmm(tokens, wt) if bias is None else torch.baddbmm(bias, tokens, wt)


def attention_triton(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                     out_weight: torch.Tensor, out_bias: torch.Tensor, n_heads: int, d_k: int, *,
                     core: Optional[str] = None, out: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fast block (see the module docstring) without input validation: call `attention` instead.

    core: None (`core_backend` decides), "triton" or "sdpa".
    residual: [B, C, H, W] (any strides whose H and W merge) added in the out-projection epilogue in
    place of x (the DDPM block: x is the GroupNorm of `residual`); None adds x.
    out: optional [B, C, H, W] buffer to write (any strides); otherwise a contiguous one is allocated.
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    _require_triton()
    bsz, c, hgt, wid = x.shape
    n = hgt * wid
    hd = n_heads * d_k
    if out is None:
        out = torch.empty((bsz, c, hgt, wid), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if core is None:
        core = core_backend(n, d_k, x.dtype, bsz * n_heads)
    if core not in ("triton", "sdpa"):
        raise ValueError(f"attention_triton: core must be None, 'triton' or 'sdpa', got {core!r}")
    x3 = x.reshape(bsz, c, n)  # a view for NCHW and channels_last inputs
    # What the epilogue adds: read in place through its strides, like x (no extra pass).
    r3 = x3 if residual is None else residual.reshape(bsz, c, n)
    scale = d_k ** -0.5

    if core == "triton":
        qkv = _qkv_projection(x3, proj_weight, None).view(bsz, n, n_heads, 3, d_k)
        pb = proj_bias.view(n_heads, 3, d_k)
        o_tok = torch.empty((bsz, n, n_heads, d_k), dtype=x.dtype, device=x.device)
        flash_attention_triton(qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2),
                               qkv[:, :, :, 2].transpose(1, 2), scale,
                               q_bias=pb[:, 0], k_bias=pb[:, 1], v_bias=pb[:, 2], out=o_tok.transpose(1, 2))
        o_tok = o_tok.view(bsz, n, hd)
    else:
        qkv = _qkv_projection(x3, proj_weight, proj_bias).view(bsz, n, n_heads, 3, d_k)
        o = F.scaled_dot_product_attention(qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2),
                                           qkv[:, :, :, 2].transpose(1, 2), scale=scale)
        o_tok = o.transpose(1, 2).reshape(bsz, n, hd)  # a view when SDPA returns token-major storage

    try:
        y3 = out.view(bsz, c, n)  # NCHW and channels_last buffers both merge H and W
    except RuntimeError:
        raise ValueError(f"attention_triton: out's H and W dims cannot be merged "
                         f"(strides {out.stride()})") from None
    cfg = _out_proj_config(bsz, n, c, x.dtype, _programs_wanted(x.device))
    num_warps = cfg.pop("num_warps")
    grid = (triton.cdiv(c, cfg["BLOCK_C"]), triton.cdiv(n, cfg["BLOCK_T"]), bsz)
    wrap_triton(_out_proj_residual_kernel)[grid](
        o_tok, out_weight, out_bias, r3, y3, *o_tok.stride(), *out_weight.stride(), out_bias.stride(0),
        *r3.stride(), *y3.stride(), c, n, hd, **cfg, **dot_flags(x.dtype, x.device), num_warps=num_warps)
    return out


# ---------------------------------------------------------------------------------------------
# The torch.library op and its wrapper.
# ---------------------------------------------------------------------------------------------
def _reference_out(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual=None):
    # The reference returns a channels_last-strided view of its permute; the op promises x's layout.
    y = ref.attention(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual)
    return y.contiguous(memory_format=out_format(x))


def _new_output(x: torch.Tensor) -> torch.Tensor:
    # x's layout (dense channels_last stays so, NCHW otherwise): a channels_last UNet keeps its layout
    # through the attention blocks instead of switching back and forth around each.
    return new_output(x)


def _fake(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual=None):
    return _new_output(x)


_CORE_OUT = out_op("attention_core")  # the C++ short-sequence core (csrc/attention_core_cpu.cpp), or None
_CORE_DIRECT = direct_op("attention_core")
# Up to this many tokens the C++ core beats ATen's SDPA plus the transposing copy after it (2-core dev VM,
# fp32 / bf16: 16 tokens x d_k 128, batch 16: 18 / 17 us vs 30 / 37 us; 64 x 64: 94 / 111 vs 141 / 153 us;
# 4 heads of 64 x 32: 76 / 91 vs 74 / 103 us); at 256 tokens it is 1.4-1.8x slower (no flash tiling).
CORE_MAX_TOKENS = 64


def _cpp_core(qkv: torch.Tensor, bsz: int, n: int, n_heads: int, d_k: int) -> Optional[torch.Tensor]:
    """softmax(q k^T / sqrt(d_k)) v from the qkv GEMM's [B*N, 3*heads*d_k] rows, token-major [B*N, heads*d_k]
    (the out projection's input), or None where the C++ core does not apply (no extension, long sequences)."""
    if _CORE_OUT is None or n > CORE_MAX_TOKENS:
        return None
    o = torch.empty((bsz * n, n_heads * d_k), dtype=qkv.dtype)
    (_CORE_DIRECT if plain_eager(qkv) else _CORE_OUT)(qkv, bsz, n_heads, d_k, d_k ** -0.5, o)
    return o


def attention_cpu(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual=None):
    """The block on CPU: one GEMM for q, k, v (reading x in place; inside the fast sampler's packing
    scope, for channels_last x, a 1x1 conv on the weight packed once, as is the out projection: ~2% of
    an fp32 digits16 forward on the dev VM, within the noise in bf16), the core (up to CORE_MAX_TOKENS
    tokens the C++ kernel, which writes the out projection's token-major input directly; longer
    sequences ATen's fused SDPA: fp32 softmax statistics, no [N, N] score tensor in memory, then a
    transposing copy), one GEMM for the out projection, and the residual added as it is written into
    the output (in x's layout). The reference runs two einsums and a
    separate softmax in the input dtype: 180 vs ~100 us fp32, 354 vs ~100 us bf16 at digits16's block
    (16 x 64 x 4 x 4) on the dev VM (benchmarks/bench_attention.py)."""
    bsz, c, hgt, wid = x.shape
    n = hgt * wid
    x3 = x.reshape(bsz, c, n)
    # One [B*N, C] GEMM: a view of channels_last x, one copy of NCHW x (oneDNN's bf16 GEMM beats the
    # strided-batched one on the transposed view by more than the copy costs).
    hd = n_heads * d_k
    qkv4 = _cpu_conv.linear_packed(x, proj_weight, proj_bias)  # inside the sampler's packing scope
    if qkv4 is not None:
        qkv2 = qkv4.permute(0, 2, 3, 1).reshape(bsz * n, 3 * hd)  # channels_last: a view
    else:
        flat = x3.transpose(1, 2).reshape(bsz * n, c)
        qkv2 = torch.addmm(proj_bias, flat, proj_weight.t())
    o_flat = _cpp_core(qkv2, bsz, n, n_heads, d_k)
    if o_flat is None:
        qkv = qkv2.view(bsz, n, n_heads, 3, d_k)
        o = F.scaled_dot_product_attention(qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2),
                                           qkv[:, :, :, 2].transpose(1, 2), scale=d_k ** -0.5)
        o_flat = o.transpose(1, 2).reshape(bsz * n, n_heads * d_k)
    y4 = _cpu_conv.linear_packed(o_flat.view(bsz, hgt, wid, hd).permute(0, 3, 1, 2), out_weight, out_bias)
    if y4 is not None:
        y_tok = y4.permute(0, 2, 3, 1).reshape(bsz, n, c)
    else:
        y_tok = torch.addmm(out_bias, o_flat, out_weight.t()).view(bsz, n, c)
    r_tok = (x3 if residual is None else residual.reshape(bsz, c, n)).transpose(1, 2)
    out = _new_output(x)
    torch.add(y_tok, r_tok, out=out.view(bsz, c, n).transpose(1, 2))
    return out


def _run(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual=None):
    """What the op runs: the fused Triton block for CUDA tensors, `attention_cpu` for CPU tensors (the
    interpreter is for tests, not for use)."""
    if x.device.type == "cpu":
        return attention_cpu(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual)
    if x.device.type != "cuda":
        return _reference_out(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual)
    return attention_triton(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual=residual,
                            out=_new_output(x))


def _attention_body(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                    out_weight: torch.Tensor, out_bias: torch.Tensor, n_heads: int, d_k: int,
                    residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    # torch.compile traces this body: CPU tensors must trace the reference math, not the kernels.
    return _run(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual)


_attention_op = define_op("attention", _attention_body, attention_cpu, _fake)


def _check_residual(x, residual) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"attention: residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"attention: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"attention: residual has dtype {residual.dtype} but x has {x.dtype}{autocast_hint(x)}")
    if residual.device != x.device:
        raise RuntimeError(f"attention: residual is on {residual.device} but x is on {x.device}")
    try:  # the epilogue reads it as [B, C, H*W] through its strides
        residual.view(residual.shape[0], residual.shape[1], -1)
    except RuntimeError:
        raise ValueError(f"attention: residual's H and W dims cannot be merged (strides {residual.stride()}); "
                         "pass an NCHW or channels_last tensor") from None


def _check(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k) -> None:
    named = (("x", x), ("proj_weight", proj_weight), ("proj_bias", proj_bias), ("out_weight", out_weight),
             ("out_bias", out_bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, v in (("n_heads", n_heads), ("d_k", d_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"attention: {name} must be an int, got {type(v).__name__}")
        if v <= 0:
            raise ValueError(f"attention: {name} must be positive, got {v}")
    if x.dim() != 4:
        raise ValueError(f"attention: x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"attention: x must be float32, float16 or bfloat16, got {x.dtype}")
    c = x.shape[1]
    hd = n_heads * d_k
    expected = {"proj_weight": (3 * hd, c), "proj_bias": (3 * hd,), "out_weight": (c, hd), "out_bias": (c,)}
    for name, t in named[1:]:
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"attention: {name} must have shape {expected[name]} for C={c}, n_heads={n_heads}, "
                             f"d_k={d_k}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but x has {x.dtype}{autocast_hint(x)}")
        if t.device != x.device:
            raise RuntimeError(f"attention: {name} is on {t.device} but x is on {x.device}")


def attention(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, out_weight: torch.Tensor,
              out_bias: torch.Tensor, n_heads: int, d_k: int, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """labml's AttentionBlock forward, residual included: see `reference.functional.attention`.
    residual: None adds x; a [B, C, H, W] tensor in x's dtype and device is added instead (the DDPM
    block normalises its input first and adds the un-normalised one).

    x: [B, C, H, W] fp32/fp16/bf16 (NCHW or channels_last); proj_weight [3*n_heads*d_k, C],
    proj_bias [3*n_heads*d_k], out_weight [C, n_heads*d_k], out_bias [C], all in x's dtype and on
    x's device. Returns a new [B, C, H, W] tensor in x's layout (channels_last for a dense channels_last
    x, NCHW-contiguous otherwise). CUDA: the fused Triton path; CPU: `attention_cpu`.
    """
    _check(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k)
    _check_residual(x, residual)
    if HAS_TRITON and plain_eager(x, proj_weight, proj_bias, out_weight, out_bias, residual):  # see ops/_eager.py
        return _run(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual)
    return torch.ops.ddpm_fast.attention(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k, residual)
