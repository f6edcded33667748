"""Sampling steps captured in CUDA graphs: the capture itself, and the last few graphs kept between calls.

A kept graph is keyed by everything its capture bakes in (see cache_key) and checked against a
fingerprint of the caller's model, so a later call replays it only for the same, unchanged model.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable

import torch

from .. import ops
from .time_table import optimizer_steps, param_version


__all__ = ["GRAPHS", "cache_key", "capture", "clear_graph_cache", "WARMUP_STEPS"]


def cache_key(model, x_T, dtype, clip, noise, n_timesteps, n_steps, fuse, table, channels_last,
              model_batch=None) -> tuple:
    """Everything a capture bakes in besides the buffers `restart` refills: the model object, shapes,
    dtype, device, the step count, clip bounds, the op choices (fusion, table, layout) and the global
    flags that steer the kernels' dispatch (TF32 for cuBLAS / cuDNN, hence the conv2d rule)."""
    return (id(model), x_T.device, tuple(x_T.shape), dtype, None if clip is None else tuple(map(float, clip)),
            noise, n_timesteps, n_steps, fuse, table, channels_last, model_batch) + ops.dispatch_key()


def _fingerprint(model) -> tuple:
    """Identity, storage and version of every parameter and buffer, and the process's optimizer step
    count (fused optimizers write without bumping versions): any in-place update, reassignment or move
    of a weight changes it."""
    tensors = (*model.parameters(), *model.buffers())
    return (optimizer_steps(),) + tuple((id(t), t.data_ptr(), param_version(t)) for t in tensors)


class _GraphCache:
    """The last MAX_ENTRIES captured sampling graphs (LRU). An entry holds the step state, the graph and
    what the graph reads besides the caller's weights (a converted copy of the model, the time table),
    plus a weak reference and a fingerprint of the caller's model: a lookup hits only for the same,
    unchanged model, and the entry (with its GPU memory) is dropped when that model is garbage collected."""

    MAX_ENTRIES = 2

    def __init__(self):
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def lookup(self, key, model):
        entry = self._entries.get(key)
        if entry is None:
            return None
        model_ref, fingerprint, state, _keep = entry
        if model_ref() is not model or _fingerprint(model) != fingerprint:
            del self._entries[key]  # stale: the model changed (or is another object with a reused id)
            return None
        self._entries.move_to_end(key)
        return state, state.graph.replay

    def store(self, key, model, state, keep) -> None:
        self._entries[key] = (weakref.ref(model), _fingerprint(model), state, keep)
        self._entries.move_to_end(key)
        # key holds id(model), which a later object may reuse only after this model is gone, and by
        # then this has removed the entry.
        weakref.finalize(model, self._entries.pop, key, None)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


GRAPHS = _GraphCache()


def clear_graph_cache() -> None:
    """Drop the sampling graphs kept between calls (and the GPU memory they hold)."""
    GRAPHS.clear()


# Eager steps before the capture. One does every lazy initialisation the step has (Triton JIT compiles,
# cuBLAS/cuDNN handles and plans, allocator blocks); nothing in it is autotuned over several calls. It
# used to be 3, as in torch.cuda.make_graphed_callables, which mostly serves DDP: each extra step is a
# whole eager forward per sample() call (~13 ms for cifar35m at batch 1 on the H100 profile).
WARMUP_STEPS = 1


def capture(state) -> Callable[[], None]:
    """Capture state.step in a CUDA graph after warm-up (Triton JIT compiles, cuDNN/cuBLAS plans,
    allocator) on a side stream; returns the replay function. State is reset after capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(WARMUP_STEPS):
            # Every warm-up step is step 0: warm-up must not run past the last step (S < steps), where
            # the timesteps gather would index out of range (a device-side assert that kills the
            # CUDA context); and the capture below starts from the initial state.
            state.step()
            state.reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        state.step()
    state.reset()
    torch.cuda.synchronize()
    state.graph = graph  # keep the graph (and the memory it references) alive with the state
    return graph.replay
