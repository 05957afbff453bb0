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
