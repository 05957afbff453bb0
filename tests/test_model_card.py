"""The model card `shoal merge` writes follows the Hub's convention for merges: front matter naming the parents
(base_model), the tags and the library, then the method with its paper and the recipe inline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import offline_hub, write_recipe

from shoal.checkpoint.card import METHOD_PAPERS, write_model_card
from shoal.merge.engine import run_merge
from shoal.merge.registry import METHODS
from shoal.recipe import load_recipe, parse_recipe


def _card(folder: Path) -> tuple[dict, str]:
    """The card's front matter, parsed, and its body."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def _recipe_block(body: str) -> str:
    match = re.search(r"^(`{3,})yaml\n(.*?)\n\1$", body, re.S | re.M)
    assert match, body
    return match[2]


def _ties(parents: dict, base: str | Path) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(parents[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("a", "b")]}


def test_a_ties_card_has_the_hubs_merge_front_matter(run_cli, parents, tmp_path) -> None:
    path = write_recipe(tmp_path, _ties(parents, parents["base"]))
    code, _, err = run_cli("merge", path, tmp_path / "merged")
    assert code == 0, err
    meta, body = _card(tmp_path / "merged")
    assert meta == {"base_model": [], "library_name": "transformers", "tags": ["merge", "mergekit-compatible", "shoal"]}
    assert body.startswith("# merged\n")
    assert "the [TIES](https://arxiv.org/abs/2306.01708) merge method" in body
    assert f"`{parents['base']}` as the base" in body  # local folders: in the body, not base_model (the Hub refuses)
    assert f"- `{parents['a']}`" in body and f"- `{parents['b']}`" in body


def test_the_cards_recipe_block_round_trips_to_the_recipe_used(run_cli, parents, tmp_path) -> None:
    text = "# a recipe with a ``` in a comment\n" + yaml.safe_dump(_ties(parents, parents["base"]))
    path = write_recipe(tmp_path, text)
    assert run_cli("merge", path, tmp_path / "as-written")[0] == 0
    assert run_cli("merge", path, tmp_path / "seeded", "--random-seed", "7")[0] == 0
    block = _recipe_block(_card(tmp_path / "as-written")[1])
    assert block == path.read_text().rstrip("\n")
    assert parse_recipe(block) == load_recipe(path)
    seeded = parse_recipe(_recipe_block(_card(tmp_path / "seeded")[1]))
    assert seeded == load_recipe(path).model_copy(update={"seed": 7})


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, parents) -> None:
    """An offline HF cache holding `shoal-test/base` and `shoal-test/a` (copies of the tiny parents)."""
    offline_hub(monkeypatch, tmp_path / "hub", {f"shoal-test/{name}": {"main": parents[name]} for name in ("base", "a")})


def test_base_model_lists_the_parents_named_by_hub_id_with_the_base(hub_cache, parents, tmp_path) -> None:
    recipe = _ties(parents | {"a": "shoal-test/a"}, "shoal-test/base")
    run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "m")
    meta, body = _card(tmp_path / "m")
    assert meta["base_model"] == ["shoal-test/base", "shoal-test/a"]
    assert f"- `{parents['b']}`" in body


def test_every_merge_method_has_its_name_and_paper_on_the_card() -> None:
    assert set(METHOD_PAPERS) == set(METHODS)
    assert all(url is None or url.startswith("https://") for _, url in METHOD_PAPERS.values())


def test_a_card_that_is_not_of_a_merge_method_is_not_tagged_mergekit_compatible(tmp_path) -> None:
    write_model_card(tmp_path, name="path", method="data-flow path", parents=["org/a", "org/b"], base=None,
                     recipe_file="path.yaml", recipe_text="path: []\n")
    meta, body = _card(tmp_path)
    assert meta["tags"] == ["merge", "shoal"] and meta["base_model"] == ["org/a", "org/b"]
    assert _recipe_block(body) == "path: []"


def test_a_recipe_line_that_looks_like_a_fence_stays_inside_the_block(tmp_path) -> None:
    text = "merge_method: linear\nchat_template: |\n  ```\n  {{ messages }}\n  ```\n"
    write_model_card(tmp_path, name="m", method="linear", parents=["org/a"], base=None, recipe_file="recipe.yaml",
                     recipe_text=text)
    body = _card(tmp_path)[1]
    assert "\n````yaml\n" in body and _recipe_block(body) == text.rstrip("\n")
