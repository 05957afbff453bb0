"""The model writer's shard files: written around the page cache (O_DIRECT) through a staging buffer where the file
system takes it, else through the cache, handing what is written to the disk as it goes (checkpoint.shard_file)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

from shoal.checkpoint import shard_file
from shoal.checkpoint.writer import ModelFolderWriter, TensorSpec

TENSORS = {f"t{i}": torch.arange(100 * (i + 1), dtype=torch.float32) for i in range(16)}  # 400 ... 6400 bytes


def _write(folder, tensors=TENSORS, max_shard_bytes: int = 20_000) -> ModelFolderWriter:
    folder.mkdir()
    writer = ModelFolderWriter(folder, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                               max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return writer


def _read(folder, writer: ModelFolderWriter) -> dict[str, torch.Tensor]:
    read: dict[str, torch.Tensor] = {}
    for shard in writer.shard_names:
        read.update(load_file(folder / shard))
    return read


def _takes_direct(folder) -> bool:
    stage = shard_file.Stage()
    try:
        opened = shard_file.open_direct(folder / "probe", stage)
        if opened is not None:
            opened.abort()
        return opened is not None
    finally:
        stage.release()
        (folder / "probe").unlink(missing_ok=True)


def _cached_only(monkeypatch) -> None:
    monkeypatch.setattr(shard_file, "_O_DIRECT", 0)


def test_direct_shards_hold_the_same_bytes_as_cached_ones(tmp_path, monkeypatch) -> None:
    """Through a stage of two blocks, tensors land across its edges and the headers' lengths are not multiples of a
    block; each shard is cut back to its own length (no padding left) and equals, byte for byte, the shard written
    through the cache."""
    if not _takes_direct(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(shard_file, "STAGE_BYTES", 2 * shard_file.BLOCK)
    direct = _write(tmp_path / "direct")
    assert direct.direct and len(direct.shard_names) == 3  # 54,400 bytes of data
    _cached_only(monkeypatch)
    cached = _write(tmp_path / "cached")
    assert not cached.direct
    for shard in direct.shard_names:
        data = (tmp_path / "direct" / shard).read_bytes()
        assert len(data) % shard_file.BLOCK != 0  # so the cut is tested
        assert data == (tmp_path / "cached" / shard).read_bytes()
    read = _read(tmp_path / "direct", direct)
    assert read.keys() == TENSORS.keys() and all(torch.equal(t, read[n]) for n, t in TENSORS.items())


def test_a_tensor_larger_than_the_stage_and_an_empty_one(tmp_path, monkeypatch) -> None:
    if not _takes_direct(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(shard_file, "STAGE_BYTES", shard_file.BLOCK)
    tensors = {"big": torch.randn(5000), "empty": torch.zeros(0), "last": torch.arange(3, dtype=torch.int64)}
    writer = _write(tmp_path / "out", tensors)
    read = _read(tmp_path / "out", writer)
    assert writer.direct and all(torch.equal(t, read[n]) for n, t in tensors.items())


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_a_file_system_that_refuses_o_direct_is_written_through_the_cache(tmp_path, monkeypatch, refusal) -> None:
    """Some refuse the flag at open (tmpfs before Linux 6.6), some only at the first write; both get the same
    files, through the cache, and every shard after the first is opened that way without trying again."""
    if refusal == "write" and not _takes_direct(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open already")
    real_open, tried = os.open, []

    def refusing_open(path, flags, *args):
        if flags & shard_file._O_DIRECT:
            tried.append(path)
            if refusal == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refusing_pwrite(fd, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(shard_file, "_O_DIRECT", getattr(os, "O_DIRECT", 0o40000))
    monkeypatch.setattr(shard_file.os, "open", refusing_open)
    if refusal == "write":
        monkeypatch.setattr(shard_file.os, "pwrite", refusing_pwrite)
    writer = _write(tmp_path / "out")
    assert not writer.direct and len(tried) == 1 and len(writer.shard_names) == 3
    read = _read(tmp_path / "out", writer)
    assert all(torch.equal(t, read[n]) for n, t in TENSORS.items())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("full_at", ["a full stage", "the last block"])
def test_a_full_disk_names_the_shard_and_closes_it(tmp_path, monkeypatch, full_at) -> None:
    """os.pwrite's error names no file; the writer's does, for the message the CLI prints. A shard refused at its
    last, padded block (written as it closes) is closed all the same."""
    if not _takes_direct(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_pwrite = os.pwrite
    stage = 2 * shard_file.BLOCK if full_at == "a full stage" else 64 * shard_file.BLOCK  # > a shard: one put, at close

    def full(fd, data, offset):
        if offset > 0 or len(data) > shard_file.BLOCK:  # the probe's block goes in
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_file, "STAGE_BYTES", stage)
    monkeypatch.setattr(shard_file.os, "pwrite", full)
    (tmp_path / "out").mkdir()
    before = _open_fds()
    writer = ModelFolderWriter(tmp_path / "out", [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in TENSORS.items()],
                               max_shard_bytes=20_000)
    with pytest.raises(OSError) as raised:
        try:
            for name, tensor in TENSORS.items():
                writer.write(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "out" / "model-00001-of-00003.safetensors")
    assert _open_fds() == before


def test_a_short_write_goes_on_from_its_last_whole_block(tmp_path, monkeypatch) -> None:
    """A write that stops inside a block (a file system may) is taken up again at that block's start, so every write
    stays aligned; the shards are as whole writes make them."""
    if not _takes_direct(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_pwrite, writes = os.pwrite, []

    def short(fd, data, offset):  # two blocks written, reported as stopping 100 bytes into the second
        writes.append((offset, len(data)))
        if len(data) < 2 * shard_file.BLOCK:
            return real_pwrite(fd, data, offset)
        return real_pwrite(fd, data[:2 * shard_file.BLOCK], offset) - 100

    monkeypatch.setattr(shard_file, "STAGE_BYTES", 4 * shard_file.BLOCK)
    monkeypatch.setattr(shard_file.os, "pwrite", short)
    writer = _write(tmp_path / "out")
    assert all(offset % shard_file.BLOCK == 0 and count % shard_file.BLOCK == 0 for offset, count in writes)
    assert any(count < 4 * shard_file.BLOCK and offset % (4 * shard_file.BLOCK) for offset, count in writes)
    read = _read(tmp_path / "out", writer)
    assert all(torch.equal(t, read[n]) for n, t in TENSORS.items())


def test_a_full_disk_through_the_cache_names_the_shard(tmp_path, monkeypatch) -> None:
    """Through the cache too, and closing the file (which flushes what the disk refused again) does not replace
    the named error with a nameless one."""
    _cached_only(monkeypatch)
    path = tmp_path / "shard"
    file = shard_file.CachedFile(path)
    real = file._file

    class Full:
        def __getattr__(self, name):
            return getattr(real, name)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    file._file = Full()
    file.write(memoryview(b"x" * 100))
    with pytest.raises(OSError) as raised:
        file.close()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert real.closed


def test_cached_shards_are_handed_over_a_step_at_a_time_once_they_are_in_the_file(tmp_path, monkeypatch) -> None:
    """Each request names the bytes of its shard written since the one before (from the shard's start), once a
    step's worth are in the file (flushed out of Python's buffer); what is left for the fsync is under a step and a
    tensor, and the shards read back as written."""
    asked: list[tuple[str, int, int, int]] = []

    def start(fd: int, offset: int, count: int, flags: int) -> int:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        asked.append((name, offset, count, os.fstat(fd).st_size))
        assert flags == 2  # start writing, do not wait
        return 0

    _cached_only(monkeypatch)
    monkeypatch.setattr(shard_file, "_START_WRITEBACK", start)
    monkeypatch.setattr(shard_file, "WRITEBACK_STEP", 3000)
    writer = _write(tmp_path / "out")
    assert len(writer.shard_names) == 3  # 54,400 bytes of data
    for shard in writer.shard_names:
        ranges = [(offset, count, size) for name, offset, count, size in asked if name == shard]
        ends = [offset + count for offset, count, _ in ranges]
        assert [offset for offset, _, _ in ranges] == [0, *ends[:-1]]  # one after the other, from the shard's start
        assert all(count >= 3000 for _, count, _ in ranges)
        assert all(size >= end for (_, _, size), end in zip(ranges, ends))  # in the file when asked for
        assert (tmp_path / "out" / shard).stat().st_size - (ends[-1] if ends else 0) < 3000 + 6400
    assert len(asked) >= 9
    read = _read(tmp_path / "out", writer)
    assert read.keys() == TENSORS.keys() and all(torch.equal(t, read[n]) for n, t in TENSORS.items())


@pytest.mark.skipif(shard_file._START_WRITEBACK is None, reason="no sync_file_range in this C library")
def test_the_request_is_taken_by_this_machine(tmp_path) -> None:
    path = tmp_path / "data"
    with open(path, "wb") as file:
        file.write(b"\1" * 100_000)
        file.flush()
        assert shard_file._START_WRITEBACK(file.fileno(), 0, 100_000, 2) == 0
        os.fsync(file.fileno())
    assert path.read_bytes() == b"\1" * 100_000


def test_a_stage_still_held_by_a_write_is_left_to_the_collector() -> None:
    """Releasing the stage while a piece of it is still in use (a write interrupted by a second Ctrl-C) raises
    nothing, and the piece stays readable; an unused stage is closed at once."""
    held_stage, free_stage = shard_file.Stage(), shard_file.Stage()
    piece = held_stage.view[:10]
    held_stage.release()
    assert bytes(piece) == bytes(10)
    free_stage.release()
    assert free_stage._map.closed
