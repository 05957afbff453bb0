"""`MODEL+ADAPTER` names MODEL with a PEFT LoRA adapter applied: equal to PEFT's merge_and_unload(), made once into
shoal's cache, and refused clearly where W + scale · B A is not what the adapter does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import offline_hub, write_recipe, read_tensors as tensors

from shoal.cache import Storage, stored_in
from shoal.checkpoint import lora
from shoal.checkpoint.reader import resolve_model
from shoal.errors import ShoalError
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def lora_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "shoal" / "lora"


def make_adapter(base: Path, folder: Path, seed: int = 0, **config) -> Path:
    """A LoRA adapter of base saved by PEFT, with the factor PEFT makes zero (B; A of an embedding) and the saved
    lm_head copy random, and the model PEFT's merge_and_unload() makes of it saved beside it as folder/unloaded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
                "modules_to_save": ["lm_head"], "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**{**settings, **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder / "adapter")
    model.merge_and_unload().save_pretrained(folder / "unloaded")
    return folder / "adapter"


@pytest.fixture
def adapter(parents, tmp_path) -> Path:
    return make_adapter(parents["base"], tmp_path)


def max_differences(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    assert mine.keys() == theirs.keys()
    return {name: (mine[name].double() - theirs[name].double()).abs().max().item() for name in mine}


@pytest.mark.parametrize("rslora", [False, True])
def test_the_applied_adapter_equals_peft_merge_and_unload(parents, tmp_path, rslora):
    adapter = make_adapter(parents["base"], tmp_path, use_rslora=rslora, rank_pattern={}, alpha_pattern={}) \
        if rslora else make_adapter(parents["base"], tmp_path)
    merged = tensors(resolve_model(f"{parents['base']}+{adapter}"))
    unloaded = tensors(tmp_path / "unloaded")
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert max(max_differences(merged, unloaded).values()) < 1e-6
    base = tensors(parents["base"])
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    # 4 layers x (q, v, down) + the embedding (LoRA) + lm_head (modules_to_save)
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(4)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")} | {
        "model.embed_tokens.weight", "lm_head.weight"}
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (merged[q] - base[q]).abs().max() > 1e-3  # B is not zero: the adapter does change the weights


def test_in_bfloat16_the_sum_is_rounded_once(bf16_parents, tmp_path):
    """PEFT rounds an embedding's B A to bfloat16 before adding it (two roundings); shoal rounds W + B A once. Its
    other layers add a float32 B A, rounded once, as shoal does: those tensors are equal bit for bit."""
    adapter = make_adapter(bf16_parents["base"], tmp_path)
    merged, unloaded = tensors(resolve_model(f"{bf16_parents['base']}+{adapter}")), tensors(tmp_path / "unloaded")
    name = "model.embed_tokens.weight"
    assert [k for k in merged if not torch.equal(merged[k], unloaded[k])] == [name]
    weight = tensors(bf16_parents["base"])[name].float()
    delta = lora.lora_delta(lora.read_adapter(adapter).low_rank[name])
    assert torch.equal(merged[name], (weight + delta).bfloat16())
    assert torch.equal(unloaded[name], (weight + delta.bfloat16().float()).bfloat16())
    exact = weight.double() + delta.double()
    assert (merged[name].double() - exact).abs().max() < (unloaded[name].double() - exact).abs().max()


@pytest.mark.parametrize(("stored", "dtype"), [
    ("float32", torch.bfloat16), ("float32", torch.float16), ("bfloat16", torch.float32)])
def test_a_lora_dtype_stores_w_plus_ba_rounded_once_to_it(parents, bf16_parents, tmp_path, stored, dtype):
    model = (parents if stored == "float32" else bf16_parents)["base"]
    adapter = make_adapter(model, tmp_path)
    with stored_in(Storage(lora_dtype=dtype)):
        folder = resolve_model(f"{model}+{adapter}")
    merged, weights, applied = tensors(folder), tensors(model), lora.read_adapter(adapter)
    assert merged.keys() == weights.keys() and {t.dtype for t in merged.values()} == {dtype}
    for name in ("model.layers.2.self_attn.v_proj.weight", "model.embed_tokens.weight"):  # linear, embedding
        assert torch.equal(merged[name], (weights[name].float() + lora.lora_delta(applied.low_rank[name])).to(dtype))
    assert torch.equal(merged["lm_head.weight"], applied.replaced["lm_head.weight"].to(dtype))  # modules_to_save
    norm = "model.layers.0.input_layernorm.weight"  # not adapted: the model's, in dtype
    assert torch.equal(merged[norm], weights[norm].to(dtype))
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert json.loads((model / "config.json").read_text())["dtype"] == stored


def test_a_fan_in_fan_out_adapter_of_gpt2_equals_peft_merge_and_unload(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    adapter = make_adapter(tmp_path / "gpt2", tmp_path, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                           modules_to_save=None, rank_pattern={}, alpha_pattern={})
    merged = tensors(resolve_model(f"{tmp_path / 'gpt2'}+{adapter}"))
    assert max(max_differences(merged, tensors(tmp_path / "unloaded")).values()) < 1e-6
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: (in, out), so B A is added transposed
    assert merged[name].shape == (32, 96) and not torch.equal(merged[name], tensors(tmp_path / "gpt2")[name])


def test_a_recipe_over_model_plus_adapter_merges_as_over_the_unloaded_folder(parents, adapter, tmp_path):
    def merge(base: str, out: str) -> dict[str, torch.Tensor]:
        recipe = {"merge_method": "ties", "base_model": str(parents["base"]), "models": [
            {"model": base, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(parents["a"]), "parameters": {"weight": 0.4, "density": 0.7}}]}
        run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / out)
        return tensors(tmp_path / out)

    via_adapter = merge(f"{parents['base']}+{adapter}", "via-adapter")
    via_folder = merge(str(tmp_path / "unloaded"), "via-folder")
    assert max(max_differences(via_adapter, via_folder).values()) < 1e-6
    card = (tmp_path / "via-adapter" / "README.md").read_text()
    assert f"{parents['base']}+{adapter}" in card


def test_the_adapter_is_applied_once_into_the_cache_keyed_by_content(parents, adapter, tmp_path, lora_cache,
                                                                     monkeypatch):
    writes = []
    real = lora._write
    monkeypatch.setattr(lora, "_write", lambda *args: writes.append(args[2]) or real(*args))
    ref = f"{parents['base']}+{adapter}"
    first = resolve_model(ref)
    assert first.parent == lora_cache and len(first.name) == 32
    assert resolve_model(ref) == first and len(writes) == 1  # read again: not applied again
    copy = tmp_path / "same-adapter-elsewhere"
    shutil.copytree(adapter, copy)
    assert resolve_model(f"{parents['base']}+{copy}") == first and len(writes) == 1  # same content, same entry
    other = make_adapter(parents["base"], tmp_path / "other", seed=1)
    assert resolve_model(f"{parents['base']}+{other}") != first and len(writes) == 2
    assert len(list(lora_cache.iterdir())) == 2
    assert {p.name for p in first.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                "tokenizer_config.json"}


def test_each_lora_dtype_is_its_own_cache_folder(parents, adapter, lora_cache):
    ref = f"{parents['base']}+{adapter}"
    folders = {}
    for dtype in (None, torch.float32, torch.bfloat16):
        with stored_in(Storage(lora_dtype=dtype)):
            folders[dtype] = resolve_model(ref)
    assert len(set(folders.values())) == 3 and {f.parent for f in folders.values()} == {lora_cache}
    with stored_in(Storage(lora_dtype=torch.bfloat16)):
        assert resolve_model(ref) == folders[torch.bfloat16]
    assert tensors(folders[torch.bfloat16])["lm_head.weight"].dtype == torch.bfloat16
    assert tensors(folders[None])["lm_head.weight"].dtype == torch.float32


def test_the_storages_lora_cache_is_where_adapters_are_applied(parents, adapter, lora_cache, tmp_path):
    with stored_in(Storage(lora_cache=tmp_path / "mine")):
        folder = resolve_model(f"{parents['base']}+{adapter}")
    assert folder.parent == tmp_path / "mine" and not lora_cache.exists()
    assert max(max_differences(tensors(folder), tensors(tmp_path / "unloaded")).values()) < 1e-6


def test_shoal_merge_takes_mergekits_lora_merge_cache_and_dtype(run_cli, parents, adapter, lora_cache, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": f"{parents['base']}+{adapter}", "parameters": {"weight": 1.0}}]})
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "--lora-merge-cache", tmp_path / "mine",
                           "--lora-merge-dtype", "bfloat16")
    assert code == 0, err
    [applied] = (tmp_path / "mine").iterdir()
    assert not lora_cache.exists()
    unloaded = tensors(tmp_path / "unloaded")
    assert tensors(applied).keys() == unloaded.keys()
    assert all(tensors(applied)[name].dtype == torch.bfloat16 for name in unloaded)
    out = tensors(tmp_path / "out")  # the linear merge of one model is that model, in its (bfloat16) dtype
    assert all(torch.equal(out[name], tensors(applied)[name]) for name in unloaded)
    code, _, err = run_cli("merge", recipe, tmp_path / "bad", "--lora-merge-dtype", "int8")
    assert code == 2 and err.strip() == ("error: unknown --lora-merge-dtype 'int8' (known: float32, fp32, float16, "
                                         "fp16, bfloat16, bf16, float64)")


def test_model_and_adapter_by_hub_id_and_revision(parents, tmp_path, monkeypatch):
    adapter = make_adapter(parents["base"], tmp_path)
    other = make_adapter(parents["base"], tmp_path / "other", seed=1)
    offline_hub(monkeypatch, tmp_path / "hub", {"shoal-test/base": {"main": parents["base"]},
                                                 "shoal-test/adapter": {"main": other, "v1": adapter}})
    recipe = {"merge_method": "linear", "models": [
        {"model": "shoal-test/base+shoal-test/adapter@v1", "parameters": {"weight": 1.0}}]}
    run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "m")
    assert max(max_differences(tensors(tmp_path / "m"), tensors(tmp_path / "unloaded")).values()) < 1e-6
    card = yaml.safe_load((tmp_path / "m" / "README.md").read_text().split("---")[1])
    assert card["base_model"] == ["shoal-test/base", "shoal-test/adapter"]


def _config_edit(adapter: Path, **changes) -> Path:
    config = json.loads((adapter / lora.ADAPTER_CONFIG).read_text())
    (adapter / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
    return adapter


def refused(ref: str, message: str, cache: Path) -> None:
    with pytest.raises(ShoalError, match=message):
        resolve_model(ref)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-made is left


def test_dora_is_refused(parents, tmp_path, lora_cache):
    dora = make_adapter(parents["base"], tmp_path, use_dora=True, target_modules=["q_proj"], modules_to_save=None)
    refused(f"{parents['base']}+{dora}", r"the adapter uses DoRA .* which shoal does not apply; merge it into its "
            r"model with PEFT's merge_and_unload\(\) and name the merged folder instead", lora_cache)


def test_an_adapter_of_another_model_is_refused(parents, tmp_path, lora_cache):
    from shoal.synthetic import make_parents, tiny_config

    wide = make_parents(tmp_path / "wide", ("x",), config=tiny_config(intermediate_size=96))["x"]
    adapter = make_adapter(parents["base"], tmp_path, target_modules=["down_proj"], modules_to_save=None)
    refused(f"{wide}+{adapter}", r"the adapter makes model.layers.0.mlp.down_proj.weight of shape \(64, 128\), but it "
                                 r"is \(64, 96\) in", lora_cache)


def test_adapters_of_other_kinds_or_formats_are_refused(parents, tmp_path, lora_cache):
    adapter = make_adapter(parents["base"], tmp_path)
    ia3 = shutil.copytree(adapter, tmp_path / "ia3")
    _config_edit(ia3, peft_type="IA3")
    refused(f"{parents['base']}+{ia3}", "is a PEFT adapter of type IA3; shoal applies LoRA adapters only", lora_cache)
    pickled = shutil.copytree(adapter, tmp_path / "pickled")
    (pickled / lora.ADAPTER_WEIGHTS).rename(pickled / "adapter_model.bin")
    refused(f"{parents['base']}+{pickled}", "no adapter_model.safetensors; it holds only PyTorch pickle weights",
            lora_cache)
    refused(f"{parents['base']}+{parents['a']}", "no adapter_config.json; is this a PEFT LoRA adapter folder",
            lora_cache)


def test_model_strings_are_checked_at_their_recipe_line(parents):
    recipe = {"merge_method": "linear", "models": [
        {"model": str(parents["a"]), "parameters": {"weight": 1.0}},
        {"model": f"{parents['b']}+x+y", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ShoalError, match=r"^r.yaml:6: model '.*\+x\+y': more than one '\+'"):
        parse_recipe(yaml.safe_dump(recipe, sort_keys=False), "r.yaml")
    with pytest.raises(ShoalError, match=r"is a local folder, and @v1 picks a revision of a Hub repository only"):
        resolve_model(f"{parents['a']}@v1")


def test_equal_to_mergekit_with_the_same_adapter(parents, adapter, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    recipe = {"merge_method": "task_arithmetic", "base_model": str(parents["base"]), "models": [
        {"model": f"{parents['a']}+{adapter}", "parameters": {"weight": 0.7}},
        {"model": str(parents["b"]), "parameters": {"weight": 0.5}}], "dtype": "float32"}
    text = yaml.safe_dump(recipe, sort_keys=False)
    run_merge(parse_recipe(text), tmp_path / "shoal")
    mergekit_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mergekit"),
                   MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                lora_merge_cache=str(tmp_path / "mergekit-lora")))
    assert len(list((tmp_path / "mergekit-lora").iterdir())) == 1  # mergekit applied the adapter (with PEFT)
    assert max(max_differences(tensors(tmp_path / "shoal"), tensors(tmp_path / "mergekit")).values()) < 1e-5


def test_lora_dtype_float32_equals_mergekits_applied_model(bf16_parents, tmp_path):
    """mergekit loads the model in --lora-merge-dtype and applies the adapter with PEFT: from a bfloat16 model in
    float32, both hold W + B A unrounded."""
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.common import ModelReference

    adapter = make_adapter(bf16_parents["base"], tmp_path)
    ref = f"{bf16_parents['base']}+{adapter}"
    theirs = ModelReference.model_validate(ref).merged(cache_dir=str(tmp_path / "mergekit-lora"),
                                                       lora_merge_dtype="float32")
    with stored_in(Storage(lora_dtype=torch.float32)):
        mine = tensors(resolve_model(ref))
    theirs = tensors(Path(theirs.model.path))
    assert {t.dtype for t in mine.values()} == {t.dtype for t in theirs.values()} == {torch.float32}
    assert max(max_differences(mine, theirs).values()) < 1e-5
    weights = tensors(bf16_parents["base"])
    assert max(max_differences(mine, {k: v.float() for k, v in weights.items()}).values()) > 1e-3  # applied


def test_a_search_over_a_model_plus_adapter_parent_merges_in_memory_as_shoal_merge_does(parents, adapter, tmp_path):
    from conftest import read_tensors, write_two_split_task
    from shoal.merge.resident import ResidentMerger
    from shoal.search.evolve import evolve
    from shoal.search.spec import load_search

    tuned = f"{parents['base']}+{adapter}"
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"base": str(parents["base"]), "parents": {"tuned": tuned, "a": str(parents["a"])},
                                      "method": "ties", "tasks": [{"path": str(write_two_split_task(tmp_path / "t"))}],
                                      "budget": 4, "population": 4, "seed": 3}))
    summary = evolve(load_search(search), tmp_path / "run")
    assert summary.trials == 4 and tuned in [m["model"] for m in summary.best.recipe["models"]]
    recipe = parse_recipe(yaml.safe_dump(summary.best.recipe))
    merger = ResidentMerger(recipe)
    merger.apply(recipe)
    live = dict(merger.model.named_parameters())
    on_disk = read_tensors(tmp_path / "run" / "best")
    for name, tensor in on_disk.items():
        assert torch.equal(live[name].detach(), tensor), name
    plain = summary.best.recipe | {"models": [m | {"model": str(tmp_path / "unloaded")} if m["model"] == tuned else m
                                              for m in summary.best.recipe["models"]]}
    run_merge(parse_recipe(yaml.safe_dump(plain)), tmp_path / "via-folder")
    assert max(max_differences(on_disk, tensors(tmp_path / "via-folder")).values()) < 1e-6  # the adapter was applied
