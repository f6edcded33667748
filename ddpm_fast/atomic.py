"""Atomic file writes: a file appears complete or not at all (never half-written on a crash,
Ctrl-C or kill -9). Every file the package writes (checkpoints, images, training state) goes here."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Union[str, Path], write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call write(f) on a temp file in `path`'s folder, fsync it, give it the usual permissions
    (mkstemp makes 0600 files) and os.replace it onto `path`; the temp file is removed on any failure.
    OSError from creating the temp file (missing or unwritable folder) propagates to the caller.
    durable=False skips both fsyncs: the file is still complete or absent after a killed process (the
    rename is atomic and the page cache outlives the process), only not after a power loss or OS crash;
    for many small files (a sampling run's images) where the fsyncs would cost more than the writes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return path
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path
