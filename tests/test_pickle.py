"""No pickle is loaded unless the user opts in: a model folder holding only PyTorch pickle weights is refused in one
line (exit 2) saying how to convert it, by every command that reads model folders; `--allow-pickle` loads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error_line, write_recipe
from safetensors.torch import load_file


@pytest.fixture
def pickled(parents, tmp_path) -> Path:
    """Parent a with its weights as pytorch_model.bin instead of safetensors."""
    folder = tmp_path / "pickled"
    shutil.copytree(parents["a"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls torch.load."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def _task(folder: Path) -> Path:
    folder.mkdir()
    (folder / "task.yaml").write_text(yaml.safe_dump({"name": "t", "metric": "exact_match", "max_new_tokens": 2,
                                                      "splits": {"dev": "dev.jsonl"}}))
    (folder / "dev.jsonl").write_text(json.dumps({"prompt": "a b", "answer": "c"}) + "\n")
    return folder


def test_eval_refuses_a_pickle_only_folder_and_says_how_to_convert(run_cli, pickled, tmp_path, no_unpickling):
    code, _, err = run_cli("eval", pickled, "--task", _task(tmp_path / "task"))
    line = one_error_line(code, err, str(pickled), "no *.safetensors weights", "pickle", "save_pretrained",
                          "--allow-pickle")
    assert len(err.strip().splitlines()) == 1, line


def test_eval_loads_pickle_when_the_user_opts_in(run_cli, pickled, tmp_path):
    code, out, err = run_cli("eval", pickled, "--task", _task(tmp_path / "task"), "--json", "--allow-pickle")
    assert code == 0, err
    assert json.loads(out)[0]["n"] == 1


def test_merge_refuses_a_pickle_only_parent(run_cli, parents, pickled, tmp_path, no_unpickling):
    recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                   for m in (parents["b"], pickled)]}
    code, _, err = run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "out")
    one_error_line(code, err, str(pickled), "pickle")
    assert not (tmp_path / "out").exists()


def test_library_loading_refuses_pickle_for_evolve_and_the_report(pickled, no_unpickling):
    """The search's resident model, its data-flow models and its final scores all load through load_model."""
    from shoal.errors import ShoalError
    from shoal.evaluate.runner import load_model

    with pytest.raises(ShoalError, match="pickle"):
        load_model(pickled, "cpu")


def test_a_folder_with_both_reads_only_the_safetensors(parents, tmp_path, no_unpickling):
    from shoal.evaluate.runner import load_model

    both = tmp_path / "both"
    shutil.copytree(parents["a"], both)
    (both / "pytorch_model.bin").write_bytes(b"not even a pickle")
    model, _ = load_model(both, "cpu")
    assert model.config.num_hidden_layers > 0
