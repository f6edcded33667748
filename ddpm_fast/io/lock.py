"""An exclusive lock on a folder for the life of one run, so that two runs never write into it at once.

fcntl.flock on a lock file inside the folder: the OS drops the lock when its holder exits, however it
exits (kill -9 included), so a crashed run never leaves the folder locked. flock locks belong to an open
file description, so a second lock from the same process conflicts too; a set of the folders this
process holds covers file systems (NFS) where flock is emulated by per-process POSIX locks.
The holder writes "pid host" into the file for the refusal message, and removes the file while still
holding the lock; a run that locked a file just removed sees that (inode check) and locks afresh.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "folder_lock"]

LOCK_NAME = ".ddpm_fast.lock"
_HELD: set = set()  # (st_dev, st_ino) of the folders this process has locked
_HELD_GUARD = threading.Lock()


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()[:2]
        return f" (pid {pid} on {host})"
    except (OSError, ValueError):
        return ""  # the holder has not written its name yet, or removed the file


def _refuse(folder: Path, path: Path):
    return ValueError(f"another run is writing to {folder}{_holder(path)}: wait for it to end, or use another "
                      "folder")


def _open_locked(folder: Path, path: Path) -> int:
    """An fd of the lock file, locked (-1: the file system cannot lock); ValueError when another run
    holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(folder, path) from None
        except OSError as e:  # a file system without flock (Lustre mounted without -o flock): run unlocked
            os.close(fd)
            warnings.warn(f"cannot lock {folder} ({e.strerror or e}): nothing stops a second run from writing "
                          "into it at the same time", RuntimeWarning, stacklevel=4)
            return -1
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed this file after we opened it: lock the new one


@contextmanager
def folder_lock(folder) -> Iterator[Path]:
    """Hold `folder`'s run lock inside the block (the folder must exist); ValueError naming the folder
    and, when known, the holder's pid and host if another run (this process included) holds it."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    st = os.stat(folder)
    key = (st.st_dev, st.st_ino)
    with _HELD_GUARD:
        if key in _HELD:
            raise _refuse(folder, path)
        _HELD.add(key)
    try:
        fd = _open_locked(folder, path)
        if fd < 0:
            yield path
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            yield path
        finally:
            try:
                os.unlink(path)  # while locked: see the module docstring
            except OSError:
                pass
            os.close(fd)
    finally:
        with _HELD_GUARD:
            _HELD.discard(key)
