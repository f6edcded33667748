"""The CPU batch split: the fast sampler's UNet batch as one half per core, each half single-threaded.

Why: on the 2-core dev VM the fused fp32 UNet at batch 16 ran faster as two batch-8 forwards side by
side, one per core with one intra-op thread each, than as one batch-16 forward on two OpenMP threads
(the main job, 200-step runs, paired medians: 1.17x and 1.26x; the forward alone 1.05-1.12x;
benchmarks/PERF_NOTES.md, CPU session 5). A forward is ~110 ops, many too small to split well over two
threads (GroupNorm and attention at 4 x 4, the convs on 256 output pixels); side by side, each core
runs whole ops with no fork/join between them, and the Python between ops of one half overlaps the
other half's kernels (torch releases the GIL inside an op).

Every image's eps depends on its own row only, so the split changes no result beyond what the convs'
batch-size-dependent blocking may round differently (measured: identical on the dev VM).
Where it applies is `split_parts` (measured configurations only); fast_loop's `cpu_split` overrides it.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from .. import ops

SPLIT_MIN_BATCH = 16  # the measured batch (the main job's); smaller batches were not measured
_POOL_LOCK = threading.Lock()
_POOL: Optional[ThreadPoolExecutor] = None


def split_parts(dtype: torch.dtype, batch: int, fused: bool, channels_last: bool) -> int:
    """How many side-by-side parts fast_loop runs a CPU model batch in by default: 2 for the fused fp32
    UNet in channels_last at batch >= SPLIT_MIN_BATCH with exactly 2 intra-op threads (where it measured
    faster), else 1. bf16 measured 0.89x-1.09x (not a clear gain); more threads were not measured."""
    if not (fused and channels_last and dtype == torch.float32):
        return 1
    return 2 if batch >= SPLIT_MIN_BATCH and torch.get_num_threads() == 2 else 1


def _single_threaded() -> None:
    # A worker's own OpenMP/MKL thread count (per-thread state), set after torch's lazy per-thread
    # initialisation (which the first get_num_threads runs): that would otherwise later reset it to the
    # process default, which _pool() puts back to the caller's count.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: a pool inherited by it would never run a task.
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            threads = torch.get_num_threads()
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ddpm_fast-cpu-split",
                                       initializer=_single_threaded)
            # torch.set_num_threads in a worker also stores its count as the default for threads torch
            # starts later (autograd, inter-op): put the caller's back once both workers are up.
            barrier = threading.Barrier(2)
            list(_POOL.map(lambda _: barrier.wait(), range(2)))
            torch.set_num_threads(threads)
        return _POOL


class SplitForward:
    """model(x, t) run as two halves of the batch on the two worker threads, concatenated; batches of
    one image run whole. Each worker uses the caller's conv-packing cache, grad and inference mode."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model = model
        self.cache = ops.cpu_conv_cache()  # the sampling call's open scope (None: nothing packed)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            return self.model(x, t)
        half = x.shape[0] // 2
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        # Slicing the batch dim of a dense channels_last x keeps it dense channels_last.
        parts = ((x[:half], t[:half]), (x[half:], t[half:]))

        def run(part):
            packing = nullcontext() if self.cache is None else ops.cpu_conv_packing(self.cache)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), packing:
                return self.model(*part)

        futures = [_pool().submit(run, part) for part in parts]
        wait(futures)  # both finish before either's error propagates: no half still running afterwards
        return torch.cat([f.result() for f in futures])
