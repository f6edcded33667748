"""A training run's output folder: what may be in it before a run starts, and one writer at a time.

A fresh run must not mix into someone else's files: it refuses a folder that already holds a
checkpoint (that is what `resume` is for), a model file, a `loss.csv` it did not write, or any other
file the trainer does not write. The leftovers it takes over are its own: a `loss.csv` from a run
killed before its first checkpoint (started afresh), its lock file, temp files of a killed write and
sample grids. A run holds an exclusive lock on `RUN_DIR/.lock` until it ends, so a second process
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
    _check_only_run_files(out, (checkpoint.name, model.name, log.name))
    if checkpoint.exists():
        raise FileExistsError(f"{str(out)!r} already holds a training checkpoint; pass resume=True "
                              "(--resume) to continue it, or choose another output folder")
    if model.exists():
        raise FileExistsError(f"{str(out)!r} already holds {model.name} (from another run?); "
                              "choose another output folder or move that file away")
    if log.exists() and not _header_is(log, log_columns):
        raise FileExistsError(f"{str(log)!r} was not written by ddpm_fast's trainer; "
                              "choose another output folder or move that file away")


def _check_only_run_files(out: Path, run_files: Sequence[str]) -> None:
    """Refuse a folder holding anything a training run does not write (run_files, the lock, their temp
    files, samples/step_*.png), naming the first such entry."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        name = entry.name
        ours = (name in run_files or name == LOCK_NAME
                or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in run_files))
        if name == "samples" and entry.is_dir() and not entry.is_symlink():
            ours = all(p.name.startswith("step_") and p.suffix == ".png" for p in entry.iterdir())
        if not ours:
            raise FileExistsError(f"{str(out)!r} holds {name!r}, which a training run does not write; a new run "
                                  "needs an empty folder (or one of its own): choose another output folder")


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
