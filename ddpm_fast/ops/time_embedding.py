"""Fused time embedding: sinusoid + lin1 + Swish + lin2 in one Triton kernel.

`time_embedding(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, freq_shift=None, flip_sin_to_cos=False)`
is the op `ddpm_fast::time_embedding`, with the meaning of `ddpm_fast.reference.functional.time_embedding`
(freq_shift None: labml's sinusoid; a number: the DDPM paper's as diffusers writes it; flip: cos first). On CUDA one Triton kernel computes
the sinusoid in fp32 and both Linear layers with fp32 accumulation; on CPU the reference runs.
`time_embedding_triton` is the raw launcher (CPU tensors run it under TRITON_INTERPRET=1). The sampler's
per-model table of every block's projection for every step is built on this op: sampling/time_table.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..reference import functional as ref
from ._common import HAS_TRITON, OP_DTYPES, define_op, next_pow2, tl, triton, wrap_triton
from ._eager import plain_eager


__all__ = ["time_embedding", "time_embedding_triton", "HAS_TRITON"]

_WEIGHT_DTYPES = OP_DTYPES


# ---------------------------------------------------------------------------------------------
# Input validation: shape/dtype/device metadata only (no device sync), shared by the wrapper and
# the raw launcher.
# ---------------------------------------------------------------------------------------------
def _check_sinusoid_args(freq_shift, flip_sin_to_cos, half: int) -> None:
    if not isinstance(flip_sin_to_cos, bool):
        raise TypeError(f"time_embedding: flip_sin_to_cos must be a bool, got {type(flip_sin_to_cos).__name__}")
    if freq_shift is None:
        return
    if isinstance(freq_shift, bool) or not isinstance(freq_shift, (int, float)):
        raise TypeError(f"time_embedding: freq_shift must be None or a number, got {type(freq_shift).__name__}")
    if not math.isfinite(freq_shift) or half - freq_shift == 0:
        raise ValueError(f"time_embedding: freq_shift = {freq_shift} gives no frequencies for {half} of them "
                         "(the exponent divides by half - freq_shift; it must be finite and != half)")


def _check_inputs(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias) -> None:
    names = ("t", "lin1_weight", "lin1_bias", "lin2_weight", "lin2_bias")
    args = (t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    for name, a in zip(names, args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"time_embedding: {name} must be a torch.Tensor, got {type(a).__name__}")
    if t.dim() != 1:
        raise ValueError(f"time_embedding: t must be 1-D [B] integer steps, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"time_embedding: t must have an integer dtype, got {t.dtype}")
    if lin2_weight.dim() != 2 or lin2_weight.shape[0] != lin2_weight.shape[1]:
        raise ValueError(f"time_embedding: lin2_weight must be square [E, E], got {tuple(lin2_weight.shape)}")
    e = lin2_weight.shape[0]
    if e % 4 or (e // 4) % 2 or e // 4 < 4:
        raise ValueError(f"time_embedding: E = {e} must be a multiple of 4 with E // 4 even and >= 4 "
                         "(the sinusoid has E // 8 frequencies, each with a sin and a cos)")
    expected = {"lin1_weight": (e, e // 4), "lin1_bias": (e,), "lin2_bias": (e,)}
    for name, a in (("lin1_weight", lin1_weight), ("lin1_bias", lin1_bias), ("lin2_bias", lin2_bias)):
        if tuple(a.shape) != expected[name]:
            raise ValueError(f"time_embedding: {name} must have shape {list(expected[name])} for E = {e}, "
                             f"got {tuple(a.shape)}")
    dtype = lin1_weight.dtype
    if dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"time_embedding: weights must be float32, float16 or bfloat16, got {dtype}")
    for name, a in zip(names[2:], args[2:]):
        if a.dtype != dtype:
            raise TypeError(f"time_embedding: {name} has dtype {a.dtype} but lin1_weight has {dtype}; "
                            "all weights must share one dtype")
    for name, a in zip(names, args):
        if a.device != lin1_weight.device:
            raise RuntimeError(f"time_embedding: {name} is on {a.device} but lin1_weight is on "
                               f"{lin1_weight.device}; all inputs must be on one device")


# ---------------------------------------------------------------------------------------------
# The Triton kernel.
#
# Grid: (batch tiles, output-column tiles). Each program builds the sinusoid of its BLOCK_B steps
# once (fp32, in registers), then walks the hidden dimension in BLOCK_K chunks: h = Swish(emb @
# W1[k]^T + b1[k]) for the chunk, immediately consumed by acc += h @ W2[n, k]^T. The hidden
# activation never touches memory; each program recomputes lin1 (E * E/4 MACs per row, a quarter of
# lin2's) instead of needing a grid-wide barrier between the two Linear layers.
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rne_bf16(x):
        # The interpreter truncates fp32 -> bf16 where GPUs round to nearest even. Rounding the fp32
        # bits first (ties to even; inf/NaN unchanged) makes the cast that follows exact, so CPU runs
        # see the GPU's rounding.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _time_embedding_kernel(
        t_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        B, E, E4, HALF, freq_mul, freq_div,
        stride_t, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_ob, stride_on,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
        NATIVE_DOT: tl.constexpr, RNE_BF16: tl.constexpr, SHIFTED: tl.constexpr, FLIP: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        wdt = w1_ptr.dtype.element_ty

        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = rb < B
        t = tl.load(t_ptr + rb * stride_t, mask=mb, other=0).to(tl.float32)

        # The sinusoid: column j < HALF is sin(t * f_j) (cos when FLIP), column j >= HALF the other one of
        # f_{j-HALF}. labml: f_i = exp(i * freq_mul), freq_mul = fp32(-ln(1e4) / (HALF - 1)); SHIFTED (the
        # DDPM paper's, diffusers' order): f_i = exp((i * fp32(-ln(1e4))) / fp32(HALF - shift)). Each
        # product and quotient is rounded to fp32 as in the reference, so the arguments t * f agree bit
        # for bit wherever exp does.
        j = tl.arange(0, BLOCK_F)
        mf = j < E4
        first = j < HALF
        fi = tl.where(first, j, j - HALF).to(tl.float32)
        expo = fi * tl.full([], freq_mul, tl.float32)
        if SHIFTED:
            expo = expo / tl.full([], freq_div, tl.float32)
        freq = tl.exp(expo)
        arg = t[:, None] * freq[None, :]
        if FLIP:
            emb = tl.where(first[None, :], tl.cos(arg), tl.sin(arg))
        else:
            emb = tl.where(first[None, :], tl.sin(arg), tl.cos(arg))
        emb = tl.where(mf[None, :], emb, 0.0)
        # The reference feeds lin1 the sinusoid cast to the weights' dtype; round the same way.
        if RNE_BF16:
            emb = _rne_bf16(emb)
        emb = emb.to(wdt)

        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < E
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, E, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < E
            w1 = tl.load(w1_ptr + rk[:, None] * stride_w1n + j[None, :] * stride_w1k,
                         mask=mk[:, None] & mf[None, :], other=0.0)
            if NATIVE_DOT:
                # fp16/bf16 operands on the tensor cores, fp32 accumulation.
                h = tl.dot(emb, tl.trans(w1), out_dtype=tl.float32)
            else:
                # fp32 weights (and the interpreter, which has no bf16 arithmetic): exact fp32 FMAs,
                # never TF32. Low-precision operands upcast exactly, so the result is the same.
                h = tl.dot(emb.to(tl.float32), tl.trans(w1.to(tl.float32)), input_precision="ieee")
            h += tl.load(b1_ptr + rk, mask=mk, other=0.0).to(tl.float32)[None, :]
            h = h * tl.sigmoid(h)  # Swish in fp32; padded columns stay exactly 0
            # lin2 reads its input in the weights' dtype, as the reference does.
            if RNE_BF16:
                h = _rne_bf16(h)
            h = h.to(wdt)
            w2 = tl.load(w2_ptr + rn[:, None] * stride_w2n + rk[None, :] * stride_w2k,
                         mask=mn[:, None] & mk[None, :], other=0.0)
            if NATIVE_DOT:
                acc += tl.dot(h, tl.trans(w2), out_dtype=tl.float32)
            else:
                acc += tl.dot(h.to(tl.float32), tl.trans(w2.to(tl.float32)), input_precision="ieee")
        acc += tl.load(b2_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rb[:, None] * stride_ob + rn[None, :] * stride_on
        if RNE_BF16:
            acc = _rne_bf16(acc)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mb[:, None] & mn[None, :])


def _launch(kernel_runner, t, w1, b1, w2, b2, out, freq_shift=None, flip_sin_to_cos=False) -> None:
    """Pick tiles and launch. `kernel_runner` is the jitted kernel or its wrap_triton wrapper."""
    b = t.shape[0]
    # E is a model constant and the tiles depend on it: specialise it (under torch.compile's dynamic
    # shapes too), so the frequency scale below is a plain float, not a symbolic one.
    e = int(w2.shape[0])
    e4 = e // 4
    half = e4 // 2
    if b == 0:
        return
    # tl.dot needs every tile dimension >= 16. Small batches (sampling) use a 16-row tile; larger
    # ones 32 rows, trading lin1 recomputation (once per column tile) against parallelism.
    block_b = 16 if b <= 16 else 32
    block_n = 32 if e <= 128 or b <= 16 else 64
    block_k = 64
    block_f = max(16, next_pow2(e4))
    interpreting = w1.device.type == "cpu"
    native = w1.dtype in (torch.float16, torch.bfloat16) and not interpreting
    grid = (triton.cdiv(b, block_b), triton.cdiv(e, block_n))
    kernel_runner[grid](
        t, w1, b1, w2, b2, out,
        b, e, e4, half, *_freq_args(half, freq_shift),
        t.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), out.stride(0), out.stride(1),
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_F=block_f, NATIVE_DOT=native,
        RNE_BF16=interpreting and w1.dtype == torch.bfloat16, SHIFTED=freq_shift is not None,
        FLIP=bool(flip_sin_to_cos),
        # 8 warps: at 4, the fp32 E=512 tiles spilled up to 11.5 KB under triton 3.6 (sm_90 offline
        # compile, scripts/triton_compile_check.py); 8 removed every spill for all dtypes (58-108 regs).
        num_warps=8,
    )


def _freq_args(half: int, freq_shift: Optional[float]) -> tuple:
    """The kernel's (freq_mul, freq_div) scalars (rounded to fp32 as kernel arguments, as torch rounds
    the reference's python scalars): see the kernel's sinusoid comment."""
    if freq_shift is None:
        return -math.log(10_000) / (half - 1), 1.0
    return -math.log(10_000), float(half - freq_shift)


def time_embedding_triton(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                          lin2_weight: torch.Tensor, lin2_bias: torch.Tensor,
                          out: Optional[torch.Tensor] = None, freq_shift: Optional[float] = None,
                          flip_sin_to_cos: bool = False) -> torch.Tensor:
    """Run the Triton kernel directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `out`, when given, must be a [B, E] tensor of the weights' dtype on their device; it is written
    and returned (tests pass a NaN-poisoned buffer).
    """
    if not HAS_TRITON:
        raise RuntimeError("time_embedding_triton: triton is not importable")
    _check_inputs(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    _check_sinusoid_args(freq_shift, flip_sin_to_cos, lin1_weight.shape[1] // 2)
    shape = (t.shape[0], lin2_weight.shape[0])
    if out is None:
        out = lin2_weight.new_empty(shape)
    elif tuple(out.shape) != shape or out.dtype != lin2_weight.dtype or out.device != lin2_weight.device:
        raise ValueError(f"time_embedding_triton: out must be {list(shape)} {lin2_weight.dtype} on "
                         f"{lin2_weight.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    _launch(_time_embedding_kernel, t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, out, freq_shift,
            flip_sin_to_cos)
    return out


# ---------------------------------------------------------------------------------------------
# The op: Triton on CUDA, the reference on CPU, shape-only fake.
# ---------------------------------------------------------------------------------------------
def _fake(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, freq_shift=None, flip_sin_to_cos=False):
    return lin2_weight.new_empty((t.shape[0], lin2_weight.shape[0]))


def _run(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, freq_shift=None, flip_sin_to_cos=False):
    """What the op runs: the Triton kernel for CUDA tensors, the reference elsewhere (a CPU-built
    triton cannot run kernels outside the interpreter)."""
    if t.device.type != "cuda":
        return ref.time_embedding(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, freq_shift, flip_sin_to_cos)
    out = lin2_weight.new_empty((t.shape[0], lin2_weight.shape[0]))
    _launch(wrap_triton(_time_embedding_kernel), t, lin1_weight, lin1_bias, lin2_weight,
            lin2_bias, out, freq_shift, flip_sin_to_cos)
    return out


def _time_embedding_body(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                         lin2_weight: torch.Tensor, lin2_bias: torch.Tensor, freq_shift: Optional[float] = None,
                         flip_sin_to_cos: bool = False) -> torch.Tensor:
    return _run(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, freq_shift, flip_sin_to_cos)


_time_embedding_op = define_op("time_embedding", _time_embedding_body, ref.time_embedding, _fake)


def time_embedding(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                   lin2_weight: torch.Tensor, lin2_bias: torch.Tensor, freq_shift: Optional[float] = None,
                   flip_sin_to_cos: bool = False) -> torch.Tensor:
    """TimeEmbedding(E): lin2(Swish(lin1(sinusoid(t, E // 4)))) for integer steps t: [B] -> [B, E].

    Same contract as `ddpm_fast.reference.functional.time_embedding` (freq_shift None: labml's
    frequencies; a number s: the DDPM paper's, exp(-ln(1e4) i / (half - s)); flip_sin_to_cos: cos
    first); weights fp32/fp16/bf16, output in the weights' dtype, accumulation in fp32.
    """
    _check_inputs(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    _check_sinusoid_args(freq_shift, flip_sin_to_cos, lin1_weight.shape[1] // 2)
    args = (t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    if freq_shift is not None:
        freq_shift = float(freq_shift)  # the schema's float
    if HAS_TRITON and plain_eager(*args):  # see ops/_eager.py
        return _run(*args, freq_shift, flip_sin_to_cos)
    return torch.ops.ddpm_fast.time_embedding(*args, freq_shift, flip_sin_to_cos)
