"""`shoal merge`'s options, mergekit-yaml's among them: each does what it says. An unknown option is a usage error
(exit 2); a mergekit option that shoal has in another form is answered with shoal's; one that would unpickle is
refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, write_recipe, read_tensors as _tensors

from shoal.checkpoint.files import TOKENIZER_FILES
from shoal.cli import MERGEKIT_OPTIONS


def _recipe(parents, method: str = "ties", **extra) -> dict:
    models = [{"model": str(parents[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("a", "b")]
    return {"merge_method": method, "base_model": str(parents["base"]), "models": models, **extra}


def _weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def merge_args(monkeypatch):
    """Run `shoal merge` up to the library call: return the keyword arguments run_merge would have been given."""
    import shoal.merge.engine

    seen: dict = {}
    monkeypatch.setattr(shoal.merge.engine, "run_merge", lambda *args, **kwargs: seen.update(kwargs))
    return seen


@pytest.mark.parametrize(("option", "text"), sorted(MERGEKIT_OPTIONS.items()))
def test_every_mergekit_option_shoal_does_not_take_says_what_shoal_does_instead(run_cli, tmp_path, option,
                                                                              text) -> None:
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", option)
    assert code == 2 and "Traceback" not in err
    assert f"No such option: {option} (a mergekit option: {text})" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "option"), [(["--write-threads", "4"], "--write-threads"),
                                              (["--write-threads=4"], "--write-threads"), (["-vv"], "-v"),
                                              (["-v", "-v"], "-v")])
def test_a_mergekit_option_given_a_value_or_repeated_gets_its_text_and_no_guess(run_cli, tmp_path, args,
                                                                                option) -> None:
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", *args)
    assert code == 2 and f"No such option: {option} (a mergekit option: {MERGEKIT_OPTIONS[option]})" in err
    assert "Possible options" not in err and "--num-threads" not in err  # no guess that --write-threads means -j


@pytest.mark.parametrize(("option", "reason"), [
    ("--lazy-unpickle", "shoal never unpickles PyTorch pickle weights (unpickling can run code)"),
    ("--no-safe-serialization", "shoal writes safetensors only, never PyTorch pickle"),
])
def test_a_mergekit_option_that_would_unpickle_is_refused_in_one_line(run_cli, parents, tmp_path, option,
                                                                      reason) -> None:
    path = write_recipe(tmp_path, _recipe(parents))
    code, _, err = run_cli("merge", path, tmp_path / "out", option)
    assert one_error_line(code, err, f"{option}: refused, ", reason) == err.strip()
    assert not (tmp_path / "out").exists()


def test_an_unknown_option_without_a_mergekit_meaning_has_no_hint(run_cli, tmp_path) -> None:
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", "--frobnicate")
    assert code == 2 and "No such option: --frobnicate" in err and "mergekit" not in err


@pytest.mark.parametrize("option", ["--cuda", "--lazy-unpickle"])
def test_mergekit_options_are_for_merge_only(run_cli, tmp_path, option) -> None:
    code, _, err = run_cli("eval", tmp_path, "--task", tmp_path, option)
    assert code == 2 and f"No such option: {option}" in err and "mergekit" not in err and "refused" not in err


@pytest.mark.parametrize(("args", "device"), [
    ([], "cpu"),
    (["--cuda"], "cuda"),
    (["--cuda", "--device", "cuda:1"], "cuda:1"),
    (["--device", "cuda:0"], "cuda:0"),
])
def test_cuda_is_mergekits_name_for_device_cuda(run_cli, merge_args, parents, tmp_path, args, device) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", *args)
    assert code == 0, err
    assert merge_args["device"] == device


@pytest.mark.parametrize(("args", "device"), [
    (["--device", "auto"], "cuda" if torch.cuda.is_available() else "cpu"),
    (["--cuda", "--device", "auto"], "cuda"),
])
def test_device_auto_is_cuda_where_a_gpu_is_available_else_cpu(run_cli, merge_args, parents, tmp_path, args,
                                                               device) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", *args)
    assert code == 0, err
    assert merge_args["device"] == device


def test_cuda_and_another_device_are_refused_together(run_cli, parents, tmp_path) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", "--cuda", "--device",
                           "cpu")
    one_error_line(code, err, "--cuda and --device cpu disagree")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_error_line(run_cli, parents, tmp_path) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", "--cuda")
    one_error_line(code, err, "--device cuda: no CUDA GPU is available here")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["5B", "500M", "100k", "2b", "1234"])
def test_out_shard_size_reads_sizes_as_mergekit_does(run_cli, merge_args, parents, tmp_path, size) -> None:
    from mergekit.common import parse_kmb

    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", "--out-shard-size",
                           size)
    assert code == 0, err
    assert merge_args["max_shard_bytes"] == parse_kmb(size)


def test_the_default_shard_size_is_2_gb(run_cli, merge_args, parents, tmp_path) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out")
    assert code == 0, err
    assert merge_args["max_shard_bytes"] == 2 * 1024**3


@pytest.mark.parametrize(("args", "needle"), [
    (["--out-shard-size", "5X"], "--out-shard-size 5X: give a whole number of bytes above 0"),
    (["--out-shard-size", "1.5B"], "--out-shard-size 1.5B"),
    (["--out-shard-size", "0"], "--out-shard-size 0"),
    (["--out-shard-size", "1M", "--shard-size", "1"], "--shard-size and --out-shard-size both set the shard size"),
])
def test_a_meaningless_out_shard_size_is_refused(run_cli, parents, tmp_path, args, needle) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", *args)
    one_error_line(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_out_shard_size_shards_a_model_that_transformers_loads_unchanged(run_cli, parents, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_recipe(tmp_path, _recipe(parents))
    assert run_cli("merge", path, tmp_path / "whole")[0] == 0
    code, _, err = run_cli("merge", path, tmp_path / "sharded", "--out-shard-size", "100K")
    assert code == 0, err
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(list((tmp_path / "whole").glob("*.safetensors"))) == 1 and len(shards) > 5
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    whole, sharded = _tensors(tmp_path / "whole"), _tensors(tmp_path / "sharded")
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)
    sizes: dict[str, list[int]] = {}
    for name, shard in index["weight_map"].items():
        sizes.setdefault(shard, []).append(whole[name].numel() * whole[name].element_size())
    assert all(sum(s) <= 100_000 or len(s) == 1 for s in sizes.values())  # within the size, or one tensor alone
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    assert all(torch.equal(loaded[k], sharded[k]) for k in sharded)


def test_random_seed_sets_dares_drops(run_cli, parents, tmp_path) -> None:
    path = write_recipe(tmp_path, _recipe(parents, "dare_ties"))
    for out, args in [("s1", ["--random-seed", "1"]), ("again", ["--random-seed", "1"]), ("seed", ["--seed", "1"]),
                      ("s2", ["--random-seed", "2"])]:
        code, _, err = run_cli("merge", path, tmp_path / out, *args)
        assert code == 0, err
    assert _weight_bytes(tmp_path / "s1") == _weight_bytes(tmp_path / "again") == _weight_bytes(tmp_path / "seed")
    s1, s2 = _tensors(tmp_path / "s1"), _tensors(tmp_path / "s2")
    assert not torch.equal(s1["model.layers.0.mlp.up_proj.weight"], s2["model.layers.0.mlp.up_proj.weight"])
    assert "seed: 1" in (tmp_path / "s1" / "recipe.yaml").read_text()


def test_no_copy_tokenizer_leaves_no_tokenizer_files(run_cli, parents, tmp_path) -> None:
    path = write_recipe(tmp_path, _recipe(parents))
    assert run_cli("merge", path, tmp_path / "copied")[0] == 0
    code, _, err = run_cli("merge", path, tmp_path / "bare", "--no-copy-tokenizer")
    assert code == 0, err
    assert (tmp_path / "copied" / "tokenizer.json").is_file()
    assert not {p.name for p in (tmp_path / "bare").iterdir()} & set(TOKENIZER_FILES)
    assert _weight_bytes(tmp_path / "copied") == _weight_bytes(tmp_path / "bare")


def test_a_recipes_tokenizer_source_is_written_even_without_copy_tokenizer(run_cli, parents, tmp_path) -> None:
    """mergekit's rule: --no-copy-tokenizer drops only the tokenizer that no recipe asked for."""
    path = write_recipe(tmp_path, _recipe(parents, tokenizer_source="base"))
    code, _, err = run_cli("merge", path, tmp_path / "out", "--no-copy-tokenizer")
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_allow_crimes_is_accepted_and_changes_nothing(run_cli, parents, tmp_path) -> None:
    path = write_recipe(tmp_path, _recipe(parents))
    assert run_cli("merge", path, tmp_path / "plain")[0] == 0
    code, _, err = run_cli("merge", path, tmp_path / "crimes", "--allow-crimes")
    assert code == 0, err
    assert _weight_bytes(tmp_path / "plain") == _weight_bytes(tmp_path / "crimes")
    mistral = tmp_path / "mistral"
    shutil.copytree(parents["b"], mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"]}))
    mixed = write_recipe(tmp_path, _recipe(parents | {"b": mistral}), "mixed.yaml")
    code, _, err = run_cli("merge", mixed, tmp_path / "mixed", "--allow-crimes")
    one_error_line(code, err, "parents have different architectures")


def test_merge_help_says_what_allow_crimes_does_in_shoal(run_cli) -> None:
    code, out, _ = run_cli("merge", "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert "--allow-crimes" in text and "changes nothing" in text


@pytest.mark.parametrize("option", ["-j", "--num-threads"])
def test_num_threads_sets_torchs_threads_while_merging_and_restores_them(run_cli, parents, tmp_path, monkeypatch,
                                                                         option) -> None:
    import shoal.merge.engine as engine

    seen: dict[str, set[int]] = {"merging": set(), "reading": set()}
    merge_tensor, load = engine.merge_tensor, engine._load
    monkeypatch.setattr(engine, "merge_tensor", lambda *a, **k: seen["merging"].add(torch.get_num_threads())
                        or merge_tensor(*a, **k))
    monkeypatch.setattr(engine, "_load", lambda *a, **k: seen["reading"].add(torch.get_num_threads()) or load(*a, **k))
    before = torch.get_num_threads()
    threads = before + 1
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", option, threads)
    assert code == 0, err
    assert seen == {"merging": {threads}, "reading": {threads}}
    assert torch.get_num_threads() == before


def test_quiet_prints_no_progress_bar_but_still_warnings(run_cli, parents, tmp_path) -> None:
    path = write_recipe(tmp_path, _recipe(parents))
    code, _, err = run_cli("merge", path, tmp_path / "loud")
    assert code == 0 and "merging tensors" in err and "wrote" in err
    code, _, err = run_cli("merge", path, tmp_path / "quiet", "--quiet")
    assert code == 0 and err == ""
    assert _weight_bytes(tmp_path / "loud") == _weight_bytes(tmp_path / "quiet")
    slerp = {"merge_method": "slerp", "base_model": str(parents["a"]), "parameters": {"t": 0.5},
             "models": [{"model": str(parents["a"])}, {"model": str(parents["b"]), "parameters": {"weight": 0.7}}]}
    code, _, err = run_cli("merge", write_recipe(tmp_path, slerp, "slerp.yaml"), tmp_path / "slerp", "--quiet")
    assert code == 0 and err.startswith("warning: ") and len(err.strip().splitlines()) == 1
    assert "slerp does not use parameter 'weight'" in err


def test_quiet_still_prints_errors(run_cli, parents, tmp_path) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, _recipe(parents)), tmp_path / "out", "--quiet",
                           "--shard-size", "0")
    assert one_error_line(code, err, "--shard-size 0") == err.strip()
