"""JSON files of the wrong shape (a list where an object belongs), damaged or not UTF-8, and damaged safetensors
files are refused in one line naming the file (exit 2), for `shoal merge`, `shoal eval`, `shoal evolve` and
`shoal report`."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from conftest import one_error_line, write_recipe, write_two_split_task


def _linear(*models: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}


def _copy(parents: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(parents["b"], copy)
    return copy


@pytest.mark.parametrize(("content", "needle"), [
    ("[1, 2]", "config.json must be a JSON object ({...}), found a list"),
    ('"llama"', "found a str"),
    ("{", "invalid JSON at line 1"),
    (b"{\"a\": \"\xff\"}", "not UTF-8"),
    ("[" * 100000 + "]" * 100000, "config.json"),
])
def test_a_config_json_of_the_wrong_shape(run_cli, parents, tmp_path, content, needle) -> None:
    copy = _copy(parents, tmp_path)
    target = copy / "config.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli("merge", write_recipe(tmp_path, _linear(parents["a"], copy)), tmp_path / "out")
    one_error_line(code, err, needle, str(target))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("index", "needle"), [
    ([], "a safetensors index must be a JSON object"),
    ({"weight_map": ["model.safetensors"]}, "weight_map must map tensor names to file names"),
    ({"metadata": {}}, "weight_map must map tensor names to file names"),
    ({"weight_map": {"x": 3}}, "weight_map must map tensor names to file names"),
])
def test_an_index_json_of_the_wrong_shape(run_cli, parents, tmp_path, index, needle) -> None:
    copy = _copy(parents, tmp_path)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli("merge", write_recipe(tmp_path, _linear(parents["a"], copy)), tmp_path / "out")
    one_error_line(code, err, needle, "model.safetensors.index.json")
    assert not (tmp_path / "out").exists()


def _task(folder: Path) -> Path:
    folder.mkdir()
    (folder / "task.yaml").write_text(yaml.safe_dump({"name": "t", "metric": "exact_match",
                                                      "splits": {"dev": "dev.jsonl"}}))
    (folder / "dev.jsonl").write_text(json.dumps({"prompt": "a b", "answer": "c"}) + "\n")
    return folder


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")


@pytest.mark.parametrize("damage", [_truncated, _huge_header])
def test_eval_of_a_damaged_safetensors_file(run_cli, parents, tmp_path, damage) -> None:
    copy = _copy(parents, tmp_path)
    damage(copy / "model.safetensors")
    code, _, err = run_cli("eval", copy, "--task", _task(tmp_path / "task"))
    one_error_line(code, err, "model.safetensors", "not a readable safetensors file")


def test_eval_on_an_unknown_device(run_cli, parents, tmp_path) -> None:
    code, _, err = run_cli("eval", parents["a"], "--task", _task(tmp_path / "task"), "--device", "tpu")
    one_error_line(code, err, "--device tpu: unknown device")


def test_a_task_file_that_is_not_utf8(run_cli, parents, tmp_path) -> None:
    task = _task(tmp_path / "task")
    (task / "dev.jsonl").write_bytes(b'{"prompt": "\xff", "answer": "c"}\n')
    code, _, err = run_cli("eval", parents["a"], "--task", task)
    one_error_line(code, err, "dev.jsonl:1: not UTF-8")


@pytest.mark.parametrize(("content", "needle"), [
    (b"[]", "not a valid run record: top level"),
    (b'{"space": "ps"', "not valid JSON: line 1"),
    (b"\x00\xff\x17garbage", "run.json is not valid JSON"),
    (b"", "not valid JSON"),
])
def test_a_corrupt_run_json(run_cli, parents, tmp_path, content, needle) -> None:
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"base": str(parents["base"]), "parents": {"a": str(parents["a"])},
                                      "tasks": [{"path": str(write_two_split_task(tmp_path / "t"))}]}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_bytes(content)
    for args in (["evolve", search, run], ["report", run]):
        code, _, err = run_cli(*args)
        one_error_line(code, err, needle, "run.json")
    assert (run / "run.json").read_bytes() == content
