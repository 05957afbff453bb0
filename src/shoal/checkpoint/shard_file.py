"""Writing one large file's bytes, in order, to disk: around the page cache where the file system takes it.

A merge writes its output once and syncs it (a finished folder survives a crash), so the disk's time is paid
either way; going through the page cache adds a copy into pages the kernel must first find. On a virtual machine
whose host takes back free memory, finding them is the slow part: on the 2-core test machine a 1.1 GB shard
took 3.0-3.9 s written through the cache into pages not used since the run began, 0.42-0.44 s into pages just
freed, and 0.63-0.74 s with O_DIRECT in either case (benchmarks/write_path.py). So a shard is written with O_DIRECT,
from one page-aligned staging buffer, where the file system takes it; and through the cache otherwise (tmpfs
before Linux 6.6, macOS), handing each WRITEBACK_STEP to the disk as it goes. The price: a reader right after (`shoal eval` of the
output, the next document of a multi-document recipe) reads it from disk, not from the cache: 1.7-2.4 s for that
shard there, against 0.13 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

BLOCK = 4096  # O_DIRECT's unit of offsets, lengths and addresses: a multiple of every device's logical block here
STAGE_BYTES = 16 * 1024**2  # the staging buffer, a multiple of BLOCK: one pwrite each (8 and 32 MiB: the same time)
WRITEBACK_STEP = 32 * 1024**2  # bytes written through the cache between two requests that the disk take them
_SYNC_FILE_RANGE_WRITE = 2  # sync_file_range's flag: start writing the range's dirty pages, without waiting
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the system has none (macOS)


def _writeback_starter() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(fd, offset, count, flags), or None where the C library has none (macOS)."""
    start = getattr(ctypes.CDLL(None), "sync_file_range", None)
    if start is not None:
        start.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        start.restype = ctypes.c_int
    return start


_START_WRITEBACK = _writeback_starter()


class ShardFile(Protocol):
    """DirectFile or CachedFile."""

    def write(self, data: memoryview) -> None:
        """Append data (bytes, format "B")."""

    def close(self) -> None:
        """Everything written is on disk (synced) and the file closed."""

    def abort(self) -> None:
        """Close without finishing."""


def _named(error: OSError, path: Path) -> OSError:
    """error with path as its file name (os.pwrite's and a file's write's name none), so the message says which."""
    return OSError(error.errno, error.strerror, str(path)) if error.filename is None else error


class Stage:
    """One page-aligned buffer of STAGE_BYTES, reused by each shard a writer writes directly; allocated once."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, STAGE_BYTES)
        self.view = memoryview(self._map)

    def release(self) -> None:
        with contextlib.suppress(BufferError):  # a write still holds it (a second Ctrl-C): the collector closes it
            self.view.release()
            self._map.close()


class DirectFile:
    """A file written with O_DIRECT: bytes are gathered in the stage and written a full stage at a time; the last
    piece is padded to a BLOCK and the file cut back to its length."""

    def __init__(self, path: Path, fd: int, stage: Stage) -> None:
        self.path, self._fd, self._stage = path, fd, stage.view
        self._filled = 0  # bytes gathered in the stage
        self._offset = 0  # where in the file the stage's first byte goes

    def write(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), len(self._stage) - self._filled)
            self._stage[self._filled:self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == len(self._stage):
                self._put(self._filled)

    def _put(self, count: int) -> None:
        """Write the stage's first count bytes (a multiple of BLOCK) at the file's offset; a short write goes on
        from the last whole block it wrote, so every write stays aligned."""
        done = 0
        try:
            while done < count:
                wrote = os.pwrite(self._fd, self._stage[done:count], self._offset + done)
                if wrote < BLOCK:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += wrote - wrote % BLOCK
        except OSError as error:
            raise _named(error, self.path) from None
        self._offset += count
        self._filled = 0

    def close(self) -> None:
        size = self._offset + self._filled
        try:
            if self._filled:
                padded = -(-self._filled // BLOCK) * BLOCK
                self._stage[self._filled:padded] = bytes(padded - self._filled)
                self._put(padded)
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as error:
            raise _named(error, self.path) from None
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        os.close(self._fd)


class CachedFile:
    """A file written through the page cache; each WRITEBACK_STEP written is handed to the disk as it goes, so the
    closing fsync waits only for the last of it (1.1 GB into pages just freed, written and synced: 0.44 s against
    1.18 without)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # closed by close or abort
        self._handed = 0

    def write(self, data: memoryview) -> None:
        try:
            self._file.write(data)
            end = self._file.tell()
            if _START_WRITEBACK is not None and end - self._handed >= WRITEBACK_STEP:
                self._file.flush()  # a request, not read back: a file system that refuses it is synced at the end
                _START_WRITEBACK(self._file.fileno(), self._handed, end - self._handed, _SYNC_FILE_RANGE_WRITE)
                self._handed = end
        except OSError as error:
            raise _named(error, self.path) from None

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise _named(error, self.path) from None
        finally:
            self.abort()

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes what a full disk refused again: the first error counts
            self._file.close()


def open_direct(path: Path, stage: Stage) -> DirectFile | None:
    """path created (or emptied) for writing with O_DIRECT, or None where the system or file system refuses it:
    tried with one zero BLOCK at the start, which the first stage written replaces."""
    if not _O_DIRECT:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return None
        raise _named(error, path) from None
    stage.view[:BLOCK] = bytes(BLOCK)
    try:
        os.pwrite(fd, stage.view[:BLOCK], 0)
    except OSError as error:
        os.close(fd)
        if error.errno == errno.EINVAL:
            return None
        raise _named(error, path) from None
    return DirectFile(path, fd, stage)
