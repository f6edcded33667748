"""Fused GroupNorm (+ per-(sample, channel) add) (+ Swish): `ddpm_fast::groupnorm_swish`.

Spec: `ddpm_fast.reference.functional.groupnorm_swish`. The ResidualBlock runs it twice per block
(norm1 + act1, and `h + time_proj` -> norm2 -> act2), and the UNet's final norm once more, so it is the
most frequent memory-bound op in the network.

Work split: a program owns GB groups of one sample (GB = 1 for NCHW; for channels_last GB grows towards
a tile row of 32 contiguous channels) and sees them as a [HW, GB * C/G] tile addressed through three
strides (sample, channel, flattened H*W), so NCHW, channels_last and channel slices share every kernel;
Triton specialises an int argument equal to 1, so the compiler knows which axis is contiguous, which
is what coalesced loads need. Group statistics come from per-column sums through a [columns, GB]
one-hot matrix, so C/G need not be a power of two (C/G = 3, 12, 40 occur).

Three execution plans (bytes: N = B*C*H*W elements of size e; add/weight/bias are O(B*C) and ignored):
  fused   one kernel, the whole group block held in registers: statistics then normalise from the
          same registers. Reads x once, writes y once: 2*N*e bytes. Used when the padded tile fits
          (<= MAX_FUSED_TILE elements, true for every preset shape) and no split is chosen.
  looped  two kernels (S = 1): `_stats` loops over H*W tiles merging per-channel moments (Chan et al.),
          `_apply` loops again to normalise. Reads x twice: 3*N*e bytes (+ B*G*12 workspace).
          Used when the group is too large for registers.
  split   the same two kernels with S > 1 programs per (sample, group block), each owning a slice of
          H*W; `_apply` first merges the S partial moments. 3*N*e bytes (+ B*G*S*12), but the second
          read usually hits L2: split is only chosen for small problems (B * G/GB <= SMs / 2).
Statistics are fp32 and the variance is always a sum of squared deviations from a mean (two-pass within
a tile, Chan's parallel merge across tiles and splits), never E[x^2] - E[x]^2; moments are taken about
a data value of the group (see `_prologue`), so a large mean offset (x = 1000 + N(0, 1)) loses nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import functional as _ref
from ._common import HAS_TRITON, INT32_MAX, OP_DTYPES, define_op, new_output, next_pow2, out_format, round_to, sm_count, span, tl, triton, wrap_triton
from ._cpu_kernels import direct_op, out_op
from ._eager import plain_eager


__all__ = ["HAS_CPP_KERNEL", "HAS_TRITON", "groupnorm_swish", "groupnorm_swish_triton", "plan"]

_DTYPES = OP_DTYPES
# Largest padded tile (elements) one program keeps in registers: 16 warps x 32 lanes x 32 fp32 values.
# Covers every preset group (the largest is cifar35m's final GroupNorm(8, 128) at 32x32: 16 x 1024).
MAX_FUSED_TILE = 16384
# Tile (elements) per loop iteration of the looped/split kernels: 16 fp32 values per lane at 8 warps.
LOOP_TILE = 4096
# Largest channels-per-group the kernels take (one tile row must fit); beyond it the op uses the reference.
MAX_GROUP_CHANNELS = 4096
# channels_last: gather groups until a tile row spans this many contiguous channels (>= one 32 B sector
# even in fp16), so a warp's loads are not 2-channel slivers strided by C.
CL_ROW_CHANNELS = 32
# Split only when at most half the SMs would get a program (B * G/GB <= SMs / 2) and a program would own
# at least SPLIT_MIN_ELEMS elements: with less, one program finishes in about the time of the second
# launch. Splits aim at 2 programs per SM, each keeping >= SPLIT_MIN_CHUNK elements.
# All three are first guesses, not GPU measurements; tune them with benchmarks/bench_groupnorm_swish.py.
SPLIT_MIN_ELEMS = 8192
SPLIT_MIN_CHUNK = 2048


def _num_warps(tile: int) -> int:
    # About 8 elements per lane for small tiles, up to 16 warps (32 per lane) for the largest.
    return max(1, min(16, tile // 256))


def _new_output(x: torch.Tensor) -> torch.Tensor:
    return new_output(x)


def _hw_stride(t: torch.Tensor) -> Optional[int]:
    """Stride of the flattened H*W axis, or None when H and W do not merge into one strided axis."""
    h, w = t.shape[2], t.shape[3]
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None


def plan(batch: int, channels: int, hw: int, num_groups: int, channels_last: bool,
         sm_count: Optional[int], split: Optional[int] = None, max_tile: Optional[int] = None) -> dict:
    """Tile sizes, grid and variant for one call; pure Python so tests can check the choices.

    split: None = heuristic (splits only when sm_count is known), 1 = never split, k > 1 = k slices
    of H*W (fewer when H*W cannot be cut into k). max_tile overrides MAX_FUSED_TILE (tests use it to
    force the looped path at small shapes).
    """
    max_tile = MAX_FUSED_TILE if max_tile is None else int(max_tile)
    cg = channels // num_groups
    hw_pow2 = next_pow2(hw)

    def fits(gb: int) -> bool:
        return next_pow2(gb * cg) * hw_pow2 <= max_tile

    gb = 1
    if channels_last:
        # Grow while a row is short, GB still divides G, and growing does not evict a fitting tile.
        while gb * cg < CL_ROW_CHANNELS and num_groups % (2 * gb) == 0 and (fits(2 * gb) or not fits(gb)):
            gb *= 2
    block_cc = next_pow2(gb * cg)
    n_prog = batch * (num_groups // gb)
    work = gb * cg * hw  # elements one unsplit program owns

    if split is None:
        s = 1
        if sm_count and 2 * n_prog <= sm_count and work >= SPLIT_MIN_ELEMS:
            s = min(-(-2 * sm_count // n_prog), work // SPLIT_MIN_CHUNK)
    else:
        s = max(1, int(split))
    s = min(s, hw)  # a slice is at least one row of H*W
    if s == 1 and fits(gb):
        return dict(variant="fused", GB=gb, BLOCK_CC=block_cc, BLOCK_HW=hw_pow2, S=1, HW_PER_SPLIT=hw,
                    grid=(n_prog,), num_warps=_num_warps(block_cc * hw_pow2))
    # Loop tile: a power of two of about LOOP_TILE elements, no taller than a slice. Slices start on
    # tile boundaries, so shrink the tile until they come out as S non-empty slices (or rows are 1).
    rows = -(-hw // s)
    block_hw = 1 << (max(1, min(rows, LOOP_TILE // block_cc)).bit_length() - 1)
    while block_hw > 1 and -(-hw // (-(-rows // block_hw) * block_hw)) < s:
        block_hw //= 2
    hw_per_split = -(-rows // block_hw) * block_hw
    s = -(-hw // hw_per_split)
    return dict(variant="split" if s > 1 else "looped", GB=gb, BLOCK_CC=block_cc, BLOCK_HW=block_hw,
                S=s, HW_PER_SPLIT=hw_per_split, grid=(n_prog, s), num_warps=_num_warps(block_cc * block_hw))


if HAS_TRITON:

    @triton.jit
    def _prologue(x_ptr, add_ptr, pid, n_gblocks, Cg, sx_b, sx_c, sa_b, sa_c, GB: tl.constexpr,
                  BLOCK_CC: tl.constexpr, HAS_ADD: tl.constexpr, SOFT_BF16: tl.constexpr):
        """Program pid's sample, tile columns (its GB groups' channels), the add per column and the pivot.

        add: fp32 holding values of x's dtype (the reference casts add to x's dtype); zeros without one.
        pivot: per column, (x + add)[b, first channel of the column's group, hw = 0]. All moments are
        taken of x - pivot: the shift is exact when x is near the pivot (Sterbenz), so a large common
        offset (x = 1000 + N(0, 1)) costs the sums nothing, and the mean is kept as a small offset from
        an exact data value (an fp32 mean of ~1000 alone is only good to ulp(1000)/2 = 3e-5). Every
        program of a group (all splits) uses the same pivot, so partial moments share an origin.
        """
        b = (pid // n_gblocks).to(tl.int64)  # int64 sample offsets: B*C*H*W may exceed 2^31
        cols = tl.arange(0, BLOCK_CC)
        col_ok = cols < GB * Cg
        ch = (pid % n_gblocks) * (GB * Cg) + cols
        gch = ch - cols % Cg
        x_base = x_ptr + b * sx_b
        pivot = tl.load(x_base + gch * sx_c, mask=col_ok, other=0.0)
        a = tl.zeros([BLOCK_CC], dtype=tl.float32)
        if HAS_ADD:
            add_base = add_ptr + b * sa_b
            dt = x_ptr.dtype.element_ty
            a = round_to(tl.load(add_base + ch * sa_c, mask=col_ok, other=0.0).to(tl.float32), dt, SOFT_BF16)
            a = a.to(tl.float32)
            a_g = round_to(tl.load(add_base + gch * sa_c, mask=col_ok, other=0.0).to(tl.float32), dt, SOFT_BF16)
            pivot = round_to(pivot.to(tl.float32) + a_g.to(tl.float32), dt, SOFT_BF16)
        return b, cols, col_ok, ch, x_base, a, pivot.to(tl.float32)

    @triton.jit
    def _load_tile(x_base, a, pivot, ch, hw, mask, sx_c, sx_hw, HAS_ADD: tl.constexpr, SOFT_BF16: tl.constexpr):
        """[BLOCK_HW, BLOCK_CC] tile of (x + add) - pivot in fp32, zero where masked (sums skip padding)."""
        x = tl.load(x_base + ch[None, :] * sx_c + hw[:, None] * sx_hw, mask=mask, other=0.0)
        if HAS_ADD:
            # The reference adds in x's dtype, so its statistics see the sum rounded to x's dtype:
            # mirror that rounding (a conversion in registers) rather than be more exact than the spec.
            x = round_to(x.to(tl.float32) + a[None, :], x.dtype, SOFT_BF16)
        return tl.where(mask, x.to(tl.float32) - pivot[None, :], 0.0)

    @triton.jit
    def _onehot(cols, Cg, GB: tl.constexpr):
        """[BLOCK_CC, GB] membership of each tile column in the program's GB groups (padding: in none).
        Column sums -> group sums is sum(v[:, None] * oh, 0); group values -> columns, sum(oh * g, 1)."""
        return tl.where((cols // Cg)[:, None] == tl.arange(0, GB)[None, :], 1.0, 0.0)

    @triton.jit
    def _normalize_store(y_base, x, mean_c, scale_c, bias_c, ch, hw, mask, sy_c, sy_hw,
                         SWISH: tl.constexpr, SOFT_BF16: tl.constexpr):
        # (x - mean) * scale + bias, not x * scale + shift: a folded shift would cancel for large means.
        y = (x - mean_c[None, :]) * scale_c[None, :] + bias_c[None, :]
        if SWISH:
            y = y * tl.sigmoid(y)
        y = round_to(y, y_base.dtype.element_ty, SOFT_BF16)
        tl.store(y_base + ch[None, :] * sy_c + hw[:, None] * sy_hw, y, mask=mask)

    @triton.jit
    def _gn_fused_kernel(x_ptr, w_ptr, b_ptr, add_ptr, y_ptr, HW, Cg, n_gblocks,
                         sx_b, sx_c, sx_hw, sy_b, sy_c, sy_hw, sa_b, sa_c, eps,
                         GB: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_HW: tl.constexpr,
                         HAS_ADD: tl.constexpr, SWISH: tl.constexpr, SOFT_BF16: tl.constexpr):
        """One program = GB whole groups of one sample, held in registers: one read, one write."""
        b, cols, col_ok, ch, x_base, a, pivot = _prologue(x_ptr, add_ptr, tl.program_id(0), n_gblocks, Cg, sx_b,
                                                          sx_c, sa_b, sa_c, GB, BLOCK_CC, HAS_ADD, SOFT_BF16)
        hw = tl.arange(0, BLOCK_HW)
        mask = (hw < HW)[:, None] & col_ok[None, :]
        x = _load_tile(x_base, a, pivot, ch, hw, mask, sx_c, sx_hw, HAS_ADD, SOFT_BF16)

        oh = _onehot(cols, Cg, GB)
        inv_n = 1.0 / (Cg * HW * 1.0)
        # Exact two-pass statistics: the tile is already on chip, so the second pass is free.
        mean = tl.sum(tl.sum(x, axis=0)[:, None] * oh, axis=0) * inv_n       # [GB]
        mean_c = tl.sum(oh * mean[None, :], axis=1)                          # [BLOCK_CC]
        d = tl.where(mask, x - mean_c[None, :], 0.0)
        var = tl.sum(tl.sum(d * d, axis=0)[:, None] * oh, axis=0) * inv_n    # [GB]
        # fp32 eps: under torch.compile a Python float arrives as an fp64 scalar.
        rstd_c = tl.sum(oh * (1.0 / tl.sqrt(var + tl.full([], eps, tl.float32)))[None, :], axis=1)
        w = tl.load(w_ptr + ch, mask=col_ok, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + ch, mask=col_ok, other=0.0).to(tl.float32)
        _normalize_store(y_ptr + b * sy_b, x, mean_c, rstd_c * w, bias, ch, hw, mask, sy_c, sy_hw,
                         SWISH, SOFT_BF16)

    @triton.jit
    def _gn_stats_kernel(x_ptr, add_ptr, ws_ptr, HW, Cg, n_gblocks, HW_PER_SPLIT,
                         sx_b, sx_c, sx_hw, sa_b, sa_c,
                         GB: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_HW: tl.constexpr,
                         HAS_ADD: tl.constexpr, SOFT_BF16: tl.constexpr):
        """Moments (mean - pivot, M2, count) of each of GB groups over one H*W slice -> ws[b, g, s, :]."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        b, cols, col_ok, ch, x_base, a, pivot = _prologue(x_ptr, add_ptr, pid, n_gblocks, Cg, sx_b, sx_c, sa_b,
                                                          sa_c, GB, BLOCK_CC, HAS_ADD, SOFT_BF16)
        hw_start = s * HW_PER_SPLIT
        hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)

        # Per-column running moments; every column has seen the same count, so the count is a scalar.
        mean = tl.zeros([BLOCK_CC], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_CC], dtype=tl.float32)
        for hw0 in range(hw_start, hw_end, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & col_ok[None, :]
            x = _load_tile(x_base, a, pivot, ch, hw, mask, sx_c, sx_hw, HAS_ADD, SOFT_BF16)
            n_prev = (hw0 - hw_start).to(tl.float32)
            n_t = tl.minimum(hw_end - hw0, BLOCK_HW).to(tl.float32)
            t_mean = tl.sum(x, axis=0) / n_t
            d = tl.where(mask, x - t_mean[None, :], 0.0)
            # Chan et al.'s merge of the running (n_prev, mean, m2) with the tile's exact two-pass moments.
            n_new = n_prev + n_t
            delta = t_mean - mean
            mean = mean + delta * (n_t / n_new)
            m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (n_prev * n_t / n_new)

        # Columns -> groups (equal counts per column): mean of means; M2 plus the between-column term.
        oh = _onehot(cols, Cg, GB)
        n_col = (hw_end - hw_start).to(tl.float32)
        g_mean = tl.sum(oh * mean[:, None], axis=0) / (Cg * 1.0)
        spread = mean - tl.sum(oh * g_mean[None, :], axis=1)
        g_m2 = tl.sum(oh * (m2 + n_col * spread * spread)[:, None], axis=0)
        g = (pid % n_gblocks) * GB + tl.arange(0, GB)
        off = (((pid // n_gblocks) * (n_gblocks * GB) + g) * tl.num_programs(1) + s) * 3
        tl.store(ws_ptr + off, g_mean)
        tl.store(ws_ptr + off + 1, g_m2)
        tl.store(ws_ptr + off + 2, tl.zeros([GB], dtype=tl.float32) + n_col * Cg)

    @triton.jit
    def _gn_apply_kernel(x_ptr, w_ptr, b_ptr, add_ptr, y_ptr, ws_ptr, HW, Cg, n_gblocks, HW_PER_SPLIT,
                         sx_b, sx_c, sx_hw, sy_b, sy_c, sy_hw, sa_b, sa_c, eps,
                         GB: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_HW: tl.constexpr,
                         HAS_ADD: tl.constexpr, SWISH: tl.constexpr, SOFT_BF16: tl.constexpr):
        """Merge the S partial moments of this program's groups, then normalise its H*W slice."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        n_split = tl.num_programs(1)
        g = (pid % n_gblocks) * GB + tl.arange(0, GB)
        ws_row = ((pid // n_gblocks) * (n_gblocks * GB) + g) * n_split * 3

        n = tl.zeros([GB], dtype=tl.float32)
        mean = tl.zeros([GB], dtype=tl.float32)
        m2 = tl.zeros([GB], dtype=tl.float32)
        for j in range(0, n_split):  # every program of a group merges the same partials in the same order
            p_mean = tl.load(ws_ptr + ws_row + j * 3)
            p_m2 = tl.load(ws_ptr + ws_row + j * 3 + 1)
            p_n = tl.load(ws_ptr + ws_row + j * 3 + 2)
            n_new = n + p_n
            delta = p_mean - mean
            mean = mean + delta * (p_n / n_new)
            m2 = m2 + p_m2 + delta * delta * (n * p_n / n_new)
            n = n_new
        rstd = 1.0 / tl.sqrt(m2 / n + tl.full([], eps, tl.float32))

        b, cols, col_ok, ch, x_base, a, pivot = _prologue(x_ptr, add_ptr, pid, n_gblocks, Cg, sx_b, sx_c, sa_b,
                                                          sa_c, GB, BLOCK_CC, HAS_ADD, SOFT_BF16)
        oh = _onehot(cols, Cg, GB)
        mean_c = tl.sum(oh * mean[None, :], axis=1)
        w = tl.load(w_ptr + ch, mask=col_ok, other=0.0).to(tl.float32)
        scale_c = tl.sum(oh * rstd[None, :], axis=1) * w
        bias = tl.load(b_ptr + ch, mask=col_ok, other=0.0).to(tl.float32)
        y_base = y_ptr + b * sy_b
        hw_start = s * HW_PER_SPLIT
        hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
        for hw0 in range(hw_start, hw_end, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & col_ok[None, :]
            x = _load_tile(x_base, a, pivot, ch, hw, mask, sx_c, sx_hw, HAS_ADD, SOFT_BF16)
            _normalize_store(y_base, x, mean_c, scale_c, bias, ch, hw, mask, sy_c, sy_hw, SWISH, SOFT_BF16)


def _launch(kernel, grid, args, meta, num_warps):
    # wrap_triton makes the launch visible to torch.compile when traced inside the triton_op; called
    # eagerly (tests under TRITON_INTERPRET=1) it is a plain launch.
    wrap_triton(kernel)[grid](*args, **meta, num_warps=num_warps)


def groupnorm_swish_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                           eps: float = 1e-5, add: Optional[torch.Tensor] = None, swish: bool = True,
                           split: Optional[int] = None, *, max_tile: Optional[int] = None) -> torch.Tensor:
    """Raw Triton launcher (no input validation; use `groupnorm_swish`). Works on CUDA tensors, and on
    CPU tensors under TRITON_INTERPRET=1. split / max_tile: see `plan`."""
    if not HAS_TRITON:
        raise RuntimeError("groupnorm_swish_triton needs triton, which is not importable here")
    if _hw_stride(x) is None:  # H and W do not merge (e.g. a transposed view): copy once.
        x = x.contiguous()
    out = _new_output(x)
    bsz, c, h, w = x.shape
    if out.numel() == 0:
        return out
    weight, bias = weight.contiguous(), bias.contiguous()
    cl = x.stride(1) == 1 and c > 1
    sms = sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.device.type == "cuda" else None
    p = plan(bsz, c, h * w, num_groups, cl, sms, split, max_tile)
    n_gblocks = num_groups // p["GB"]
    has_add = add is not None
    add_t = add if has_add else x  # any valid pointer; never read when HAS_ADD is False
    sa = (add.stride(0), add.stride(1)) if has_add else (0, 0)
    sx = (x.stride(0), x.stride(1), _hw_stride(x))
    sy = (out.stride(0), out.stride(1), _hw_stride(out))
    meta = dict(GB=p["GB"], BLOCK_CC=p["BLOCK_CC"], BLOCK_HW=p["BLOCK_HW"], HAS_ADD=has_add,
                SOFT_BF16=x.device.type == "cpu")  # CPU tensors mean the interpreter (see round_to)
    cg = c // num_groups
    if p["variant"] == "fused":
        _launch(_gn_fused_kernel, p["grid"],
                (x, weight, bias, add_t, out, h * w, cg, n_gblocks, *sx, *sy, *sa, float(eps)),
                dict(meta, SWISH=bool(swish)), p["num_warps"])
        return out
    ws = torch.empty((bsz, num_groups, p["S"], 3), dtype=torch.float32, device=x.device)
    _launch(_gn_stats_kernel, p["grid"],
            (x, add_t, ws, h * w, cg, n_gblocks, p["HW_PER_SPLIT"], *sx, *sa), meta, p["num_warps"])
    _launch(_gn_apply_kernel, p["grid"],
            (x, weight, bias, add_t, out, ws, h * w, cg, n_gblocks, p["HW_PER_SPLIT"], *sx, *sy, *sa,
             float(eps)), dict(meta, SWISH=bool(swish)), p["num_warps"])
    return out


# --- the torch.library op ------------------------------------------------------------------------
def _reference_out(x, weight, bias, num_groups, eps, add, swish):
    """The reference math, returned in the op's output memory format (the CPU kernel and fallback)."""
    y = _ref.groupnorm_swish(x, weight, bias, num_groups, eps, add, swish)
    fmt = out_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def _fake(x, weight, bias, num_groups, eps, add, swish):
    return _new_output(x)


_CPP_OUT = out_op("groupnorm_swish")  # the C++ CPU kernel (csrc/groupnorm_swish_cpu.cpp), or None
_CPP_DIRECT = direct_op("groupnorm_swish")  # the same kernel without the dispatcher (plain eager calls)
_CPP_NEW = direct_op("groupnorm_swish", "_new")  # ... allocating the output in C++ (plain eager CPU calls)
_SCALARS = (int, float)
# Whether CPU tensors run the C++ kernel (else the reference): the CPU sampler fuses only with it.
HAS_CPP_KERNEL = _CPP_OUT is not None


def _cpu_kernel(x, weight, bias, num_groups, eps, add, swish):
    """The op on CPU tensors: the C++ kernel (fp32 statistics, one fused normalise-Swish pass, any
    group width), or the reference where the extension is not available."""
    return _cpp_call(_CPP_OUT, x, weight, bias, num_groups, eps, add, swish)


def _cpp_call(kernel, x, weight, bias, num_groups, eps, add, swish):
    if kernel is None:
        return _reference_out(x, weight, bias, num_groups, eps, add, swish)
    out = _new_output(x)
    kernel(x, weight, bias, num_groups, eps, add, swish, out)
    return out


def _run(x, weight, bias, num_groups, eps, add, swish, cpu_direct=None):
    """What the op runs for x's device: the C++ kernel on CPU; on CUDA the Triton kernel, or the reference
    for groups wider than it takes. torch.compile traces it as the op's body. cpu_direct: the kernel's
    dispatcher-free binding, which only the plain eager path passes (it takes real tensors only)."""
    if x.device.type == "cpu":
        return _cpp_call(cpu_direct or _CPP_OUT, x, weight, bias, num_groups, eps, add, swish)
    # The kernel offsets within a sample in int32 (samples in int64): a sample beyond that takes the reference.
    if x.shape[1] // num_groups > MAX_GROUP_CHANNELS or span(x, (1, 2, 3)) > INT32_MAX:
        return _reference_out(x, weight, bias, num_groups, eps, add, swish)
    return groupnorm_swish_triton(x, weight, bias, num_groups, eps, add, swish)


def _groupnorm_swish_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                          eps: float, add: Optional[torch.Tensor], swish: bool) -> torch.Tensor:
    return _run(x, weight, bias, num_groups, eps, add, swish)


# CPU tensors take the C++ kernel (the Triton kernel itself is tested on CPU through the launcher).
_groupnorm_swish_op = define_op("groupnorm_swish", _groupnorm_swish_body, _cpu_kernel, _fake, cuda_fallback=_reference_out)


def _check(x, weight, bias, num_groups, eps, add, swish) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"groupnorm_swish: x must be a 4-D tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"groupnorm_swish: x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"groupnorm_swish: num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"groupnorm_swish: channels C={c} are not divisible by num_groups={num_groups}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"groupnorm_swish: eps must be a non-negative float, got {eps!r}")
    if not isinstance(swish, bool):
        raise TypeError(f"groupnorm_swish: swish must be a bool, got {type(swish).__name__}")
    named = [("weight", weight, (c,)), ("bias", bias, (c,))]
    if add is not None:
        named.append(("add", add, (x.shape[0], c)))
    for name, t, shape in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"groupnorm_swish: {name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"groupnorm_swish: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"groupnorm_swish: {name} dtype {t.dtype} must be x's dtype ({x.dtype}) or float32")
        if t.device != x.device:
            raise RuntimeError(f"groupnorm_swish: {name} is on {t.device} but x is on {x.device}")
    if weight.dtype != bias.dtype:
        raise TypeError(f"groupnorm_swish: weight ({weight.dtype}) and bias ({bias.dtype}) dtypes differ")


def groupnorm_swish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float = 1e-5, add: Optional[torch.Tensor] = None, swish: bool = True) -> torch.Tensor:
    """Swish(GroupNorm(x + add[:, :, None, None])) (no Swish when swish=False), as the reference.

    x: [B, C, H, W] float32/float16/bfloat16, NCHW or channels_last (the output keeps the format);
    weight, bias: [C] in x's dtype or float32; add: optional [B, C] in x's dtype or float32.
    Not differentiable (inference op).
    """
    if (_CPP_NEW is not None and type(x) is torch.Tensor and x.is_cpu and type(num_groups) is int
            and type(eps) in _SCALARS and type(swish) is bool and plain_eager(x, weight, bias, add)):
        # One C++ call checks the tensors, allocates the output and runs the kernel (~3 us of Python less
        # than the path below at small shapes). A bad argument falls back to _check's named error.
        try:
            return _CPP_NEW(x, weight, bias, num_groups, eps, add, swish)
        except (TypeError, ValueError, RuntimeError):
            _check(x, weight, bias, num_groups, eps, add, swish)
            raise
    _check(x, weight, bias, num_groups, eps, add, swish)
    if (HAS_TRITON or x.device.type == "cpu") and plain_eager(x, weight, bias, add):  # see ops/_eager.py
        return _run(x, weight, bias, num_groups, float(eps), add, swish, _CPP_DIRECT)
    return torch.ops.ddpm_fast.groupnorm_swish(x, weight, bias, num_groups, float(eps), add, swish)
