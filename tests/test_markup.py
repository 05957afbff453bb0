"""User text (paths, values) is printed as written: square brackets are never read as rich markup, so nothing is
swallowed and the printer never crashes on them."""

from __future__ import annotations

import pytest
from conftest import one_error_line, write_recipe


def _linear(*models, weight: object = 1.0) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": weight}} for m in models]}


@pytest.mark.parametrize("name", ["x[/]y.yaml", "[red]nope.yaml", "[bold]a[/bold].yaml", "[/].yaml"])
def test_a_missing_recipe_with_brackets_in_its_name_is_named_literally(run_cli, tmp_path, name) -> None:
    code, _, err = run_cli("merge", tmp_path / name, tmp_path / "out")
    one_error_line(code, err, f"recipe {tmp_path / name} not found")


def test_an_error_in_a_recipe_with_brackets_in_its_name(run_cli, parents, tmp_path) -> None:
    (tmp_path / "x[").mkdir()
    path = write_recipe(tmp_path, _linear(parents["a"], weight=[float("nan"), 1]), name="x[/]y.yaml")
    code, _, err = run_cli("merge", path, tmp_path / "out")
    one_error_line(code, err, f"{path}:", "weight must be a finite number", "got [nan, 1]")


def test_a_parent_with_brackets_in_its_name(run_cli, parents, tmp_path) -> None:
    path = write_recipe(tmp_path, _linear(parents["a"], tmp_path / "[red]missing"))
    code, _, err = run_cli("merge", path, tmp_path / "out")
    one_error_line(code, err, "[red]missing")


def test_the_written_folder_is_named_literally(run_cli, parents, tmp_path) -> None:
    out = tmp_path / "[bold]o[/]ut"
    code, _, err = run_cli("merge", write_recipe(tmp_path, _linear(parents["a"], parents["b"])), out)
    assert code == 0, err
    assert f"wrote {out}" in err.replace("\n", "")
    assert (out / "config.json").is_file()
