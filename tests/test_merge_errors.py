"""Bad input to `shoal merge` gets one clear line on stderr and exit code 2, and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe
from safetensors.torch import load_file, save_file

from shoal.synthetic import make_parents, tiny_config


def linear(*models: Path, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **extra}


def expect_error(run_cli, tmp_path: Path, recipe: dict | str, *needles: str, mid_merge: bool = False) -> str:
    """Errors found while checking print exactly one line; one found mid-merge follows the progress bar."""
    path = write_recipe(tmp_path, recipe)
    code, _, err = run_cli("merge", path, tmp_path / "out")
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == (2 if mid_merge else 1), err
    assert lines[-1].startswith("error: ")
    for needle in needles:
        assert needle in lines[-1], err
    assert not (tmp_path / "out").exists()
    return err


def test_missing_parent(run_cli, parents, tmp_path, monkeypatch):
    expect_error(run_cli, tmp_path, linear(parents["a"], tmp_path / "nope"),
                 f"recipe.yaml:6: model '{tmp_path / 'nope'}' not found: no such folder, and not a Hub id")
    monkeypatch.chdir(tmp_path)  # a relative folder is looked for from here, and the message says so
    expect_error(run_cli, tmp_path, linear(parents["a"], Path("../nope")),
                 "recipe.yaml:6: model '../nope' not found", f"looked for from {tmp_path}")


def test_parents_with_different_architectures(run_cli, parents, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(parents["b"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    expect_error(run_cli, tmp_path, linear(parents["a"], other), "different architectures", "MistralForCausalLM")


def test_parents_with_different_shapes_name_the_tensor_and_both_shapes(run_cli, parents, tmp_path):
    wide = make_parents(tmp_path / "wide", ("x",), config=tiny_config(intermediate_size=96))["x"]
    expect_error(run_cli, tmp_path, linear(parents["a"], wide), "model.layers.0.mlp.down_proj.weight", "(64, 128)", "(64, 96)")


def test_a_tensor_missing_in_one_parent(run_cli, parents, tmp_path):
    holed = tmp_path / "holed"
    shutil.copytree(parents["b"], holed)
    state = load_file(holed / "model.safetensors")
    del state["model.layers.2.post_attention_layernorm.weight"]
    save_file(state, holed / "model.safetensors")
    expect_error(run_cli, tmp_path, linear(parents["a"], holed), "model.layers.2.post_attention_layernorm.weight", "missing")


def test_unknown_method(run_cli, parents, tmp_path):
    expect_error(run_cli, tmp_path, {**linear(parents["a"]), "merge_method": "frankenmerge"}, "frankenmerge", "known:", ":1:")


def test_unknown_parameter_names_method_and_line(run_cli, parents, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(parents["base"]),
              "models": [{"model": str(parents["a"]), "parameters": {"weight": 1.0, "densty": 0.5}}]}
    expect_error(run_cli, tmp_path, recipe, "'densty'", "ties", "recipe.yaml:7")


@pytest.mark.parametrize("density", [0.0, 1.5, [0.5, 1.2]])
def test_density_outside_zero_one(run_cli, parents, tmp_path, density):
    recipe = {"merge_method": "dare_ties", "base_model": str(parents["base"]),
              "models": [{"model": str(parents["a"]), "parameters": {"weight": 1.0, "density": density}}]}
    expect_error(run_cli, tmp_path, recipe, "density must be in (0, 1]")


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_epsilon_that_leaves_zero_one(run_cli, parents, tmp_path, density, epsilon):
    recipe = {"merge_method": "della", "base_model": str(parents["base"]), "models": [
        {"model": str(parents["a"]), "parameters": {"weight": 1.0, "density": density, "epsilon": epsilon}}]}
    expect_error(run_cli, tmp_path, recipe, f"epsilon for tensor model.embed_tokens.weight is {epsilon}", "(0, 1)")


def test_unknown_dtype_gives_the_line(run_cli, tmp_path):
    text = "merge_method: linear\nmodels:\n  - model: a\nout_dtype: float8\n"
    expect_error(run_cli, tmp_path, text, "recipe.yaml:4: out_dtype: unknown dtype 'float8' (known: float32, fp32")


def test_malformed_yaml_gives_the_line(run_cli, tmp_path):
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n"
    expect_error(run_cli, tmp_path, text, "malformed YAML", "recipe.yaml:4")


def test_wrong_type_gives_the_line(run_cli, tmp_path):
    text = "merge_method: linear\nmodels:\n  - model: a\n    layer_range: 3\n"
    expect_error(run_cli, tmp_path, text, "recipe.yaml:4", "layer_range")


def test_linear_weights_that_would_divide_by_zero(run_cli, parents, tmp_path):
    recipe = {"merge_method": "linear", "models": [
        {"model": str(parents["a"]), "parameters": {"weight": 1.0}},
        {"model": str(parents["b"]), "parameters": {"weight": -1.0}}]}
    expect_error(run_cli, tmp_path, recipe, "weights for tensor model.embed_tokens.weight sum to 0 with normalize")


def test_missing_base_for_a_method_that_needs_one(run_cli, parents, tmp_path):
    expect_error(run_cli, tmp_path, {**linear(parents["a"]), "merge_method": "ties"}, "needs base_model")


def test_the_installed_command_exits_2(parents, tmp_path):
    path = write_recipe(tmp_path, linear(parents["a"], tmp_path / "nope"))
    proc = subprocess.run([sys.executable, "-m", "shoal", "merge", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_the_command_starts_without_loading_torch_or_transformers():
    code = "import sys, shoal.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_a_merge_without_tokenizer_settings_never_loads_transformers_nor_the_compiler(parents, tmp_path):
    # transformers takes most of a second to import (BENCHMARKS.md: a linear merge of 0.55B parents, with and
    # without), torch's compiler more; a TIES merge too small to compile (merge.fused.FUSED_MIN) needs neither
    path = write_recipe(tmp_path, {"merge_method": "ties", "base_model": str(parents["base"]), "models": [
        {"model": str(parents[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in "ab"]})
    code = ("import sys; from shoal.cli import main; sys.argv = ['shoal', 'merge', sys.argv[1], sys.argv[2]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "print([m for m in ('transformers', 'torch._dynamo', 'torch._inductor') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")], capture_output=True,
                          text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "config.json").exists()


def test_a_corrupt_safetensors_file(run_cli, parents, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(parents["b"], broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    expect_error(run_cli, tmp_path, linear(parents["a"], broken), "model.safetensors", "not a readable safetensors file")


def test_a_folder_without_config(run_cli, parents, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(parents["b"], bare)
    (bare / "config.json").unlink()
    expect_error(run_cli, tmp_path, linear(parents["a"], bare), "no config.json")


def test_a_key_given_twice_is_refused_naming_both_lines(run_cli, parents, tmp_path):
    text = (f"merge_method: linear\nmodels:\n  - model: {parents['a']}\n    parameters:\n      weight: 0.3\n"
            f"      weight: 0.7\n  - model: {parents['b']}\n    parameters: {{weight: 1.0}}\n")
    expect_error(run_cli, tmp_path, text, "recipe.yaml:6: 'weight' is given twice in one mapping (first on line 5; "
                 "YAML would keep this one silently); keep one")
