"""The search file and the genome it defines: validation with line numbers, genes, and the recipes genomes become."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from shoal.errors import ShoalError, ShoalWarning
from shoal.recipe import Recipe, resolve
from shoal.search.genome import Genome
from shoal.search.spec import SearchSpec, parse_search

OUTER = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
BASE = {"base": "b", "parents": {"math": "m", "lang": "l"}, "tasks": [{"path": "t"}]}


def _value(recipe: dict, parent: int, param: str, tensor: str, layer: int, layers: int) -> float:
    model = Recipe.model_validate(recipe).models[parent]
    return resolve(param, [model.parameters], tensor, layer / (layers - 1), None)


def test_per_layer_genes_become_a_gradient_that_hits_each_layer() -> None:
    genome = Genome(SearchSpec.model_validate(BASE), 4, OUTER)
    assert len(genome) == 2 * 2 * 5 and genome.names[0] == "math.weight.layer0"
    values = {name: i / 100 for i, name in enumerate(genome.names)}
    recipe = genome.recipe(values, seed=7)
    assert recipe["merge_method"] == "dare_ties" and recipe["base_model"] == "b" and recipe["seed"] == 7
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert _value(recipe, 1, "weight", name, layer, 4) == pytest.approx(values[f"lang.weight.layer{layer}"])
        # DARE's densities on the draws' grid: the nearest multiple of 2^-10
        density = values[f"lang.density.layer{layer}"]
        assert _value(recipe, 1, "density", name, layer, 4) == pytest.approx(round(density * 1024) / 1024, abs=1e-12)
    assert _value(recipe, 0, "weight", "lm_head.weight", 0, 4) == values["math.weight.embeddings"]


@pytest.mark.parametrize("method,drawn", [("dare_ties", True), ("della", True), ("ties", False),
                                          ("task_arithmetic", False)])
def test_how_trials_draw_is_part_of_a_random_method_s_fingerprint(monkeypatch, method, drawn) -> None:
    """A run made when each trial drew its DARE or DELLA drops under its own seed is another search than one now."""
    import shoal.search.spec as spec_module

    spec = SearchSpec.model_validate(BASE | {"method": method})
    before = spec.search_hash()
    monkeypatch.setattr(spec_module, "DRAWS", "a seed a trial")
    assert (spec.search_hash() != before) == drawn


@pytest.mark.parametrize("method,gridded", [("dare_ties", True), ("dare_linear", True), ("ties", False),
                                            ("della", False)])
def test_dare_densities_are_rounded_to_the_draws_grid_and_no_other_method_s(method, gridded) -> None:
    genome = Genome(SearchSpec.model_validate(BASE | {"method": method}), 2, OUTER)
    values = genome.values([0.5] * len(genome)) | {"math.density.layer0": 0.3, "math.density.layer1": 0.0001}
    recipe = Recipe.model_validate(genome.recipe(values, 0))
    name = lambda layer: f"model.layers.{layer}.mlp.up_proj.weight"
    densities = [resolve("density", [recipe.models[0].parameters], name(layer), layer, None) for layer in (0, 1)]
    # 0.3 is 307.2 steps of 2^-10; a density is never rounded to 0
    assert densities == ([307 / 1024, 1 / 1024] if gridded else [0.3, 0.0001])
    assert genome.table(values)["layers"]["density"]["math"] == densities


def test_groups_of_layers_split_attention_and_mlp_and_base_embeddings() -> None:
    spec = SearchSpec.model_validate(
        BASE | {"method": "ties", "genome": {"layers_per_group": 2, "split_attention_mlp": True, "embeddings": "base"}}
    )
    genome = Genome(spec, 4, OUTER)
    assert [g.group for g in genome.genes[:4]] == ["layers0-1.attn", "layers0-1.mlp", "layers2-3.attn", "layers2-3.mlp"]
    values = {name: 0.1 + i / 100 for i, name in enumerate(genome.names)}
    recipe = genome.recipe(values, 0)
    attn, mlp, norm = "self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"
    for layer, group in [(0, "layers0-1"), (1, "layers0-1"), (3, "layers2-3")]:
        get = lambda suffix: _value(recipe, 0, "weight", f"model.layers.{layer}.{suffix}", layer, 4)
        assert get(attn) == pytest.approx(values[f"math.weight.{group}.attn"])
        assert get(mlp) == pytest.approx(values[f"math.weight.{group}.mlp"])
        assert get(norm) == pytest.approx(values[f"math.weight.{group}.attn"])  # norms follow attention
    assert _value(recipe, 1, "weight", "model.embed_tokens.weight", 0, 4) == 0.0  # the base's own embeddings
    table = genome.table(values)
    assert table["embeddings"] is None
    assert table["layers"]["density (mlp)"]["lang"] == [values["lang.density.layers0-1.mlp"]] * 2 + [
        values["lang.density.layers2-3.mlp"]
    ] * 2


def test_unit_vector_maps_onto_bounds() -> None:
    spec = SearchSpec.model_validate(BASE | {"method": "task_arithmetic", "bounds": {"weight": [-1, 2]},
                                             "genome": {"layers_per_group": 0, "embeddings": "base"}})
    genome = Genome(spec, 3, OUTER)
    assert genome.names == ["math.weight.layers0-2", "lang.weight.layers0-2"]
    assert genome.values([0.0, 1.0]) == {"math.weight.layers0-2": -1.0, "lang.weight.layers0-2": 2.0}
    assert genome.recipe(genome.values([0.5, 0.5]), 0)["models"][0]["parameters"]["weight"][-1] == {"value": 0.5}


def test_della_epsilon_genes_are_fractions_of_the_room_the_density_leaves() -> None:
    genome = Genome(SearchSpec.model_validate(BASE | {"method": "della"}), 2, OUTER)
    assert len(genome) == 2 * 3 * 3 and genome.names[:3] == ["math.weight.layer0", "math.weight.layer1",
                                                            "math.weight.embeddings"]
    values = genome.values([0.5] * len(genome)) | {"math.density.layer0": 0.8, "math.epsilon.layer0": 0.5,
                                                    "math.density.layer1": 0.2, "math.epsilon.layer1": 0.9}
    recipe = genome.recipe(values, 0)
    name = lambda layer: f"model.layers.{layer}.mlp.up_proj.weight"
    assert _value(recipe, 0, "epsilon", name(0), 0, 2) == pytest.approx(0.5 * 0.2)  # min(0.8, 0.2) = 0.2
    assert _value(recipe, 0, "epsilon", name(1), 1, 2) == pytest.approx(0.9 * 0.2)
    assert genome.table(values)["layers"]["epsilon"]["math"] == pytest.approx([0.1, 0.18])


@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs_ties", "sce"])
@pytest.mark.parametrize("corner", [0.0, 1.0])
def test_every_corner_of_the_genome_is_a_recipe_shoal_merge_accepts(parents, method, corner) -> None:
    import yaml

    from shoal.merge.engine import open_parents
    from shoal.merge.plan import build_plan
    from shoal.recipe import parse_recipe

    spec = SearchSpec.model_validate({"base": str(parents["base"]), "parents": {"a": str(parents["a"])},
                                      "tasks": [{"path": "t"}], "method": method})
    genome = Genome(spec, 4, OUTER)
    recipe = parse_recipe(yaml.safe_dump(genome.recipe(genome.values([corner] * len(genome)), 0)))
    assert len(build_plan(recipe, open_parents(recipe)).jobs) > 0


def test_sce_has_one_selection_gene_per_group_for_all_parents() -> None:
    genome = Genome(SearchSpec.model_validate(BASE | {"method": "sce"}), 3, OUTER)
    assert genome.names == ["select_topk.layer0", "select_topk.layer1", "select_topk.layer2", "select_topk.embeddings"]
    values = dict(zip(genome.names, [0.2, 0.5, 0.9, 0.7]))
    recipe = genome.recipe(values, 0)
    assert recipe["models"] == [{"model": "m"}, {"model": "l"}]
    shared = Recipe.model_validate(recipe).parameters
    assert resolve("select_topk", [shared], "model.layers.1.self_attn.q_proj.weight", 0.5, None) == pytest.approx(0.5)
    assert resolve("select_topk", [shared], "lm_head.weight", 0.0, None) == 0.7
    assert genome.table(values)["layers"] == {"select_topk": {"all parents": [0.2, 0.5, 0.9]}}


def test_breadcrumbs_ties_searches_the_outlier_fraction_too() -> None:
    spec = SearchSpec.model_validate(BASE | {"method": "breadcrumbs_ties", "bounds": {"gamma": [0.0, 0.1]}})
    genome = Genome(spec, 1, OUTER)
    assert [g.param for g in genome.genes if g.parent == "lang"] == ["weight"] * 2 + ["density"] * 2 + ["gamma"] * 2
    assert genome.values([1.0] * len(genome))["lang.gamma.layer0"] == 0.1


def test_keep_genes_leave_a_parent_out_by_zeroing_its_weights() -> None:
    spec = SearchSpec.model_validate(BASE | {"parents": {"math": "m", "lang": "l", "prose": "p"},
                                             "genome": {"choose_parents": True}})
    genome = Genome(spec, 2, OUTER)
    assert genome.names[-3:] == ["math.keep", "lang.keep", "prose.keep"] and len(genome) == 3 * 2 * 3 + 3
    values = {name: 0.1 + i / 100 for i, name in enumerate(genome.names)} | {"math.keep": 0.5, "lang.keep": 0.9,
                                                                          "prose.keep": 0.49}
    assert genome.kept(values) == ["math", "lang"]
    recipe = genome.recipe(values, 0)
    name = "model.layers.1.mlp.up_proj.weight"
    assert _value(recipe, 2, "weight", name, 1, 2) == 0.0 and _value(recipe, 2, "weight", "lm_head.weight", 0, 2) == 0.0
    assert _value(recipe, 2, "density", name, 1, 2) == round(values["prose.density.layer1"] * 1024) / 1024
    assert _value(recipe, 0, "weight", name, 1, 2) == pytest.approx(values["math.weight.layer1"])
    table = genome.table(values)
    assert table["layers"]["weight"]["prose"] == [0.0, 0.0] and table["embeddings"]["weight"]["prose"] == 0.0
    assert table["layers"]["weight"]["lang"] == pytest.approx([values["lang.weight.layer0"], values["lang.weight.layer1"]])
    # no keep gene reaches 0.5: the parent with the highest one stays (the first of equals)
    assert genome.kept(values | {"math.keep": 0.2, "lang.keep": 0.4, "prose.keep": 0.4}) == ["lang"]


def test_a_parent_left_out_merges_as_if_it_were_not_there(parents, tmp_path) -> None:
    import yaml

    from conftest import read_tensors
    from shoal.merge.engine import run_merge
    from shoal.recipe import parse_recipe

    named = {name: str(parents[name]) for name in ("a", "b", "c")}
    spec = SearchSpec.model_validate({"base": str(parents["base"]), "parents": named, "tasks": [{"path": "t"}],
                                      "method": "ties", "genome": {"choose_parents": True}})
    genome = Genome(spec, 4, OUTER)
    values = genome.values([0.3 + 0.4 * (i % 3) / 2 for i in range(len(genome))]) | {"a.keep": 0.8, "b.keep": 0.1,
                                                                                   "c.keep": 0.6}
    both = genome.recipe(values, 0)
    without_b = both | {"models": [m for m in both["models"] if m["model"] != named["b"]]}
    for recipe, out in [(both, tmp_path / "kept"), (without_b, tmp_path / "two")]:
        run_merge(parse_recipe(yaml.safe_dump(recipe)), out)
    kept, two = read_tensors(tmp_path / "kept"), read_tensors(tmp_path / "two")
    base = read_tensors(parents["base"])
    assert kept.keys() == two.keys()
    for name in kept:
        assert torch.equal(kept[name], two[name]), name
    assert any(not torch.equal(kept[name], base[name]) for name in kept)


@pytest.mark.parametrize(
    "text,message",
    [
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nmethod: slerp\n", "search.yaml:4: method: method 'slerp' cannot"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nbounds:\n  density: [0, 1]\n", "density must lie in (0, 1]"),
        ("base: b\nparents: {m.x: x}\ntasks: [{path: t}]\n", "contain no '.'"),
        ("base: b\nparents: {m: x}\ntasks: []\n", "name at least one task"),
        ("base: b\nparents: {m: x}\ntasks:\n  - {path: t, weight: .nan}\n", "search.yaml:4: tasks.0.weight: Input "
         "should be a finite number"),
        ("base: b\nparents: {m: x}\ntasks:\n  - {path: t, weight: 0}\n  - {path: u, weight: -1}\n",
         "search.yaml:4: tasks: every task's weight is 0 or negative"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nbudgett: 3\n",
         "search.yaml:4: budgett: not a known key (known: base, parents, space, method, genome, dfs, bounds, tasks, "
         "budget, budget_items"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\ngenomes:\n  layers_per_group: 1\n",  # the key's line, not its value's
         "search.yaml:4: genomes: not a known key"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t, wieght: 2}]\n",
         "search.yaml:3: tasks.0.wieght: not a known key (known: path, lm_eval, weight)"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\ngenome:\n  layers_per_grup: 1\n",
         "search.yaml:5: genome.layers_per_grup: not a known key (known: layers_per_group, embeddings, "),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nmethod: linear\ngenome: {embeddings: base}\n", "linear has"),
        ("[1, 2]", "a search file is a YAML mapping"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nbounds: {epsilon: [0.1, 1.0]}\n", "epsilon must lie in [0, 1)"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nbounds: {lambda: [0, 2]}\n", "known: weight, density, gamma"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nmethod: sce\ngenome: {embeddings: base}\n", "sce has none"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nmethod: sce\ngenome: {choose_parents: true}\n", "(sce has no"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nengine: vllm\ntokenizer_source: union\n", "keeps its vocabulary"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nengine: vllm\ntokenizer_source: m\n", "use engine: hf"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nspace: dfs\ndfs: {parents: [q]}\n",
         "search.yaml:5: dfs.parents: 'q' is not one of the parents"),  # the line of the key a cross-key check names
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\n\npool: {subset: 2}\n", "search.yaml:5: pool: subset (2) must"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\ndfs:\n  scale_bounds: [0, 2]\n", "search.yaml:5: dfs: scale_bounds"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nspace: flow\n", "search.yaml:4: space: Input should be"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\ndtype: fp8\n", "search.yaml:4: dtype: unknown dtype 'fp8'"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nbudget: 12\nbudget: 13\n",
         "search.yaml:5: 'budget' is given twice in one mapping (first on line 4; YAML would keep this one "
         "silently); keep one"),
        ("base: b\nparents: {m: x}\ntasks: [{path: t}]\nmethod: linear\nbounds:\n  weight: [-1, 1]\n",
         "search.yaml:6: bounds: weight [-1, 1] starts a linear search with every weight at 0"),
    ],
)
def test_bad_search_files_are_refused_with_where_and_why(text: str, message: str) -> None:
    with pytest.raises(ShoalError) as err:
        parse_search(text, "search.yaml", Path("."))
    assert message in str(err.value)


def test_relative_paths_resolve_against_the_search_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "b").mkdir(parents=True)
    spec = parse_search("base: models/b\nparents: {m: org/hub-model}\ntasks: [{path: t}]\n", "s", tmp_path)
    assert spec.base == str(tmp_path / "models" / "b") and spec.parents["m"] == "org/hub-model"


def test_a_path_found_only_from_the_current_folder_is_taken_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    """A search should not depend on where it is started; one that does is said, and still resumes (its hash is the
    path as written, as before)."""
    (tmp_path / "models" / "b").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    text = "base: models/b\nparents: {m: org/hub-model}\ntasks: [{path: t}]\n"
    with pytest.warns(ShoalWarning) as caught:
        spec = parse_search(text, "sub/s.yaml", Path("sub"))
    assert [str(w.message) for w in caught] == [
        f"sub/s.yaml: base: models/b is not in {tmp_path / 'sub'}, the folder this file's paths are relative to, but "
        "in the current folder, and is taken from there; write it relative to the search file, or absolute"]
    assert spec.base == str(tmp_path / "models" / "b")
    assert spec.search_hash() == parse_search(text, "s.yaml", tmp_path).search_hash()


def test_both_sides_of_model_plus_adapter_resolve_against_the_search_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    spec = parse_search("base: org/base\nparents: {m: models/m+adapters/a, h: org/model+adapters/a}\n"
                        "tasks: [{path: t}]\n", "s", tmp_path)
    adapter = tmp_path / "adapters" / "a"
    assert spec.parents == {"m": f"{tmp_path / 'models' / 'm'}+{adapter}", "h": f"org/model+{adapter}"}
    (tmp_path / "moved" / "models" / "m").mkdir(parents=True)  # the same search in another folder: the same hash
    (tmp_path / "moved" / "adapters" / "a").mkdir(parents=True)
    moved = parse_search("base: org/base\nparents: {m: models/m+adapters/a, h: org/model+adapters/a}\n"
                         "tasks: [{path: t}]\n", "s", tmp_path / "moved")
    assert moved.search_hash() == spec.search_hash()


def test_a_journal_file_named_in_the_search_file_is_relative_to_it(tmp_path: Path) -> None:
    text = "base: org/b\nparents: {m: org/m}\ntasks: [{path: t}]\nstorage: runs/shared.log\n"
    assert parse_search(text, "s", tmp_path).storage == str(tmp_path / "runs" / "shared.log")
    url = "postgresql://u@host/db"
    assert parse_search(text.replace("runs/shared.log", url), "s", tmp_path).storage == url


def test_cli_reports_a_missing_search_file(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("evolve", tmp_path / "nope.yaml", tmp_path / "run")
    assert code == 2 and "search file" in err and "not found" in err


def test_cli_reports_a_missing_parent_with_its_line_before_loading(run_cli, parents, tmp_path: Path) -> None:
    """A parent found nowhere that cannot be a Hub id is named with its search file's line before any model loads;
    a MODEL+ADAPTER string's missing adapter too. (A Hub id is looked for when the parents load.)"""
    search = tmp_path / "search.yaml"
    for written, missing in (("../nope", "../nope"), (f"{parents['a']}+./no-adapter", "./no-adapter")):
        search.write_text(f"base: {parents['base']}\nparents:\n  a: {parents['a']}\n  b: {written}\n"
                          "tasks: [{path: t}]\n")
        code, out, err = run_cli("evolve", search, tmp_path / "run")
        assert code == 2
        assert (f"search.yaml:4: parents.b: model '{missing}' not found: no such folder (looked for from {tmp_path} "
                "and from the current folder)") in err
        assert "loading parents" not in out + err and not (tmp_path / "run").exists()
    search.write_text(f"base: {tmp_path / 'gone'}\nparents: {{a: {parents['a']}}}\ntasks: [{{path: t}}]\n")
    code, _, err = run_cli("evolve", search, tmp_path / "run")  # an absolute path was looked for nowhere else
    assert code == 2 and f"search.yaml:1: base: model '{tmp_path / 'gone'}' not found: no such folder, and it" in err


def test_the_data_flow_settings_do_not_change_a_parameter_space_search() -> None:
    """So the PS stage of a hybrid search is the same search (and run folder) as the PS search alone."""
    ps = SearchSpec.model_validate(BASE)
    hybrid = SearchSpec.model_validate(BASE | {"space": "hybrid", "dfs": {"parents": ["math"], "repeats": 2}})
    assert hybrid.model_copy(update={"space": "ps"}).search_hash() == ps.search_hash()
    assert SearchSpec.model_validate(BASE | {"space": "dfs"}).search_hash() != SearchSpec.model_validate(
        BASE | {"space": "dfs", "dfs": {"repeats": 2}}).search_hash()


def test_a_hybrid_search_refuses_a_parent_named_as_its_ps_result() -> None:
    with pytest.raises(ValidationError, match="'ps' names the PS stage's result"):
        SearchSpec.model_validate(BASE | {"parents": {"ps": "m", "lang": "l"}, "space": "hybrid"})
    assert SearchSpec.model_validate(BASE | {"parents": {"ps": "m", "lang": "l"}}).parents["ps"] == "m"


def test_a_pin_is_undone_in_the_hash_only_where_its_string_still_is() -> None:
    spec = SearchSpec.model_validate(BASE | {"parents": {"math": "org/m", "lang": "l"}})
    pinned = spec.pinned({"org/m": "0" * 40})
    assert pinned.search_hash() == spec.search_hash()
    other = {"parents": {"math": "/elsewhere/a-stage-result", "lang": "l"}}  # another model under the name
    assert pinned.model_copy(update=other).search_hash() == spec.model_copy(update=other).search_hash()
    assert pinned.model_copy(update=other).search_hash() != spec.search_hash()


def test_the_readmes_search_file_is_a_valid_search_with_the_defaults_it_says(tmp_path: Path) -> None:
    """The README writes every key of a search file with its default: it must parse, and say the defaults true."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## `shoal evolve`"):]
    block = section[section.index("```yaml\n") + len("```yaml\n"):]
    block = block[:block.index("```")]
    spec = parse_search(block, "README.md", tmp_path)
    default = SearchSpec.model_validate({"base": "b", "parents": {"m": "x"}, "tasks": [{"path": "t"}]})
    mine = {"base", "parents", "tasks", "space", "dfs", "sigma"}  # what the example sets, and 1/6 to 4 places
    assert spec.model_dump(exclude=mine) == default.model_dump(exclude=mine)
    assert spec.sigma == pytest.approx(default.sigma, abs=1e-4)
    assert spec.dfs.model_dump(exclude={"parents"}) == default.dfs.model_dump(exclude={"parents"})
