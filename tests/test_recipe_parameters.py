"""A parameter the recipe's method does not use is ignored with a warning (as mergekit ignores it); a name that no
method takes is still an error."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import write_recipe
from safetensors.torch import load_file

from shoal.errors import ShoalError, ShoalWarning
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe


def _slerp(parents, weight: float | None) -> dict:
    extra = {} if weight is None else {"parameters": {"weight": weight}}
    return {"merge_method": "slerp", "base_model": str(parents["base"]),
            "models": [{"model": str(parents["a"]), **extra}], "parameters": {"t": 0.3}}


def test_weight_on_slerp_is_ignored_with_a_warning_naming_it_the_method_and_the_line(parents, tmp_path):
    text = yaml.safe_dump(_slerp(parents, 0.7), sort_keys=False)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "weight:" in row)
    with pytest.warns(ShoalWarning) as caught:
        recipe = parse_recipe(text, "r.yaml")
    assert len(caught) == 1
    assert str(caught[0].message).startswith(f"r.yaml:{line}: slerp does not use parameter 'weight' (it takes: t)")
    run_merge(recipe, tmp_path / "with")
    run_merge(parse_recipe(yaml.safe_dump(_slerp(parents, None))), tmp_path / "without")
    merged, plain = (load_file(next((tmp_path / name).glob("*.safetensors"))) for name in ("with", "without"))
    assert merged.keys() == plain.keys()
    assert all(torch.equal(merged[k], plain[k]) for k in merged)


def test_density_on_linear_is_ignored_with_a_warning(parents):
    recipe = {"merge_method": "linear", "parameters": {"density": 0.5},
              "models": [{"model": str(parents["a"]), "parameters": {"weight": 1.0}}]}
    with pytest.warns(ShoalWarning, match=r"^r.yaml:3: linear does not use parameter 'density' \(it takes: normalize, "
                                          r"weight\); ignored, as mergekit ignores it$"):
        parse_recipe(yaml.safe_dump(recipe, sort_keys=False), "r.yaml")


def test_a_name_no_method_takes_is_still_an_error(parents):
    recipe = {"merge_method": "linear", "models": [{"model": str(parents["a"]), "parameters": {"wieght": 1.0}}]}
    with pytest.raises(ShoalError, match=r"r.yaml:5: unknown parameter 'wieght' for linear \(known: normalize, "
                                         r"weight\); no merge method takes it"):
        parse_recipe(yaml.safe_dump(recipe, sort_keys=False), "r.yaml")


def test_the_cli_prints_the_warning_on_one_line_and_merges(run_cli, parents, tmp_path):
    path = write_recipe(tmp_path, _slerp(parents, 0.7))
    code, _, err = run_cli("merge", path, tmp_path / "out")
    assert code == 0, err
    warning = [row for row in err.splitlines() if row.startswith("warning:")]
    assert len(warning) == 1 and "recipe.yaml:" in warning[0] and "slerp does not use parameter 'weight'" in warning[0]
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
