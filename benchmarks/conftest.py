"""Benchmark plumbing shared by every bench_<op>.py.

pytest-benchmark times wall clock, so `run_bench` synchronizes CUDA inside the timed call; on CUDA it
also takes the median of `triton.testing.do_bench` (CUDA events, warm-up, many repeats) for the
microsecond numbers, and every benchmark records its byte/FLOP count and the achieved GB/s or
TFLOP/s in extra_info.
"""
import os
import statistics

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def run_bench(benchmark, fn, *, nbytes=None, flops=None, rounds=None, **info):
    """Time fn() with pytest-benchmark (synchronized) and record throughput in extra_info.

    nbytes: the fewest bytes the op must move (each input read once, each output written once);
    flops: floating-point operations. Returns fn's last result.
    """
    fn()  # warm-up: compilation, autotuning, allocator
    _sync()
    if HAS_CUDA:
        import triton.testing

        median_ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        info["timer"] = "cuda-events (triton.testing.do_bench median)"
    else:
        median_ms = None
        info["timer"] = "wall clock (pytest-benchmark)"

    def timed():
        out = fn()
        _sync()
        return out

    if rounds is None:
        rounds = 20 if HAS_CUDA else 3
    if benchmark.disabled:
        out = timed()
    else:
        out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        if median_ms is None:
            median_ms = statistics.median(benchmark.stats.stats.data) * 1e3
    if median_ms is not None:
        info["median_ms"] = median_ms
        if nbytes:
            info["GB/s"] = nbytes / (median_ms * 1e-3) / 1e9
        if flops:
            info["TFLOP/s"] = flops / (median_ms * 1e-3) / 1e12
    if nbytes:
        info["bytes"] = int(nbytes)
    if flops:
        info["flops"] = int(flops)
    info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    benchmark.extra_info.update(info)
    return out


def compiled(fn):
    """torch.compile of a reference function: the real bar for the fast path (GPU only)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


PROVIDERS = ["reference", "compiled", "fast"] if HAS_CUDA else ["reference", "fast"]
