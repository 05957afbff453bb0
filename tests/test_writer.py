"""The model writer hands what it has written to the disk as it goes (ModelFolderWriter._start_writeback)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from shoal.checkpoint import writer as writer_module
from shoal.checkpoint.writer import ModelFolderWriter, TensorSpec


def test_each_shard_is_handed_over_a_step_at_a_time_once_it_is_in_the_file(tmp_path, monkeypatch) -> None:
    """Each request names the bytes of its shard written since the one before (from the shard's start), once a
    step's worth are in the file (flushed out of Python's buffer); what is left for the fsync is under a step and a
    tensor, and the shards read back as written."""
    asked: list[tuple[str, int, int, int]] = []

    def start(fd: int, offset: int, count: int, flags: int) -> int:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        asked.append((name, offset, count, os.fstat(fd).st_size))
        assert flags == 2  # start writing, do not wait
        return 0

    monkeypatch.setattr(writer_module, "_START_WRITEBACK", start)
    monkeypatch.setattr(writer_module, "WRITEBACK_STEP", 3000)
    tensors = {f"t{i}": torch.arange(100 * (i + 1), dtype=torch.float32) for i in range(16)}  # 400 ... 6400 bytes
    writer = ModelFolderWriter(tmp_path, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                               max_shard_bytes=20_000)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    assert len(writer.shard_names) == 3  # 54,400 bytes of data
    read: dict[str, torch.Tensor] = {}
    for shard in writer.shard_names:
        ranges = [(offset, count, size) for name, offset, count, size in asked if name == shard]
        ends = [offset + count for offset, count, _ in ranges]
        assert [offset for offset, _, _ in ranges] == [0, *ends[:-1]]  # one after the other, from the shard's start
        assert all(count >= 3000 for _, count, _ in ranges)
        assert all(size >= end for (_, _, size), end in zip(ranges, ends))  # in the file when asked for
        assert (tmp_path / shard).stat().st_size - (ends[-1] if ends else 0) < 3000 + 6400
        read.update(load_file(tmp_path / shard))
    assert len(asked) >= 9
    assert read.keys() == tensors.keys() and all(torch.equal(t, read[n]) for n, t in tensors.items())


@pytest.mark.skipif(writer_module._START_WRITEBACK is None, reason="no sync_file_range in this C library")
def test_the_request_is_taken_by_this_machine(tmp_path) -> None:
    path = tmp_path / "data"
    with open(path, "wb") as file:
        file.write(b"\1" * 100_000)
        file.flush()
        assert writer_module._START_WRITEBACK(file.fileno(), 0, 100_000, 2) == 0
        os.fsync(file.fileno())
    assert path.read_bytes() == b"\1" * 100_000
