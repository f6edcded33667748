"""Prepacked oneDNN convolutions for the fused UNet on CPU, inside a sampling call.

Why: an eager F.conv2d (or conv_transpose2d) on CPU reorders the weight into oneDNN's blocked layout on every call and goes
through aten::_convolution's checks (~25 us per call here); the weights of a sampling run never change,
so the fast sampler packs each conv weight once for the run's input shape (what inductor's CPU freezing
does) and calls oneDNN's conv on the packed weight. Measured on the 2-core dev VM (AMD EPYC, AVX-512 +
AVX512_BF16), digits16 batch 16 fused forward in channels_last, medians of interleaved runs: fp32
17.99 -> 15.80 ms, bf16 13.10 -> 12.00 ms (benchmarks/PERF_NOTES.md).

Packing is scoped (`packing()`): only inside one (the fast loop opens it around its steps on CPU) does
`conv2d_packed` pack; the cache holds each weight it packed (so its id cannot be reused) with the
weight's data pointer and version counter, checked on every call, and is dropped when the scope ends. A
weight changed in place inside a scope (an optimizer step, load_state_dict) bumps its version and is
repacked; outside a scope nothing is cached, so a model trained between sampling calls is never stale.
An inference tensor (made under torch.inference_mode) has no version counter: never packed.
The attention block's two projections (Linear weights) run here too, as 1x1 convs (`linear_packed`), and
`conv2d_repeat` lets ops.conv2d skip its argument checks for a call it has already checked in the scope.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import torch

from ._common import out_format
from ._eager import plain_eager

__all__ = ["packing", "conv2d_packed", "conv2d_repeat", "remember_conv2d", "linear_packed", "conv_transpose2d_packed", "AVAILABLE"]


def _available() -> bool:
    # Internal oneDNN ops (inductor's CPU freezing uses them): checked, not assumed, for other torch builds.
    mk = torch.ops.mkldnn
    names = ("_convolution_pointwise", "_convolution_transpose_pointwise", "_reorder_convolution_transpose_weight")
    try:
        return (torch.backends.mkldnn.is_available() and all(hasattr(mk, n) for n in names)
                and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    except RuntimeError:  # pragma: no cover - a build without the mkldnn namespace
        return False


AVAILABLE = _available()
_DTYPES = (torch.float32, torch.bfloat16)
PACK_MIN_ELEMENTS_FP32 = 16384  # see _usable
# The open scope's caches, per thread (a scope belongs to the loop that opened it): `cache`, packed weights;
# `repeats`, the ops.conv2d calls already checked and run (conv2d_repeat).
_LOCAL = threading.local()


@contextmanager
def packing():
    """Pack conv weights once while the block runs (nested scopes share the outer cache)."""
    outer = getattr(_LOCAL, "cache", None)
    if outer is not None:
        yield
        return
    _LOCAL.cache, _LOCAL.repeats = {}, {}
    try:
        yield
    finally:
        _LOCAL.cache = _LOCAL.repeats = None


def _usable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> bool:
    # Plain eager tensors only (no dispatch mode, tracing, subclass or autograd: see ops/_eager.py), and
    # weights with a version counter (not inference tensors, made under inference_mode) to check.
    if not plain_eager(x, weight, bias) or weight.is_inference():
        return False
    if not (AVAILABLE and torch.backends.mkldnn.enabled) or x.device.type != "cpu" or x.numel() == 0:
        return False
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    # Small fp32 inputs: F.conv2d measured faster than the packed conv on the dev VM (batch 1: 64 x 4 x 4
    # 20 vs 38 us, 32 x 16 x 16 68 vs 74 us); from 16384 input elements on the packed one wins or ties
    # (1 x 64 x 16 x 16 134 vs 187 us, 16 x 64 x 4 x 4 132 vs 195 us, 1 x 128 x 32 x 32 and 64 x 64 equal).
    # The transposed conv packed wins even small (1 x 64 x 4 x 4: 50 vs 133 us).
    if not transposed and x.dtype == torch.float32 and x.numel() < PACK_MIN_ELEMENTS_FP32:
        return False
    # oneDNN's packed conv writes channels_last whatever x's layout: only where the op's contract (the
    # output keeps x's layout, _common.out_format) says channels_last too.
    return out_format(x) == torch.channels_last


def _packed_call(cache: Dict, transposed: bool, weight: torch.Tensor, x: torch.Tensor, stride: Sequence[int],
                 padding: Sequence[int]) -> tuple:
    """(packed weight, padding list, stride list) for this weight and input shape, packed on first use.
    A per-call cost: the lookup is kept to one dict probe and two integer compares."""
    key = (id(weight), transposed, x.shape, stride[0], stride[1], padding[0], padding[1])
    hit = cache.get(key)
    if hit is not None and hit[1] == weight._version and hit[2] == weight.data_ptr() and hit[3] == weight.dtype:
        return hit[4]
    pad, st = [int(padding[0]), int(padding[1])], [int(stride[0]), int(stride[1])]
    w = weight.detach().contiguous()
    if w.dim() == 2:  # a Linear's [C_out, C_in] weight, run as a 1x1 conv (linear_packed)
        w = w.view(w.shape[0], w.shape[1], 1, 1)
    if transposed:
        packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(w, pad, [0, 0], st, [1, 1], 1, list(x.shape))
    else:
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), pad, st, [1, 1], 1, list(x.shape))
    call = (packed, pad, st)
    # `weight` is held so that its id stays unique while cached; version, storage and dtype are checked.
    cache[key] = (weight, weight._version, weight.data_ptr(), weight.dtype, call)
    return call


def _run_packed(x: torch.Tensor, call: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """oneDNN's conv of x on a (packed weight, padding, stride) entry of `_packed_call`."""
    packed, pad, st = call
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, pad, st, [1, 1], 1, "none", [], "")


def conv2d_packed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                  padding: Sequence[int]) -> Optional[torch.Tensor]:
    """F.conv2d(x, weight, bias, stride, padding) on a weight packed once per scope, or None where this
    path does not apply (no open scope, not a plain eager dense channels_last fp32/bf16 CPU input, a small
    fp32 one, oneDNN unavailable or disabled): the caller then runs F.conv2d. stride, padding: (h, w) pairs."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None or not _usable(x, weight, bias, False):
        return None
    return _run_packed(x, _packed_call(cache, False, weight, x, stride, padding), bias)


def conv2d_repeat(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: tuple,
                  padding: tuple) -> Optional[torch.Tensor]:
    """A call this scope has run before through `conv2d_packed` (ops.conv2d's checks passed): the same
    weight and bias objects (each with the storage and dtype it had; the weight also unchanged, by its
    version counter), the same x shape, strides, dtype and device, the same stride and padding tuples,
    and a plain eager call again. Then the packed conv runs without the wrapper's checks (~4 us a call);
    otherwise None, and the caller takes its full path. The key holds the very objects that were checked."""
    repeats = getattr(_LOCAL, "repeats", None)
    if repeats is None or type(stride) is not tuple or type(padding) is not tuple:
        return None
    hit = repeats.get((id(weight), id(bias), x.shape, x.stride(), x.dtype, x.device, stride, padding))
    if hit is None:
        return None
    _, _, version, ptr, bias_ptr, call = hit
    if (weight._version != version or weight.data_ptr() != ptr or weight.dtype != x.dtype
            or (bias is not None and (bias.data_ptr() != bias_ptr or bias.dtype != x.dtype))
            or not (torch.backends.mkldnn.enabled and plain_eager(x, weight, bias))):
        return None
    return _run_packed(x, call, bias)


def remember_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                    packed_stride: Sequence[int], packed_padding: Sequence[int]) -> None:
    """Record a call that ops.conv2d checked and `conv2d_packed` ran, for `conv2d_repeat` (tuples only)."""
    cache, repeats = getattr(_LOCAL, "cache", None), getattr(_LOCAL, "repeats", None)
    if cache is None or repeats is None or type(stride) is not tuple or type(padding) is not tuple:
        return
    call = _packed_call(cache, False, weight, x, packed_stride, packed_padding)
    repeats[(id(weight), id(bias), x.shape, x.stride(), x.dtype, x.device, stride, padding)] = (
        weight, bias, weight._version, weight.data_ptr(), None if bias is None else bias.data_ptr(), call)


def linear_packed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The Linear `weight` [C_out, C_in] (+ bias) applied to every pixel of x [B, C_in, H, W], as a 1x1 conv on
    the weight packed once per scope: channels_last in and out, so x's pixel rows are the GEMM's rows. None
    where `conv2d_packed` would not apply. The attention block's projections on CPU (ops/attention.py)."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None or weight.dim() != 2 or not _usable(x, weight, bias, False):
        return None
    return _run_packed(x, _packed_call(cache, False, weight, x, (1, 1), (0, 0)), bias)


def conv_transpose2d_packed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            stride: Sequence[int], padding: Sequence[int]) -> Optional[torch.Tensor]:
    """F.conv_transpose2d(x, weight, bias, stride, padding) (no output padding, one group) on a packed
    weight, or None where it does not apply (as `conv2d_packed`)."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None or not _usable(x, weight, bias, True):
        return None
    packed, pad, st = _packed_call(cache, True, weight, x, stride, padding)
    return torch.ops.mkldnn._convolution_transpose_pointwise(x, packed, bias, pad, [0, 0], st, [1, 1], 1, "none", [],
                                                             "")
