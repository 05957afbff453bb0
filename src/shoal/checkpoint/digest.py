"""Content digests of the files of a model folder: whole (each file read at most once per process), or sampled."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
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


def sampled_digest(path: Path, portable: bool = False) -> str:
    """A file's digest from its size and WINDOWS windows of WINDOW_BYTES spread over it (1 MiB whatever the
    size): the name of the Hugging Face cache blob it links to where it is one (free and whole; not when portable,
    so that a copy on another machine digests alike), else what tells a replaced file, or one of another size, at
    once; a change confined to a few small regions may not show."""
    real = path.resolve()
    if not portable and (blob := _blob(real)):
        return blob
    size = real.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(real, "rb") as handle:
        for offset in sorted({size * i // WINDOWS for i in range(WINDOWS)}):
            handle.seek(offset)
            digest.update(handle.read(WINDOW_BYTES))
    return f"sampled:{digest.hexdigest()}"


MODEL_FILES = "its config.json or weights, or an adapter's"
"""What a model's digest covers, for a message."""


def model_digest(folder: Path, portable: bool = False) -> str:
    """One digest of what a model folder's weights and architecture are: config.json whole (and a LoRA adapter's
    adapter_config.json where the folder is an adapter's), each weights file sampled (sampled_digest). portable:
    alike for a copy on another machine (file_digest)."""
    config = folder / "config.json"  # a folder without one is refused by whatever opens it
    known = file_digest(config, portable) if config.is_file() else "absent"
    digest = hashlib.sha256(f"config.json\0{known}\n".encode())
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        digest.update(f"{adapter.name}\0{file_digest(adapter, portable)}\n".encode())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}\0{sampled_digest(weights, portable)}\n".encode())
    return digest.hexdigest()


def first_changed(recorded: Mapping[str, str], now: Mapping[str, str], missing_counts: bool) -> str | None:
    """The first name (in sorted order) recorded with a digest other than the one now; a name recorded but absent
    now counts as changed where missing_counts, a name not recorded never does."""
    return min((name for name, digest in recorded.items()
                if now.get(name, None if missing_counts else digest) != digest), default=None)
