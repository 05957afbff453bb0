"""One writer per output or run folder: an exclusive lock on a file beside the folder, which every shoal process
takes before writing the folder and the kernel lets go of when its holder dies (kill -9 leaves no stale lock)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.errors import ShoalError


def lock_file(folder: Path) -> Path:
    """The lock file of `folder`: `.NAME.lock` beside it (so the folder need not exist yet)."""
    folder = folder.resolve()  # two spellings of one folder (relative, through a symlink) share one lock
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock for the block; a ShoalError, with nothing written, if another process holds it."""
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShoalError(f"{folder} is being written by another shoal process; wait for it to end (or stop it), "
                             "or use another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file as it let go: lock the file that is there now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no other process holds a lock on a removed file
        os.close(fd)
