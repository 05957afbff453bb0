"""Streaming sharded safetensors output into a model folder that appears atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.checkpoint.shard_file import CachedFile, ShardFile, Stage, open_direct
from shoal.errors import ShoalError
from shoal.folder_lock import folder_lock

DTYPE_TAGS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """What the writer must know of a tensor before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def _shard_header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_TAGS[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [shard for shard in shards if shard]


class ModelFolderWriter:
    """Writes tensors, one at a time and in the planned order, straight into their final shard files.

    Every shard's header is known up front (names, shapes and dtypes come from the plan), so
    no shard is ever held in memory: each tensor goes from the merge to the file (shard_file: around the page
    cache where the file system takes it).
    """

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_bytes: int = 2 * 1024**3):
        self.folder = folder
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(s, spec) for s, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._file: ShardFile | None = None
        self._file_index = -1
        self._stage: Stage | None = Stage()
        self.direct = True  # until a file system refuses O_DIRECT (known once the first shard is opened)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} was not planned")
        shard, spec = self._order[self._next]
        if spec.name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"expected {spec.name} {spec.shape} {spec.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._file_index:
            self._open_shard(shard)
        assert self._file is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def _open_shard(self, shard: int) -> None:
        self._close_file()
        path = self.folder / self.shard_names[shard]
        opened = open_direct(path, self._stage) if self._stage is not None else None  # None once refused
        if opened is None:
            self.direct = False
            self._release_stage()
        self._file = opened or CachedFile(path)
        self._file.write(memoryview(_shard_header(self.shards[shard])))
        self._file_index = shard

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def _release_stage(self) -> None:
        if self._stage is not None:
            self._stage.release()
            self._stage = None

    def close(self) -> None:
        """Finish the last shard and write the index; fails if a planned tensor was never written."""
        try:
            self._close_file()
        finally:
            self._release_stage()
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"tensor {missing!r} was planned but never written")
        weight_map = {spec.name: self.shard_names[s] for s, spec in self._order}
        total = sum(spec.nbytes for _, spec in self._order)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.abort()
        self._release_stage()


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary folders `.NAME.tmp-PID` beside out_dir that processes now dead left."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def check_not_current(folder: Path, what: str, by: str) -> None:
    """Refuse to remove a folder that is the current folder or holds it. what: the folder, as the message names it;
    by: what would remove it."""
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise ShoalError(f"{what} is the current folder or holds it, and {by} would remove it whole; give another "
                         "folder")


def check_replaceable(out_dir: Path, role: str = "OUT_DIR") -> None:
    """Refuse to replace (--overwrite) an existing out_dir that is not a model folder, since replacing removes all of
    it: the current folder or one that holds it, a file, a folder of other files (no config.json; an empty one is
    taken). role: what the folder is to the user, for the message."""
    out = out_dir.resolve()
    if not out.exists():
        return
    check_not_current(out_dir, f"{role} {out_dir}", "--overwrite")
    if not out.is_dir():
        raise ShoalError(f"{role} {out_dir} is a file; --overwrite replaces only a model folder")
    if not (out / "config.json").is_file() and any(out.iterdir()):
        raise ShoalError(f"{role} {out_dir} is not a model folder (no config.json), and --overwrite would remove "
                         "everything in it; give another folder, or remove it yourself")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside out_dir that becomes out_dir only if the block finishes.

    An error, Ctrl-C or kill leaves out_dir as it was (absent, or the old folder when overwriting; only a model
    folder is replaced, see check_replaceable). out_dir's lock is held throughout: a second process writing the
    same out_dir at once is refused, before it writes anything.
    """
    out_dir = Path(out_dir).resolve()
    with folder_lock(out_dir):
        if out_dir.exists() and not overwrite:
            raise ShoalError(f"{out_dir} already exists; pass --overwrite to replace it")
        check_replaceable(out_dir)
        remove_stale_temporaries(out_dir)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
