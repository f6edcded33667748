"""Atomic file writes: a file appears complete or not at all (never half-written on a crash,
Ctrl-C or kill -9). Every file the package writes (checkpoints, images, training state) goes here."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_destination(path: Union[str, Path]) -> Path:
    """`path` as a Path, if writing a file there replaces at most a regular file.

    os.replace swaps whatever sits at `path` for the new file: a device node (/dev/full), a FIFO, a
    socket, or a symlink to one of them (or to nothing) would silently become a regular file, and as
    root that is a real device node gone. Such a destination is a ValueError naming it.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return path
    try:
        mode = os.stat(path).st_mode  # follows a symlink to what it points at
    except FileNotFoundError:
        raise ValueError(f"cannot write {path}: it is a symlink to nothing ({os.readlink(path)})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"cannot write {path}: it is a directory")
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        via = " (through a symlink)" if path.is_symlink() else ""
        raise ValueError(f"cannot write {path}: it exists and is {kind}{via}, not a regular file")
    return path


def write_atomic(path: Union[str, Path], write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call write(f) on a temp file in `path`'s folder, fsync it, give it the usual permissions
    (mkstemp makes 0600 files) and os.replace it onto `path`; the temp file is removed on any failure.
    A destination that exists and is not a regular file is refused first (check_destination). OSError
    from creating the temp file (missing or unwritable folder) propagates to the caller.
    durable=False skips both fsyncs: the file is still complete or absent after a killed process (the
    rename is atomic and the page cache outlives the process), only not after a power loss or OS crash;
    for many small files (a sampling run's images) where the fsyncs would cost more than the writes."""
    path = check_destination(path)
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
