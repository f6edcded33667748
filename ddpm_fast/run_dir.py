"""A training run's output folder: what may be in it before a run starts, and one writer at a time.

A fresh run must not mix into someone else's files: it refuses a folder that already holds a
checkpoint (that is what `resume` is for), a model file, or a `loss.csv` it did not write. The one
leftover it takes over is its own `loss.csv` from a run killed before its first checkpoint, which it
starts afresh. A run holds an exclusive lock on `RUN_DIR/.lock` until it ends, so a second process
(a resubmitted job, a typo in a script) cannot interleave checkpoints and log rows with the first.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

LOCK_NAME = ".lock"


def _header_is(path: Path, columns: Sequence[str]) -> bool:
    try:
        with open(path, newline="") as f:
            return f.readline().strip() == ",".join(columns)
    except (OSError, UnicodeDecodeError):
        return False


def check_fresh_run(out: Path, checkpoint: Path, model: Path, log: Path, log_columns: Sequence[str]) -> None:
    """Raise FileExistsError naming the file if a new run in `out` would overwrite or mix into it."""
    if checkpoint.exists():
        raise FileExistsError(f"{str(out)!r} already holds a training checkpoint; pass resume=True "
                              "(--resume) to continue it, or choose another output folder")
    if model.exists():
        raise FileExistsError(f"{str(out)!r} already holds {model.name} (from another run?); "
                              "choose another output folder or move that file away")
    if log.exists() and not _header_is(log, log_columns):
        raise FileExistsError(f"{str(log)!r} was not written by ddpm_fast's trainer; "
                              "choose another output folder or move that file away")


class RunLock:
    """An exclusive advisory lock (flock) on `out/.lock`, created with `out` if needed.

    `release(started=False)` unlocks and removes what the lock itself created (the lock file, and the
    folder if it is still empty), so a run that failed its checks leaves the folder as it found it. Where flock does not
    exist (Windows), the lock only records the pid.
    """

    def __init__(self, out: Path):
        self.out = out
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_NAME
        self.created_file = not self.path.exists()
        self._f = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.seek(0)
                holder = self._f.read().strip() or "unknown"
                self._f.close()
                raise FileExistsError(f"{str(out)!r} is in use by another training process (pid {holder}); "
                                      "wait for it to finish or choose another output folder") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(str(os.getpid()))
        self._f.flush()

    def release(self, started: bool) -> None:
        if self._f.closed:
            return
        self._f.close()  # closing the file drops the flock
        if not started and self.created_file:  # a run that never started leaves the folder as it found it
            try:
                self.path.unlink()
                if self.created:
                    self.out.rmdir()  # only if empty
            except OSError:
                pass


def note(message: str) -> None:
    print(f"ddpm_fast.train: {message}", file=sys.stderr)


def resumable(checkpoint: Path, resume: bool) -> bool:
    """Whether to resume: `resume` and a checkpoint exists. `resume` without one starts a new run (with
    a note), so a job script can always pass --resume, even when it was killed before its first checkpoint."""
    if resume and not checkpoint.is_file():
        note(f"no checkpoint in {str(checkpoint.parent)!r} yet: starting a new run")
        return False
    return resume


def model_file_step(path: Path) -> Optional[int]:
    """The `train_step` recorded in a model file's metadata, or None (no file, older file, unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["train_step"])
    except Exception:  # noqa: BLE001 - any unreadable or older file just gets re-exported
        return None
