"""A recipe file of several `---`-separated documents (mergekit-multi's format): merged in dependency order into the
output and its intermediate folders, equal to the same merges run one by one and to mergekit-multi's, bad files
refused in one line, and an intact intermediate reused on a rerun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error_line, read_tensors, write_recipe

from shoal.recipe import parse_recipe
from shoal.recipe_documents import with_folders


def slerp_ab(parents: dict[str, Path]) -> dict:
    return {"merge_method": "slerp", "base_model": str(parents["a"]), "dtype": "float32",
            "models": [{"model": str(parents["a"])}, {"model": str(parents["b"])}],
            "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}}


def ties_with_c(parents: dict[str, Path], ab: str) -> dict:
    return {"merge_method": "ties", "base_model": str(parents["base"]), "dtype": "float32",
            "models": [{"model": ab, "parameters": {"weight": 0.7, "density": [0.3, 0.8]}},
                       {"model": str(parents["c"]), "parameters": {"weight": 0.4, "density": 0.6}}]}


def documents(*recipes: dict) -> str:
    return yaml.safe_dump_all(recipes, sort_keys=False)


def two_stage(parents: dict[str, Path]) -> str:
    """The ties merge of `ab` (the slerp of a and b) and c; the output's document first, as mergekit-multi allows."""
    return documents(ties_with_c(parents, "ab"), {"name": "ab", **slerp_ab(parents)})


def assert_equal_tensors(ours: Path, theirs: Path) -> None:
    mine, other = read_tensors(ours), read_tensors(theirs)
    assert set(mine) == set(other)
    for name in mine:
        assert torch.equal(mine[name], other[name]), name


def test_two_stages_equal_the_two_recipes_merged_by_hand(run_cli, parents, tmp_path):
    code, _, err = run_cli("merge", write_recipe(tmp_path, two_stage(parents)), tmp_path / "out")
    assert code == 0, err
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    code, _, err = run_cli("merge", write_recipe(by_hand, slerp_ab(parents), "ab.yaml"), by_hand / "ab")
    assert code == 0, err
    code, _, err = run_cli("merge", write_recipe(by_hand, ties_with_c(parents, str(by_hand / "ab")), "abc.yaml"),
                           by_hand / "abc")
    assert code == 0, err
    assert_equal_tensors(tmp_path / "out.intermediate" / "ab", by_hand / "ab")
    assert_equal_tensors(tmp_path / "out", by_hand / "abc")
    assert (tmp_path / "out" / "recipe.yaml").read_text() == two_stage(parents)  # the whole file, to remake it


def test_a_multi_recipe_agrees_with_mergekit_multimerge(parents, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.graph import Executor
    from mergekit.merge import MergeOptions
    from mergekit.scripts.multimerge import load_config, make_tasks

    from shoal.merge.multi import merge_documents
    from shoal.recipe_documents import load_documents

    text = documents(
        {"name": "ab", **slerp_ab(parents)},
        {"name": "abc", **ties_with_c(parents, "ab")},
        {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": "abc", "parameters": {"weight": 0.6}}, {"model": "ab", "parameters": {"weight": [0.2, 0.9]}}]},
    )
    merge_documents(load_documents(write_recipe(tmp_path, text)), tmp_path / "shoal", tmp_path / "shoal-parts",
                    recipe_text=text, notice=print)
    configs, dependencies = load_config(text, str(tmp_path / "mergekit-parts"))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    tasks = make_tasks(configs, dependencies, options, str(tmp_path / "mergekit-parts"), str(tmp_path / "mergekit"),
                       lazy=False)
    Executor(tasks, math_device="cpu", storage_device="cpu").execute(desc="mergekit-multi")
    for ours, theirs in [("shoal-parts/ab", "mergekit-parts/ab"), ("shoal-parts/abc", "mergekit-parts/abc"),
                         ("shoal", "mergekit")]:
        mine, other = read_tensors(tmp_path / ours), read_tensors(tmp_path / theirs)
        assert set(mine) == set(other)
        worst = max((mine[k].float() - other[k].float()).abs().max().item() for k in mine)
        assert worst < 1e-5, f"{ours}: max |diff| {worst}"


def test_a_file_of_one_named_document_merges_it_into_out(run_cli, parents, tmp_path):
    code, _, err = run_cli("merge", write_recipe(tmp_path, {"name": "ab", **slerp_ab(parents)}), tmp_path / "out")
    assert code == 0, err
    by_hand = write_recipe(tmp_path, slerp_ab(parents), "ab.yaml")
    assert run_cli("merge", by_hand, tmp_path / "by_hand")[0] == 0
    assert_equal_tensors(tmp_path / "out", tmp_path / "by_hand")
    assert not (tmp_path / "out.intermediate").exists()


def refused(run_cli, tmp_path: Path, text: str, *needles: str) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, text), tmp_path / "out")
    one_error_line(code, err, str(tmp_path / "recipe.yaml"), *needles)
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.intermediate").exists()


def test_documents_that_read_each_other_in_a_cycle_are_refused(run_cli, parents, tmp_path):
    text = documents({"name": "x", **ties_with_c(parents, "y")}, {"name": "y", **ties_with_c(parents, "x")},
                     ties_with_c(parents, "y"))
    refused(run_cli, tmp_path, text, "in a cycle", "document 1 ('x') (line 1) reads document 2 ('y')",
            "reads document 1 ('x')")


def test_a_document_that_reads_itself_is_a_cycle(run_cli, parents, tmp_path):
    refused(run_cli, tmp_path, documents({"name": "x", **ties_with_c(parents, "x")}, ties_with_c(parents, "x")),
            "in a cycle", "document 1 ('x') (line 1) reads document 1 ('x')")


def test_two_documents_of_one_name_are_refused(run_cli, parents, tmp_path):
    text = documents({"name": "ab", **slerp_ab(parents)}, {"name": "ab", **slerp_ab(parents)},
                     ties_with_c(parents, "ab"))
    refused(run_cli, tmp_path, text, "document 2 is named 'ab', as document 1 (line 1) is")


def test_a_model_that_names_no_document_folder_or_hub_id_is_refused(run_cli, parents, tmp_path):
    text = documents({"name": "ab", **slerp_ab(parents)}, ties_with_c(parents, "abb"))
    line = text.splitlines().index("- model: abb") + 1
    refused(run_cli, tmp_path, text, f"recipe.yaml:{line}: document 2: model 'abb' names no document of this file "
                                     "(their names: ab)")


def test_a_second_document_without_a_name_is_refused(run_cli, parents, tmp_path):
    text = documents(slerp_ab(parents), ties_with_c(parents, str(parents["b"])))
    line = text.splitlines().index("---") + 2
    refused(run_cli, tmp_path, text, f"recipe.yaml:{line}: document 2 has no name, and neither has document 1 "
                                     "(line 1)", "`name:`")


def test_named_documents_that_no_other_reads_leave_the_output_unclear(run_cli, parents, tmp_path):
    text = documents({"name": "ab", **slerp_ab(parents)}, {"name": "bc", **ties_with_c(parents, str(parents["b"]))})
    refused(run_cli, tmp_path, text, "document 1 ('ab') (line 1), document 2 ('bc') (line", "read by no other")


def test_a_rerun_reuses_an_intact_intermediate_and_merges_a_damaged_one_again(run_cli, parents, tmp_path):
    recipe = write_recipe(tmp_path, two_stage(parents))
    out = tmp_path / "out"
    assert run_cli("merge", recipe, out)[0] == 0
    expected = read_tensors(out)
    (shard,) = (tmp_path / "out.intermediate" / "ab").glob("*.safetensors")
    before = os.stat(shard)

    code, _, err = run_cli("merge", recipe, out, "--overwrite")
    assert code == 0, err
    assert f"reused ab: {shard.parent} was merged from the same document and parents and is intact" in err
    after = os.stat(shard)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    with open(shard, "r+b") as handle:  # one byte of tensor data changed, the size kept
        handle.seek(-3, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    code, _, err = run_cli("merge", recipe, out, "--overwrite")
    assert code == 0, err
    assert f"merging ab again: {shard} has changed since it was merged" in err
    assert "reused" not in err
    assert_equal_tensors(shard.parent, tmp_path / "out.intermediate" / "ab")
    merged_again = read_tensors(out)
    assert all(torch.equal(merged_again[k], expected[k]) for k in expected)


def test_an_intermediate_of_a_changed_document_is_merged_again(run_cli, parents, tmp_path):
    out = tmp_path / "out"
    assert run_cli("merge", write_recipe(tmp_path, two_stage(parents)), out)[0] == 0
    changed = slerp_ab(parents) | {"parameters": {"t": 0.5}}
    code, _, err = run_cli("merge", write_recipe(tmp_path, documents({"name": "ab", **changed},
                                                                      ties_with_c(parents, "ab"))), out, "--overwrite")
    assert code == 0, err
    assert "merging ab again: " in err and "was merged from another version of its document" in err


def test_an_existing_output_is_refused_before_any_intermediate_is_merged(run_cli, parents, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("merge", write_recipe(tmp_path, two_stage(parents)), tmp_path / "out")
    one_error_line(code, err, "already exists", "--overwrite")
    assert not (tmp_path / "out.intermediate").exists()


def test_an_output_holding_a_parent_of_any_document_is_refused_before_any_merge(run_cli, parents, tmp_path):
    import shutil

    own = {name: tmp_path / "models" / name for name in ("base", "a", "b", "c")}
    for name, folder in own.items():
        shutil.copytree(parents[name], folder)
    recipe = write_recipe(tmp_path, two_stage(own))
    code, _, err = run_cli("merge", recipe, tmp_path / "models", "--overwrite")  # holds both documents' parents
    one_error_line(code, err, f"OUT_DIR {tmp_path / 'models'} is or holds", "write the merge elsewhere")
    assert not (tmp_path / "models.intermediate").exists() and sorted(os.listdir(tmp_path / "models")) == sorted(own)


def test_intermediates_inside_the_output_are_refused(run_cli, parents, tmp_path):
    recipe = write_recipe(tmp_path, two_stage(parents))
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-I", tmp_path / "out" / "parts")
    one_error_line(code, err, "is inside OUT_DIR", "give a folder outside it")
    assert not (tmp_path / "out").exists()


def test_an_intermediate_whose_parent_changed_is_merged_again(run_cli, parents, tmp_path):
    import shutil

    own = {name: tmp_path / name for name in ("base", "a", "b", "c")}
    for name, folder in own.items():
        shutil.copytree(parents[name], folder)
    recipe, out = write_recipe(tmp_path, two_stage(own)), tmp_path / "out"
    assert run_cli("merge", recipe, out)[0] == 0
    shutil.rmtree(own["b"])
    shutil.copytree(parents["c"], own["b"])  # the same path, other weights
    code, _, err = run_cli("merge", recipe, out, "--overwrite")
    assert code == 0, err
    assert "merging ab again: " in err and "reused" not in err
    by_hand = tmp_path / "by-hand"
    assert run_cli("merge", write_recipe(tmp_path, slerp_ab(own), "one.yaml"), by_hand)[0] == 0
    assert_equal_tensors(tmp_path / "out.intermediate" / "ab", by_hand)


def test_a_folder_shoal_did_not_merge_is_replaced_only_with_overwrite(run_cli, parents, tmp_path):
    import shutil

    recipe = write_recipe(tmp_path, two_stage(parents))
    theirs = tmp_path / "mine" / "ab"
    shutil.copytree(parents["c"], theirs)
    (theirs / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-I", tmp_path / "mine")
    one_error_line(code, err, "('ab'): ", "holds no record", "move it away, or pass --overwrite")
    assert (theirs / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-I", tmp_path / "mine", "--overwrite")
    assert code == 0, err
    assert not (theirs / "notes.txt").exists() and "merging ab again" in err


def test_an_intermediate_shoal_merged_that_lost_its_config_is_merged_again_without_overwrite(run_cli, parents,
                                                                                               tmp_path):
    recipe = write_recipe(tmp_path, two_stage(parents))
    out = tmp_path / "out"
    assert run_cli("merge", recipe, out)[0] == 0
    expected = read_tensors(out)
    ab = tmp_path / "out.intermediate" / "ab"
    (ab / "config.json").unlink()
    code, _, err = run_cli("merge", recipe, tmp_path / "again", "-I", tmp_path / "out.intermediate")
    assert code == 0, err
    assert f"merging ab again: {ab / 'config.json'} is missing" in err
    assert (ab / "config.json").is_file()
    again = read_tensors(tmp_path / "again")
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_a_damaged_intermediate_that_holds_the_current_folder_is_not_removed(run_cli, parents, tmp_path,
                                                                              monkeypatch):
    recipe = write_recipe(tmp_path, two_stage(parents))
    assert run_cli("merge", recipe, tmp_path / "out")[0] == 0
    ab = tmp_path / "out.intermediate" / "ab"
    (ab / "config.json").unlink()
    (ab / "mine").mkdir()
    monkeypatch.chdir(ab / "mine")
    code, _, err = run_cli("merge", recipe, tmp_path / "again", "-I", tmp_path / "out.intermediate")
    one_error_line(code, err, f"('ab'): its intermediate folder {ab} is the current folder or holds it",
                   "merging it again would remove it whole")
    assert (ab / "mine").is_dir() and not (tmp_path / "again").exists()


def test_an_intermediate_folder_of_other_files_is_named_as_such_not_as_out_dir(run_cli, parents, tmp_path):
    recipe = write_recipe(tmp_path, two_stage(parents))
    theirs = tmp_path / "mine" / "ab"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-I", tmp_path / "mine", "--overwrite")
    one_error_line(code, err, "('ab'): its intermediate folder", "is not a model folder (no config.json)",
                   "remove it yourself")
    assert "OUT_DIR" not in err
    assert (theirs / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_a_merge_of_a_merge_draws_other_random_drops_and_seed_reaches_every_document(run_cli, parents, tmp_path):
    dare = lambda model: {"merge_method": "dare_linear", "base_model": str(parents["base"]), "dtype": "float32",  # noqa: E731
                          "models": [{"model": model, "parameters": {"weight": 1.0, "density": 0.5}}]}
    recipe = write_recipe(tmp_path, documents({"name": "once", **dare(str(parents["a"]))}, dare("once")))
    base = read_tensors(parents["base"])
    name = "model.layers.1.mlp.up_proj.weight"
    for args, folder in [((), "out"), (("--seed", "7"), "seeded")]:
        code, _, err = run_cli("merge", recipe, tmp_path / folder, "-I", tmp_path / f"{folder}-parts", *args)
        assert code == 0, err
        once = read_tensors(tmp_path / f"{folder}-parts" / "once")[name] - base[name]
        twice = read_tensors(tmp_path / folder)[name] - base[name]
        kept_once, kept_twice = (once != 0).float().mean().item(), (twice != 0).float().mean().item()
        assert 0.4 < kept_once < 0.6 and 0.15 < kept_twice < 0.35  # independent drops: about a quarter survives
    written = list(yaml.safe_load_all((tmp_path / "seeded" / "recipe.yaml").read_text()))
    assert [d.get("name") for d in written] == ["once", None] and written[1]["seed"] == 7 and written[0]["seed"] != 7
    unseeded = read_tensors(tmp_path / "out")[name]
    assert not torch.equal(unseeded, read_tensors(tmp_path / "seeded")[name])


def test_an_output_inside_the_intermediate_folder_is_refused(run_cli, parents, tmp_path):
    recipe = write_recipe(tmp_path, two_stage(parents))
    code, _, err = run_cli("merge", recipe, tmp_path / "parts" / "ab", "-I", tmp_path / "parts")
    one_error_line(code, err, "is inside --intermediate-dir", "give a folder outside it")


def test_an_error_in_a_named_document_names_it(run_cli, parents, tmp_path):
    bad = slerp_ab(parents) | {"models": [{"model": str(parents["a"])}, {"model": str(parents["b"])},
                                          {"model": str(parents["c"])}]}
    recipe = write_recipe(tmp_path, documents({"name": "ab", **bad}, ties_with_c(parents, "ab")))
    code, _, err = run_cli("merge", recipe, tmp_path / "out")
    one_error_line(code, err, "document 1 ('ab'): ", "slerp takes")


def test_every_model_string_naming_a_document_names_its_folder(tmp_path):
    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "ab", "tokenizer_source": "ab",
        "models": [{"model": "ab+lora", "parameters": {"weight": 1.0}}, {"model": "org/other"}],
    }))
    moved = with_folders(recipe, {"ab": tmp_path / "ab"})
    assert moved.base_model == moved.tokenizer_source == str(tmp_path / "ab")
    assert [m.model for m in moved.models] == [f"{tmp_path / 'ab'}+lora", "org/other"]
    sections = parse_recipe(yaml.safe_dump({
        "merge_method": "linear", "models": [{"model": "ab"}, {"model": "org/x"}],
        "tokenizer": {"source": "ab", "tokens": {
            "<a>": {"source": "ab"}, "<b>": {"source": {"kind": "model_token", "model": "ab", "token": "x"}}}},
    }))
    tokens = with_folders(sections, {"ab": tmp_path / "ab"}).tokenizer
    assert tokens.source == tokens.tokens["<a>"].source == tokens.tokens["<b>"].source.model == str(tmp_path / "ab")
