"""Content digests of the files of a model folder: whole (each file read at most once per process), or sampled."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

_BLOB = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
"""A Hugging Face cache blob's name: the git SHA-1 of a small file or the SHA-256 of a large one (its content)."""


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """The SHA-256 of a file's bytes; the file's size, time and inode key the memo, so a changed file is read again."""
    del size, mtime_ns, inode
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _blob(real: Path) -> str | None:
    """The digest of a resolved file that is a Hugging Face cache blob: its name (the Hub's hash of its content)."""
    return f"blob:{real.name}" if real.parent.name == "blobs" and _BLOB.match(real.name) else None


def file_digest(path: Path, portable: bool = False) -> str:
    """A file's content digest: the name of the Hugging Face cache blob it links to (the Hub's hash of its content,
    free), else the SHA-256 of its bytes. portable: the SHA-256 of its bytes whatever it links to, so that a copy
    of it on another machine digests alike."""
    real = path.resolve()
    if not portable and (blob := _blob(real)):
        return blob
    stat = real.stat()
    return f"sha256:{_sha256(str(real), stat.st_size, stat.st_mtime_ns, stat.st_ino)}"


def files_digest(folder: Path, names: Iterable[str], portable: bool = False) -> str:
    """One digest of the named files of folder, by name and content: equal digests, equal files (portable: as
    file_digest's)."""
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        digest.update(f"{name}\0{file_digest(folder / name, portable)}\n".encode())
    return digest.hexdigest()


WINDOWS, WINDOW_BYTES = 16, 1 << 16
"""A sampled digest reads this many windows of this many bytes, spread evenly over a file."""


def sampled_digest(path: Path) -> str:
    """A file's digest from its size and WINDOWS windows of WINDOW_BYTES spread over it (1 MiB whatever the
    size): the name of the Hugging Face cache blob it links to where it is one (free and whole), else what tells a
    replaced file, or one of another size, at once; a change confined to a few small regions may not show."""
    real = path.resolve()
    if blob := _blob(real):
        return blob
    size = real.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(real, "rb") as handle:
        for offset in sorted({size * i // WINDOWS for i in range(WINDOWS)}):
            handle.seek(offset)
            digest.update(handle.read(WINDOW_BYTES))
    return f"sampled:{digest.hexdigest()}"


def model_digest(folder: Path) -> str:
    """One digest of what a model folder's weights and architecture are: config.json whole, each weights file
    sampled (sampled_digest)."""
    config = folder / "config.json"  # a folder without one is refused by whatever opens it
    digest = hashlib.sha256(f"config.json\0{file_digest(config) if config.is_file() else 'absent'}\n".encode())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}\0{sampled_digest(weights)}\n".encode())
    return digest.hexdigest()
