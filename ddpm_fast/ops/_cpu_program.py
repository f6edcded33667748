"""CPU step programs: one recorded UNet forward, replayed as straight-line Python. The CPU's stand-in for
the CUDA graph of a sampling step.

Why: on the 2-core dev VM a fused digits16 step at batch 8 on one thread (one `cpu_split` child, bf16)
took 4.64 ms, of which the torch profiler put ~3.7 ms inside the C++ calls: the rest is the Python between
them (module calls, each op wrapper's argument checks, the packed-weight cache probes), the same every
step. The GPU path removes that with one CUDA graph per step; on CPU there is no graph, so this records
the calls once and replays only them.

How: `record(fn, inputs)` runs `fn(*inputs)` under a TorchFunctionMode that sees every torch call made
from Python (functions, Tensor methods, torch.ops). Each call made at the top level (not from inside
another recorded call) that returns a tensor, a sequence of tensors or None (an out-variant or in-place
call) becomes one line of the program, its tensor arguments named by the value they came from: an input,
an earlier line's result, or a constant (a tensor that existed before the forward: weights, packed
weights, the time table). Calls that return only plain values (shapes, flags, pointers) are queries and
are dropped; one whose result or arguments may hold tensors the program cannot name (a dict, a nested
sequence result, an iterator or another object) leaves the forward without a program. All Python logic is
dropped too: what the recorded forward decided (packed or not, which kernel) is what
every replay does. The C++ kernels' direct pybind bindings are invisible to torch function modes, so
they are called through `unit` (ops/_cpu_kernels.py wraps every one), which records them the same way.

The contract is a CUDA graph's: a forward that issues the same calls for inputs of the same shapes
(no data-dependent Python, no Python state carried between calls), with weights that do not change.
`Program.__call__` checks the second and the input shapes on every replay and returns None when either
differs; the sampler uses programs only for its own UNet classes, whose forwards keep the first.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["record", "recording", "unit", "Program"]

_LOCAL = threading.local()  # .recorder: the recording in progress on this thread, if any


# Why the last `record` on any thread returned no program (None after one that did), for tests and debugging.
why_not: Optional[str] = None


def recording() -> Optional["_Recorder"]:
    """The recording in progress on this thread, or None."""
    return getattr(_LOCAL, "recorder", None)


def unit(fn: Callable, args: tuple) -> Any:
    """fn(*args), recorded as one line when a recording is in progress on this thread: for calls the
    TorchFunctionMode cannot see (pybind bindings that write into an `out` argument)."""
    rec = recording()
    return fn(*args) if rec is None else rec.call(fn, args, {})


def _holds_tensor(value) -> bool:
    """Whether value is a tensor or holds one anywhere (in a tuple, list or dict, at any depth), or is an
    object that might (anything but a plain scalar, string, dtype, device, layout or memory format)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return not isinstance(value, (bool, int, float, complex, str, bytes, slice, type(None), type(Ellipsis),
                                  torch.dtype, torch.device, torch.memory_format, torch.layout))


def _nameable(out) -> bool:
    """A result holding tensors that the program can name: a tuple / list whose items are tensors or hold none."""
    return isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) or not _holds_tensor(v) for v in out)


class _Recorder(TorchFunctionMode):
    """Logs the forward's calls while it runs (see the module docstring); `source` writes the program."""

    def __init__(self, inputs: Sequence[torch.Tensor]):
        super().__init__()
        self.depth = 0
        self.names: Dict[int, str] = {}  # id(tensor) -> the name of the value it is
        self.keep: List[torch.Tensor] = []  # every named tensor, alive so that no id is reused while recording
        self.consts: Dict[str, Any] = {}
        # One entry per call: (the name of its tensor result, the names a sequence result is unpacked
        # into, or None for no result; the call's source; the names it reads).
        self.calls: List[Tuple[Any, str, List[str]]] = []
        self.failure: Optional[str] = None  # why the forward cannot be replayed, once known
        for i, t in enumerate(inputs):
            self._name(t, f"a{i}")

    def _name(self, t: torch.Tensor, name: str) -> str:
        self.names[id(t)] = name
        self.keep.append(t)
        return name

    def _const(self, value) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        if isinstance(value, torch.Tensor):
            self.keep.append(value)
        return name

    def _expr(self, value, reads: List[str]) -> str:
        """Source text for an argument: a named value (added to `reads`), a constant, or a tuple / list of
        those at any depth. A dict or another container holding tensors cannot be written: that fails
        the recording (the tensors in it could be values of this forward)."""
        if isinstance(value, torch.Tensor):
            name = self.names.get(id(value))
            if name is None:
                return self._const(value)
            reads.append(name)
            return name
        if type(value) in (tuple, list) and _holds_tensor(value):
            items = ", ".join(self._expr(v, reads) for v in value)
            return f"({items},)" if type(value) is tuple else f"[{items}]"
        if _holds_tensor(value):  # a dict, a tuple subclass (namedtuple), an object: not written as source
            self.failure = f"an argument of type {type(value).__name__} holds tensors"
        return self._const(value)

    def call(self, fn: Callable, args: tuple, kwargs: dict):
        if self.depth:
            return fn(*args, **kwargs)
        self.depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            self.depth -= 1
        recorded = out is None or isinstance(out, torch.Tensor) or _holds_tensor(out)  # else a query: dropped
        if recorded and not (out is None or isinstance(out, torch.Tensor) or _nameable(out)):
            # e.g. a dict, a nested tuple or an iterator: tensors the program could not name
            self.failure = f"{getattr(fn, '__name__', fn)} returned a {type(out).__name__}, which may hold tensors"
        elif recorded:
            reads: List[str] = []
            text = ", ".join([self._expr(a, reads) for a in args] +
                             [f"{k}={self._expr(v, reads)}" for k, v in kwargs.items()])
            text = f"{self._const(fn)}({text})"
            k = len(self.calls)
            if out is None:
                targets = None
            elif isinstance(out, torch.Tensor):
                targets = self._name(out, f"v{k}")
            else:  # a tuple or list of tensors (and maybe other values, unpacked into `_`)
                targets = [self._name(t, f"v{k}_{i}") if isinstance(t, torch.Tensor) else "_"
                           for i, t in enumerate(out)]
            self.calls.append((targets, text, reads))
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.call(func, args, kwargs or {})

    def source(self, n_inputs: int, result: str) -> str:
        """The program as a Python function. Each value is deleted after its last read, as eager code frees
        it when its last reference goes: kept to the end, every intermediate would be a fresh allocation
        (measured: the reference UNet's program 0.63x eager at digits16 batch 16 in fp32)."""
        last: Dict[str, int] = {}
        for i, (_, _, reads) in enumerate(self.calls):
            for name in reads:
                last[name] = i
        lines = []
        for i, (targets, text, reads) in enumerate(self.calls):
            def used(t: str) -> str:  # a value nothing reads later is not kept
                return t if t == result or last.get(t, -1) > i else "_"

            if targets is None:
                lines.append(text)
            elif isinstance(targets, str):
                lines.append(f"{used(targets)} = {text}")
            else:
                lines.append(f"{''.join(used(t) + ', ' for t in targets)}= {text}")
            dead = sorted({n for n in reads if last.get(n) == i and n != result})
            if dead:
                lines.append("del " + ", ".join(dead))
        args = ", ".join(f"a{i}" for i in range(n_inputs))
        return f"def program({args}):\n" + "".join(f"    {line}\n" for line in lines) + f"    return {result}\n"


def _signature(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs)


class Program:
    """A recorded forward: `program(*inputs)` replays it, or returns None where it does not apply (an input
    of another shape, stride, dtype or device than the recorded ones, or a watched weight changed)."""

    def __init__(self, source: str, consts: Dict[str, Any], signature: tuple, watched: Sequence[torch.Tensor],
                 n_calls: int):
        self.source, self.signature, self.n_calls = source, signature, n_calls
        scope = dict(consts)
        exec(compile(source, "<ddpm_fast cpu program>", "exec"), scope)  # noqa: S102 - our own generated code
        self._run = scope["program"]
        self._watched = [(t, t._version) for t in watched]

    def __call__(self, *inputs: torch.Tensor):
        if _signature(inputs) != self.signature or any(t._version != v for t, v in self._watched):
            return None
        return self._run(*inputs)


def record(fn: Callable, inputs: Sequence[torch.Tensor], watched: Sequence[torch.Tensor] = ()
           ) -> Tuple[Any, Optional[Program]]:
    """(fn(*inputs), its Program), or (fn(*inputs), None) where the forward cannot be replayed: a result it
    returns is not a tensor one of its recorded calls made, or a call returned tensors in a container
    the program cannot name (`why_not` says which). `watched`: tensors (the model's weights) whose
    in-place change makes the program refuse to replay (their version counters are checked on every call)."""
    if recording() is not None:
        raise RuntimeError("record: a recording is already in progress on this thread")
    global why_not
    if any(t.is_inference() for t in watched):  # made under inference_mode: no version counter to watch
        why_not = "a watched tensor is an inference tensor, whose in-place changes cannot be seen"
        return fn(*inputs), None
    rec = _Recorder(inputs)
    _LOCAL.recorder = rec
    try:
        with rec:
            out = fn(*inputs)
    finally:
        _LOCAL.recorder = None
    name = rec.names.get(id(out)) if isinstance(out, torch.Tensor) else None
    why_not = rec.failure or (None if name and not name.startswith("a") else
                              "the forward's result is not a tensor that one of its recorded calls made")
    if why_not is not None:
        return out, None
    source = rec.source(len(inputs), name)
    return out, Program(source, rec.consts, _signature(inputs), watched, len(rec.calls))
