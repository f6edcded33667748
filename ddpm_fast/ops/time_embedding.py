"""Fused time embedding (sinusoid + lin1 + Swish + lin2 in one Triton kernel) and the per-model
time-projection table.

Two ways to make the UNet's time path cheap:
- `time_embedding(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)`: the op `ddpm_fast::time_embedding`,
  same signature and meaning as `ddpm_fast.reference.functional.time_embedding`. On CUDA one Triton
  kernel computes the sinusoid in fp32 and both Linear layers with fp32 accumulation; on CPU the
  reference runs. `time_embedding_triton` is the raw launcher (CPU tensors run it under TRITON_INTERPRET=1).
- `TimeTable`: while sampling, t is shared by the batch and the weights are frozen, so every
  ResidualBlock's projection time_emb(Swish(TimeEmbedding(t))) + conv1.bias for every step t < T is one row of a
  [T, sum(out_c)] table; `model.time_projections(t)` becomes one index_select plus views.
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..reference import functional as ref
from ._eager import plain_eager

try:  # The module must import (and the op must work through the reference) without triton.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["time_embedding", "time_embedding_triton", "TimeTable", "attach_time_table", "detach_time_table",
           "HAS_TRITON"]

_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Input validation: shape/dtype/device metadata only (no device sync), shared by the wrapper and
# the raw launcher.
# ---------------------------------------------------------------------------------------------
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
        B, E, E4, HALF, neg_log_scale,
        stride_t, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_ob, stride_on,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
        NATIVE_DOT: tl.constexpr, RNE_BF16: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        wdt = w1_ptr.dtype.element_ty

        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = rb < B
        t = tl.load(t_ptr + rb * stride_t, mask=mb, other=0).to(tl.float32)

        # labml's sinusoid: column j < HALF is sin(t * f_j), column j >= HALF is cos(t * f_{j-HALF}),
        # f_i = exp(i * -ln(1e4) / (HALF - 1)); the product i * scale is rounded to fp32 as in the
        # reference, so the arguments t * f agree bit for bit wherever exp does.
        j = tl.arange(0, BLOCK_F)
        mf = j < E4
        is_sin = j < HALF
        fi = tl.where(is_sin, j, j - HALF).to(tl.float32)
        freq = tl.exp(fi * tl.full([], neg_log_scale, tl.float32))
        arg = t[:, None] * freq[None, :]
        emb = tl.where(is_sin[None, :], tl.sin(arg), tl.cos(arg))
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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _launch(kernel_runner, t, w1, b1, w2, b2, out) -> None:
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
    block_f = max(16, _next_pow2(e4))
    interpreting = w1.device.type == "cpu"
    native = w1.dtype in (torch.float16, torch.bfloat16) and not interpreting
    grid = (triton.cdiv(b, block_b), triton.cdiv(e, block_n))
    kernel_runner[grid](
        t, w1, b1, w2, b2, out,
        b, e, e4, half, -math.log(10_000) / (half - 1),
        t.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), out.stride(0), out.stride(1),
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_F=block_f, NATIVE_DOT=native,
        RNE_BF16=interpreting and w1.dtype == torch.bfloat16,
        # 8 warps: at 4, the fp32 E=512 tiles spilled up to 11.5 KB under triton 3.6 (sm_90 offline
        # compile, scripts/triton_compile_check.py); 8 removed every spill for all dtypes (58-108 regs).
        num_warps=8,
    )


def time_embedding_triton(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                          lin2_weight: torch.Tensor, lin2_bias: torch.Tensor,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton kernel directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `out`, when given, must be a [B, E] tensor of the weights' dtype on their device; it is written
    and returned (tests pass a NaN-poisoned buffer).
    """
    if not HAS_TRITON:
        raise RuntimeError("time_embedding_triton: triton is not importable")
    _check_inputs(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    shape = (t.shape[0], lin2_weight.shape[0])
    if out is None:
        out = lin2_weight.new_empty(shape)
    elif tuple(out.shape) != shape or out.dtype != lin2_weight.dtype or out.device != lin2_weight.device:
        raise ValueError(f"time_embedding_triton: out must be {list(shape)} {lin2_weight.dtype} on "
                         f"{lin2_weight.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    _launch(_time_embedding_kernel, t, lin1_weight, lin1_bias, lin2_weight, lin2_bias, out)
    return out


# ---------------------------------------------------------------------------------------------
# The op: Triton on CUDA, the reference on CPU, shape-only fake.
# ---------------------------------------------------------------------------------------------
def _fake(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias):
    return lin2_weight.new_empty((t.shape[0], lin2_weight.shape[0]))


def _run(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias):
    """What the op runs: the Triton kernel for CUDA tensors, the reference elsewhere (a CPU-built
    triton cannot run kernels outside the interpreter)."""
    if t.device.type != "cuda":
        return ref.time_embedding(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    out = lin2_weight.new_empty((t.shape[0], lin2_weight.shape[0]))
    _launch(torch.library.wrap_triton(_time_embedding_kernel), t, lin1_weight, lin1_bias, lin2_weight,
            lin2_bias, out)
    return out


if HAS_TRITON:

    @torch.library.triton_op("ddpm_fast::time_embedding", mutates_args=())
    def _time_embedding_op(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                           lin2_weight: torch.Tensor, lin2_bias: torch.Tensor) -> torch.Tensor:
        return _run(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)

    _time_embedding_op.register_kernel("cpu")(ref.time_embedding)
else:  # pragma: no cover

    @torch.library.custom_op("ddpm_fast::time_embedding", mutates_args=())
    def _time_embedding_op(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                           lin2_weight: torch.Tensor, lin2_bias: torch.Tensor) -> torch.Tensor:
        return ref.time_embedding(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)

_time_embedding_op.register_fake(_fake)


def time_embedding(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                   lin2_weight: torch.Tensor, lin2_bias: torch.Tensor) -> torch.Tensor:
    """labml TimeEmbedding(E): lin2(Swish(lin1(sinusoid(t, E // 4)))) for integer steps t: [B] -> [B, E].

    Same contract as `ddpm_fast.reference.functional.time_embedding`; weights fp32/fp16/bf16, output
    in the weights' dtype, accumulation in fp32.
    """
    _check_inputs(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    if HAS_TRITON and plain_eager(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias):  # see ops/_eager.py
        return _run(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)
    return torch.ops.ddpm_fast.time_embedding(t, lin1_weight, lin1_bias, lin2_weight, lin2_bias)


# ---------------------------------------------------------------------------------------------
# The per-model time-projection table.
# ---------------------------------------------------------------------------------------------
def _time_path(model) -> Tuple[List[Tuple[dict, str, object]], List[torch.nn.Module], List[Optional[torch.Tensor]]]:
    """The time path: the Linear layers (TimeEmbedding.lin1, .lin2, then each ResidualBlock's time_emb
    in res_blocks() order, the order UNet.forward consumes projections), each block's conv1 bias (part
    of its time_projection, None for a bias-free conv), and the (owner dict, key, object) links that
    hold the modules and those biases, for a cheap identity check later."""
    te = model.time_emb
    links = [(model._modules, "time_emb", te), (te._modules, "lin1", te.lin1), (te._modules, "lin2", te.lin2)]
    linears, shifts = [te.lin1, te.lin2], []
    for blk in model.res_blocks():
        conv1 = blk.conv1
        links += [(blk._modules, "time_emb", blk.time_emb), (blk._modules, "conv1", conv1),
                  (conv1._parameters, "bias", conv1.bias)]
        linears.append(blk.time_emb)
        shifts.append(conv1.bias)
    return links, linears, shifts


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


# torch.optim's fused implementations (`fused=True`) update parameters in place without bumping their
# version counters, so every optimizer step anywhere counts as a possible weight change: a lookup after
# one rebuilds the table once (a few ms), and sampling (no optimizer steps) never pays it.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many torch.optim optimizer steps this process has taken (a staleness signal, see above)."""
    return _OPTIMIZER_STEPS[0]


def _version(p: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) have no version counter; outside inference
    # mode they cannot be written in place at all, so identity, storage and the step count cover them.
    return -1 if p.is_inference() else p._version


def _fingerprint(params: Sequence[torch.Tensor]) -> Tuple[int, list, list, list, list]:
    # `_version` is bumped by every in-place update made through autograd-visible ops: optimizer
    # steps, `load_state_dict` (param.copy_), EMA `lerp_`/`mul_`. `model.to(dtype/device)` instead
    # swaps the storage under the same Parameter (`param.data = ...`) without a bump: dtype/device
    # catch that, and the data pointer catches round trips (fp32 -> fp16 -> fp32) because the table
    # keeps the old storages alive (`_held`), so a new storage never reuses an old address.
    # Writes through `p.data` (a detached alias with its own counter) are invisible: call refresh().
    # map() keeps the per-lookup cost at a few microseconds for the ~50 parameters of a large UNet.
    return (optimizer_steps(), list(map(_version, params)), list(map(torch.Tensor.data_ptr, params)),
            list(map(_DTYPE, params)), list(map(_DEVICE, params)))


class TimeTable:
    """Every ResidualBlock's time projection for every step t < n_steps, as one [T, sum(out_c)] tensor.

    Row t is the concatenation over `model.res_blocks()` of each block's time_projection:
    time_emb(Swish(TimeEmbedding(t))) + conv1.bias.
    `lookup(t)` gathers rows on the device (index_select: no host sync, CUDA-graph capturable) and
    splits them into [B, out_c] views, one per block, in res_blocks() order.

    Never silently stale: the identity of every Linear and parameter of the time path, and each
    parameter's version counter, data pointer, dtype and device, are recorded at build time and
    checked on the host by each lookup (no device work; ~50 parameters for the largest preset),
    which rebuilds when anything changed; so does any torch.optim step since the build (fused
    optimizers write without bumping version counters). `refresh()` rebuilds explicitly: needed after writes
    through `p.data` and after replacing whole ResidualBlocks. A rebuild follows the model's
    dtype and device. `copy.deepcopy(model)` gives the copy its own table, bound to the copy
    (rebuilt at its first lookup: its parameters live in new storage).
    While autograd would record the time path (grad mode on and its weights require grad), lookup
    computes the projections instead, so training through an attached table keeps its gradients.
    """

    def __init__(self, model: torch.nn.Module, n_steps: int):
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"TimeTable: n_steps must be a positive int, got {n_steps!r}")
        if not (hasattr(model, "time_emb") and hasattr(model, "res_blocks")):
            raise TypeError("TimeTable: expected a ddpm_fast UNet (time_emb, res_blocks()), "
                            f"got {type(model).__name__}")
        self.model = model
        self.n_steps = n_steps
        self.table: Optional[torch.Tensor] = None
        self.sizes: List[int] = []
        self._owner_dicts: list = []
        self._owner_keys: list = []
        self._owned: list = []
        self._params: List[torch.Tensor] = []
        self._held: List[torch.Tensor] = []
        self._state: list = []
        self.refresh()

    # -- building ---------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> "TimeTable":
        """Recompute the table from the model's current weights (dtype and device follow the model)."""
        links, linears, shifts = _time_path(self.model)
        params = [p for lin in linears for p in (lin.weight, lin.bias)]
        if any(p is None for p in params):
            raise RuntimeError("TimeTable: every Linear of the time path must have a bias")
        params += [b for b in shifts if b is not None]
        dtype, device = params[0].dtype, params[0].device
        for p in params:
            if p.dtype != dtype or p.device != device:
                raise RuntimeError(f"TimeTable: time-path parameters mix {dtype} on {device} with "
                                   f"{p.dtype} on {p.device}")
        if not dtype.is_floating_point:
            raise TypeError(f"TimeTable: model weights must be floating point, got {dtype}")
        l1, l2 = linears[0], linears[1]
        t = torch.arange(self.n_steps, device=device)
        if dtype == torch.float64:
            temb = ref.time_embedding(t, l1.weight, l1.bias, l2.weight, l2.bias)
        else:
            # The fused kernel (the reference on CPU), on fp32 copies: the table is built once, so it
            # is built at least as accurately as the computed path it replaces.
            w = [p.detach().float() for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
            temb = time_embedding(t, *w)
        # All block projections as ONE matmul against the concatenated weights, in float64: immune
        # to the global TF32 switch, and rounding to the model dtype is then the table's only error.
        act = temb.double()
        act = act * torch.sigmoid(act)
        weight = torch.cat([lin.weight.detach() for lin in linears[2:]]).double()
        # Each block's row also carries its conv1 bias (ResidualBlock.time_projection).
        bias = torch.cat([lin.bias.detach().double() + (0.0 if b is None else b.detach().double())
                          for lin, b in zip(linears[2:], shifts)])
        self.table = torch.addmm(bias, act, weight.t()).to(dtype).contiguous()
        self.sizes = [lin.weight.shape[0] for lin in linears[2:]]
        # (owner dict, key, object) triples: the model -> TimeEmbedding -> lin1/lin2 and block ->
        # time_emb module links, then each Linear's weight and bias entries.
        owners = links + [(lin._parameters, name, getattr(lin, name)) for lin in linears
                          for name in ("weight", "bias")]
        self._owner_dicts = [d for d, _, _ in owners]
        self._owner_keys = [k for _, k, _ in owners]
        self._owned = [o for _, _, o in owners]
        self._params = params
        self._held = [p.detach() for p in params]
        self._state = _fingerprint(params)
        return self

    # -- staleness ----------------------------------------------------------------------------------
    def is_stale(self) -> bool:
        """True when a time-path Linear or parameter was replaced, updated in place, or moved/cast.

        Host-side and cheap (no res_blocks() walk): replacing a whole ResidualBlock is a structural
        edit this check does not look for; call refresh() after one.
        """
        # Identity of every Linear on the path and of every parameter in its Linear (dict lookups,
        # compared with `is`, never tensor ==).
        if any(map(operator.is_not, map(dict.get, self._owner_dicts, self._owner_keys), self._owned)):
            return True
        return _fingerprint(self._params) != self._state

    # -- lookup ---------------------------------------------------------------------------------------
    def lookup(self, t: torch.Tensor) -> List[torch.Tensor]:
        """[B] integer steps in [0, n_steps) -> list of [B, out_c] projections in res_blocks() order.

        The views share one [B, sum(out_c)] gather (row stride sum(out_c)). Steps outside
        [0, n_steps) are an index error (a device-side assert on CUDA), as in any embedding lookup.
        """
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"TimeTable.lookup: t must be a 1-D tensor of steps, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"TimeTable.lookup: t must have an integer dtype, got {t.dtype}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._params):
            return self._computed(t)
        if self.is_stale():
            if self.table.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("TimeTable: the time-path weights changed while a CUDA graph is being "
                                   "captured; call refresh() before capturing")
            self.refresh()
        table = self.table
        if t.dtype not in (torch.int64, torch.int32):
            t = t.long()
        if t.device != table.device:
            t = t.to(table.device, non_blocking=True)
        return list(table.index_select(0, t).split(self.sizes, dim=1))

    def _computed(self, t: torch.Tensor) -> List[torch.Tensor]:
        t_emb = self.model.time_emb(t)
        return [blk.time_projection(t_emb) for blk in self.model.res_blocks()]

    def __repr__(self) -> str:
        shape = tuple(self.table.shape) if self.table is not None else None
        return f"TimeTable(n_steps={self.n_steps}, shape={shape}, blocks={len(self.sizes)})"


def attach_time_table(model: torch.nn.Module, n_steps: int) -> TimeTable:
    """Build a TimeTable for `model`'s current weights and install it as `model.time_table`."""
    table = TimeTable(model, n_steps)
    model.time_table = table
    return table


def detach_time_table(model: torch.nn.Module) -> Optional[TimeTable]:
    """Remove `model.time_table` (the model computes its time path again); returns the old table."""
    old = getattr(model, "time_table", None)
    model.time_table = None
    return old
