"""A wrong type, a non-finite number or a number outside its meaningful range, in a recipe, a search file or on the
command line, is refused in one line (exit 2) naming the value and the accepted range, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import one_error_line, write_recipe


def _recipe(parents: dict[str, Path], method: str = "ties", **params: object) -> dict:
    shared = {k: v for k, v in params.items() if k in ("t", "normalize", "lambda")}
    own = {k: v for k, v in params.items() if k not in shared}
    entry = {"model": str(parents["a"]), "parameters": {"weight": 1.0} | own} if method != "slerp" else {
        "model": str(parents["a"])}
    return {"merge_method": method, "base_model": str(parents["base"]), "models": [entry],
            **({"parameters": shared} if shared else {})}


@pytest.mark.parametrize(("method", "params", "needles"), [
    ("ties", {"weight": "abc"}, ["weight must be a number", "'abc'", "recipe.yaml:6"]),
    ("ties", {"density": "x"}, ["density must be a number", "'x'"]),
    ("ties", {"density": [0.5, "x"]}, ["density must be a number"]),
    ("slerp", {"t": "x"}, ["t must be a number"]),
    ("slerp", {"t": 5}, ["t must be in [0, 1]", "got 5"]),
    ("slerp", {"t": [0.0, 1.5]}, ["t must be in [0, 1]"]),
    ("ties", {"weight": float("nan")}, ["weight must be a finite number", "nan"]),
    ("ties", {"weight": float("inf")}, ["weight must be a finite number"]),
    ("ties", {"weight": 1e300}, ["weight must be a finite number (|x| <= 3.4e38), got 1e+300"]),
    ("ties", {"normalize": "yes"}, ["normalize must be true or false", "'yes'"]),
    ("ties", {"weight": True}, ["weight must be a number", "True"]),
    ("breadcrumbs", {"density": 0.5, "gamma": 1.0}, ["gamma must be in [0, 1)"]),
])
def test_a_parameter_of_the_wrong_type_or_range_is_refused_before_merging(
        run_cli, parents, tmp_path, method, params, needles) -> None:
    path = write_recipe(tmp_path, _recipe(parents, method, **params))
    code, _, err = run_cli("merge", path, tmp_path / "out")
    one_error_line(code, err, *needles)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_passthrough_scale_that_is_not_a_number_is_refused(run_cli, parents, tmp_path) -> None:
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(parents["a"]), "layer_range": [0, 2], "parameters": {"scale": "s"}}]}]}
    code, _, err = run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "out")
    one_error_line(code, err, "scale must be a number", "'s'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--shard-size", "-1"], "--shard-size -1: give"),  # echoed as typed, not as the float -1.0
    (["--shard-size", "0.5e-9"], "--shard-size 5e-10: give"),  # positive, but under one byte
    (["--shard-size", "0"], "above 0"),
    (["--shard-size", "nan"], "--shard-size nan"),
    (["--device", "gpu"], "unknown device (accepted: cpu, cuda, cuda:N, mps, auto)"),
    (["--device", "cuda:99"], "--device cuda:99"),
])
def test_meaningless_merge_options_are_refused(run_cli, parents, tmp_path, args, needle) -> None:
    path = write_recipe(tmp_path, _recipe(parents, "ties"))
    code, _, err = run_cli("merge", path, tmp_path / "out", *args)
    one_error_line(code, err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--budget", "0"], "--budget"),
    (["--workers", "0"], "--workers"),
    (["--threads", "0"], "--threads"),
])
def test_meaningless_evolve_counts_are_usage_errors(run_cli, tmp_path, args, needle) -> None:
    code, _, err = run_cli("evolve", tmp_path / "search.yaml", tmp_path / "run", *args)
    assert code == 2 and "Traceback" not in err
    assert needle in err and "greater than or equal to 1" in err
    assert not (tmp_path / "run").exists()


def _search(tmp_path: Path, parents: dict[str, Path], **extra: object) -> Path:
    spec = {"base": str(parents["base"]), "parents": {"a": str(parents["a"])}, "tasks": [{"path": "t"}]} | extra
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(("extra", "needles"), [
    ({"sigma": float("inf")}, ["sigma", "finite number"]),
    ({"sigma": "wide"}, ["sigma", "valid number"]),
    ({"budget": 0}, ["budget", "greater than or equal to 1"]),
    ({"bounds": {"weight": [0, "one"]}}, ["bounds.weight.1", "valid number"]),
    ({"bounds": {"density": [0.1, float("nan")]}}, ["bounds.density.1", "finite number"]),
    ({"tasks": [{"path": "t", "weight": "heavy"}]}, ["tasks.0.weight", "valid number"]),
    ({"device": "gpu"}, ["device", "unknown device 'gpu'"]),
    ({"dfs": {"scale_bounds": [0.5, float("inf")]}}, ["dfs.scale_bounds.1", "finite number"]),
])
def test_a_search_file_with_a_wrong_type_or_range_is_refused(run_cli, parents, tmp_path, extra, needles) -> None:
    code, _, err = run_cli("evolve", _search(tmp_path, parents, **extra), tmp_path / "run")
    one_error_line(code, err, "search.yaml:", *needles)
    assert not (tmp_path / "run").exists()
