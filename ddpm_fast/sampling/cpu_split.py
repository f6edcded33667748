"""The CPU batch split: a fast sampling run's images as two independent halves, one forked process per core.

Why processes, not threads: every image's trajectory depends on its own row only, and with in-kernel
Philox noise keyed by each image's global index (`image_offset`) a half sampled on its own is the same
run. On the 2-core dev VM a batch-16 run on two OpenMP threads lost to two batch-8 runs side by side
with one thread each: every op's fork/join waits for the slower vCPU. Two Python threads for the
halves got a little of that back (fp32 forward 1.11x) but lost most of it to GIL hand-offs between
ops (a half forward alone 24 ms, beside the other 36 ms); two processes share nothing per step:
benchmarks/PERF_NOTES.md, CPU session 5.

The parent forks after the model is prepared (converted, fused, time table, packed weights), so each
child starts at once on copy-on-write memory; each runs its half with one intra-op thread, writes its
x_0 into a shared buffer and counts its steps into a shared counter (the parent's progress bar), then
leaves with os._exit. A child's exception is re-raised in the parent (its own type where it pickles);
a child dies with its parent (PR_SET_PDEATHSIG), and an interrupted parent kills its children.
Where it applies is `split_parts` (measured configurations only); fast_loop's `cpu_split` overrides it.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import time
import traceback
from typing import Callable, List, Tuple

import torch
from tqdm.auto import tqdm

SPLIT_MIN_BATCH = 16  # the measured batch (the main job's); smaller batches were not measured
SPLIT_DTYPES = (torch.float32, torch.bfloat16)
# fork() from a process that may hold OpenMP threads: Linux only, where the children set one thread.
CAN_FORK = sys.platform.startswith("linux") and hasattr(os, "fork")
_POLL_S = 0.05  # how often the waiting parent looks at its children
_PR_SET_PDEATHSIG = 1
_REPORT_MAX = 60000  # bytes a child reports: under a pipe's 64 KiB buffer, so its write never blocks

RunHalf = Callable[[int, int, Callable[[], None]], torch.Tensor]


def split_parts(dtype: torch.dtype, batch: int, fused: bool, channels_last: bool) -> int:
    """How many processes fast_loop splits a CPU run into by default: 2 for the fused UNet in
    channels_last, fp32 or bf16, at batch >= SPLIT_MIN_BATCH with exactly 2 intra-op threads, on Linux
    (where it measured faster), else 1. Other thread counts and batches were not measured."""
    if not (CAN_FORK and fused and channels_last and dtype in SPLIT_DTYPES):
        return 1
    return 2 if batch >= SPLIT_MIN_BATCH and torch.get_num_threads() == 2 else 1


def halves(batch: int) -> List[Tuple[int, int]]:
    """The image ranges [lo, hi) of the two parts (the second takes the odd image)."""
    mid = batch // 2
    return [(0, mid), (mid, batch)]


def run_split(run_half: RunHalf, shape: torch.Size, n_steps: int, progress: bool = True) -> torch.Tensor:
    """x_0 [B, ...] fp32 of a run of `n_steps` steps over `shape`'s B images, as two forked children:
    child k returns run_half(lo, hi, tick) (its images' x_0, calling tick() after each step)."""
    if not CAN_FORK:
        raise RuntimeError("the CPU batch split needs os.fork on Linux")
    out = torch.empty(shape, dtype=torch.float32).share_memory_()
    counts = torch.zeros(2, dtype=torch.int64).share_memory_()
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        stream.flush()
    children = []
    for k, (lo, hi) in enumerate(halves(shape[0])):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(run_half, lo, hi, out, counts, k, write_fd)  # never returns
        os.close(write_fd)
        children.append((pid, read_fd))
    try:
        codes = _wait(children, counts, n_steps, progress)
    except BaseException:  # KeyboardInterrupt included: no child outlives the call
        _kill(children)
        raise
    finally:
        reports = [_read_all(fd) for _, fd in children]
    for (lo, hi), code, report in zip(halves(shape[0]), codes, reports):
        if code != 0:
            _raise_child_error(lo, hi, code, report)
    return out


def _child(run_half: RunHalf, lo: int, hi: int, out: torch.Tensor, counts: torch.Tensor, k: int,
           write_fd: int) -> None:
    code = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles Ctrl-C and kills the children
        torch.set_num_threads(1)

        def tick() -> None:
            counts[k] += 1

        out[lo:hi].copy_(run_half(lo, hi, tick))
        code = 0
    except BaseException as exc:  # reported to the parent, which raises it
        text = traceback.format_exc()
        try:
            payload = pickle.dumps((exc, text))
        except Exception:  # an exception that does not pickle: its traceback as text
            payload = b""
        if not payload or len(payload) > _REPORT_MAX:  # a cut pickle would not load: the traceback's end
            payload = pickle.dumps((None, text[-(_REPORT_MAX // 2):]))
        os.write(write_fd, payload)
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the child still ends with its run
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _wait(children, counts: torch.Tensor, n_steps: int, progress: bool) -> List[int]:
    codes = [None] * len(children)
    alive = {pid: k for k, (pid, _) in enumerate(children)}
    with tqdm(total=n_steps, desc="sampling (fast, 2 processes)", disable=not progress, leave=False) as bar:
        while alive:
            for pid in list(alive):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[alive.pop(pid)] = os.waitstatus_to_exitcode(status)
            bar.update(int(counts.min()) - bar.n)
            if alive:
                time.sleep(_POLL_S)
    return codes


def _kill(children) -> None:
    for pid, _ in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _raise_child_error(lo: int, hi: int, code: int, report: bytes) -> None:
    where = f"the CPU batch split's process for images [{lo}, {hi})"
    exc, text = None, ""
    if report:
        try:
            exc, text = pickle.loads(report)  # our own child's report
        except Exception:
            text = report.decode(errors="replace")
    if isinstance(exc, BaseException):
        raise exc from RuntimeError(f"in {where}:\n{text}")
    raise RuntimeError(f"{where} ended with exit status {code}" + (f":\n{text}" if text else ""))
