"""A filesystem that refuses (a full disk, a name too long, a file where a folder belongs) gives one line naming the
path (exit 2), and leaves nothing half-written."""

from __future__ import annotations

import errno

import yaml
from conftest import one_error_line, write_recipe, write_two_split_task


def _recipe(parents) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(parents[n]), "parameters": {"weight": 1.0}}
                                                 for n in ("a", "b")]}


def test_a_full_disk_during_merge(run_cli, parents, tmp_path, monkeypatch) -> None:
    from shoal.checkpoint.writer import ModelFolderWriter

    real, written = ModelFolderWriter.write, []

    def fill_up(self, name, tensor):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "model.safetensors"))
        written.append(name)
        return real(self, name, tensor)

    monkeypatch.setattr(ModelFolderWriter, "write", fill_up)
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out")
    one_error_line(code, err, "No space left on device", "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no OUT_DIR, no temporary folder


def test_an_output_name_too_long(run_cli, parents, tmp_path) -> None:
    out = tmp_path / ("x" * 300)
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), out)
    one_error_line(code, err, "File name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_run_folder_that_is_a_file(run_cli, parents, tmp_path) -> None:
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"base": str(parents["base"]), "parents": {"a": str(parents["a"])},
                                      "tasks": [{"path": str(write_two_split_task(tmp_path / "t"))}]}))
    (tmp_path / "run").write_text("a file")
    code, _, err = run_cli("evolve", search, tmp_path / "run")
    one_error_line(code, err, str(tmp_path / "run"))
    assert (tmp_path / "run").read_text() == "a file"


def test_the_writer_asks_the_disk_for_each_step_once_it_is_on_the_file(tmp_path, monkeypatch) -> None:
    """Each request names the bytes written since the one before, once a step's worth are in the file (flushed
    out of Python's buffer); the shard then reads back as written."""
    import os

    import torch
    from safetensors.torch import load_file

    from shoal.checkpoint import writer as writer_module
    from shoal.checkpoint.writer import ModelFolderWriter, TensorSpec

    asked: list[tuple[int, int, int]] = []

    def start(fd: int, offset: int, count: int, flags: int) -> int:
        asked.append((offset, count, os.fstat(fd).st_size))
        assert flags == 2  # start writing, do not wait
        return 0

    monkeypatch.setattr(writer_module, "_START_WRITEBACK", start)
    monkeypatch.setattr(writer_module, "WRITEBACK_STEP", 3000)
    tensors = {f"t{i}": torch.arange(100 * (i + 1), dtype=torch.float32) for i in range(8)}  # 400 ... 3200 bytes
    writer = ModelFolderWriter(tmp_path, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    shard = tmp_path / writer.shard_names[0]
    ends = [offset + count for offset, count, _ in asked]
    assert [offset for offset, _, _ in asked] == [0, *ends[:-1]]  # one range after the other, from the start
    assert all(count >= 3000 for _, count, _ in asked)
    assert all(size >= end for (_, _, size), end in zip(asked, ends))  # in the file when asked for
    assert shard.stat().st_size - ends[-1] < 3000 + 3200  # what is left for the fsync: under a step and a tensor
    assert len(asked) >= 3  # 14,400 bytes of data and the header
    assert all(torch.equal(t, load_file(shard)[n]) for n, t in tensors.items())
