"""`shoal merge` end to end on tiny random parents: formulas per tensor, layer slices, folder contents, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error_line, write_recipe, read_tensors as tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from shoal.checkpoint.reader import open_checkpoint
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe


def merge(recipe: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(yaml.safe_dump(recipe)), out, **kw)
    return tensors(out)


def test_linear_with_a_layer_gradient_matches_the_formula_per_layer(parents, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(parents["a"]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(parents["b"]), "parameters": {"weight": 1.0}},
        ],
    }
    out = merge(recipe, tmp_path / "m")
    a, b = tensors(parents["a"]), tensors(parents["b"])
    for layer in range(4):
        wa = layer / 3  # gradient [0, 1] interpolated over 4 layers
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        expected = (wa * a[name] + 1.0 * b[name]) / (wa + 1.0)
        assert torch.allclose(out[name], expected, atol=1e-6)
    # embeddings and head take the gradient's first value (t = 0), as mergekit does
    assert torch.allclose(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.allclose(out["lm_head.weight"], b["lm_head.weight"])


def test_a_merge_in_bfloat16_written_as_float32_holds_the_bfloat16_result(parents, tmp_path):
    """dtype is the merge's precision, out_dtype the file's: mergekit rounds to the first, then casts (0.1.5)."""
    recipe = {
        "merge_method": "linear", "dtype": "bfloat16", "out_dtype": "float32",
        "models": [{"model": str(parents[n]), "parameters": {"weight": w}} for n, w in (("a", 0.3), ("b", 0.7))],
    }
    out = merge(recipe, tmp_path / "m")
    a, b = tensors(parents["a"]), tensors(parents["b"])
    name = "model.layers.1.mlp.down_proj.weight"
    bf = lambda x: x.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    exact = 0.3 * bf(a[name]) + 0.7 * bf(b[name])  # the formula on the bf16-rounded inputs, in float32
    assert out[name].dtype == torch.float32
    assert torch.equal(out[name], bf(out[name]))  # every value is a bfloat16 value...
    assert torch.allclose(out[name], exact, rtol=2**-8, atol=1e-6) and not torch.equal(out[name], exact)  # ...the nearest


def test_ties_with_filtered_parameters_matches_the_formula(parents, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(parents["base"]),
        "models": [
            {"model": str(parents["a"]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(parents["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.9}], "density": 0.3}},
        ],
    }
    out = merge(recipe, tmp_path / "m")
    base, a, b = (tensors(parents[n]) for n in ("base", "a", "b"))
    for name, wb in [("model.layers.1.mlp.up_proj.weight", 0.2), ("model.layers.2.self_attn.q_proj.weight", 0.9)]:
        da, db = a[name] - base[name], b[name] - base[name]
        ta = da * (da.abs() >= da.abs().flatten().kthvalue(da.numel() - int(0.5 * da.numel()) + 1).values)
        tb = db * (db.abs() >= db.abs().flatten().kthvalue(db.numel() - int(0.3 * db.numel()) + 1).values)
        wa_t, wb_t = 0.7 * ta, wb * tb
        sign = torch.where(wa_t + wb_t >= 0, 1.0, -1.0)
        keep_a, keep_b = wa_t.sign() == sign, wb_t.sign() == sign
        num = wa_t * keep_a + wb_t * keep_b
        den = 0.7 * keep_a + wb * keep_b
        expected = base[name] + num / torch.where(den == 0, 1.0, den)
        assert torch.allclose(out[name], expected, atol=1e-6), name


def test_dare_is_reproducible_from_the_seed(parents, tmp_path):
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(parents["base"]),
        "models": [{"model": str(parents[n]), "parameters": {"weight": 0.5, "density": 0.4}} for n in ("a", "b")],
        "seed": 3,
    }
    first = merge(recipe, tmp_path / "one")
    again = merge(recipe, tmp_path / "two")
    other = merge({**recipe, "seed": 4}, tmp_path / "three")
    name = "model.layers.0.self_attn.v_proj.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[name], other[name])
    # about 40 % of each task vector survives: the merged delta is nonzero on ~1 - 0.6^2 of entries
    base = tensors(parents["base"])
    changed = (first[name] != base[name]).float().mean().item()
    assert abs(changed - (1 - 0.6**2)) < 0.03


def test_passthrough_slices_stack_layers_and_fix_the_config(parents, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(parents["a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(parents["b"]), "layer_range": [1, 4]}]},
        ],
    }
    out = merge(recipe, tmp_path / "m")
    a, b = tensors(parents["a"]), tensors(parents["b"])
    name = "model.layers.{}.self_attn.o_proj.weight"
    for out_layer, (src, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(out[name.format(out_layer)], src[name.format(layer)])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert len(model.model.layers) == 6


def test_output_is_a_complete_loadable_model_folder(bf16_parents, tmp_path):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(bf16_parents["base"]),
        "models": [{"model": str(bf16_parents[n]), "parameters": {"weight": 0.5}} for n in ("a", "b", "c")],
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    out = tmp_path / "m"
    run_merge(parse_recipe(yaml.safe_dump(recipe)), out, max_shard_bytes=100_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "recipe.yaml", "README.md"} <= names
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors(out).values())
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and str(bf16_parents["c"]) in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    AutoTokenizer.from_pretrained(out)
    merged = tensors(out)
    base, a, b, c = (tensors(bf16_parents[n]) for n in ("base", "a", "b", "c"))
    name = "model.layers.3.mlp.gate_proj.weight"
    expected = base[name].float() + 0.5 * sum(p[name].float() - base[name].float() for p in (a, b, c))
    assert torch.allclose(merged[name].float(), expected, atol=1e-2)


def test_a_crash_mid_merge_leaves_no_output_folder(parents, tmp_path):
    recipe = parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(parents["a"]), "parameters": {"weight": 1.0}},
        {"model": str(parents["b"]), "parameters": {"weight": 1.0}}]}))

    def interrupt(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_merge(recipe, tmp_path / "m", on_tensor=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite_and_only_a_model_folder_is_replaced(parents, tmp_path, run_cli,
                                                                                          monkeypatch):
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(parents["a"]), "parameters": {"weight": 1.0}}]})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    code, _, err = run_cli("merge", recipe, tmp_path / "out")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (tmp_path / "out" / "keep.txt").exists()
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "--overwrite")  # replacing would remove all of it
    one_error_line(code, err, f"OUT_DIR {tmp_path / 'out'} is not a model folder (no config.json)", "another folder")
    assert (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "out" / "config.json").write_text("{}")  # a model folder: replaced whole
    code, _, _ = run_cli("merge", recipe, tmp_path / "out", "--overwrite")
    assert code == 0 and not (tmp_path / "out" / "keep.txt").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]
    code, _, err = run_cli("merge", recipe, tmp_path, "--overwrite")  # the folder that holds the recipe
    one_error_line(code, err, f"OUT_DIR {tmp_path} is not a model folder")
    monkeypatch.chdir(tmp_path / "out")
    code, _, err = run_cli("merge", recipe, ".", "--overwrite")
    one_error_line(code, err, f"OUT_DIR {tmp_path / 'out'} is the current folder or holds it")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("merge", recipe, tmp_path / "file", "--overwrite")
    one_error_line(code, err, f"OUT_DIR {tmp_path / 'file'} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "recipe.yaml"]


def test_an_output_folder_that_is_or_holds_a_parent_is_refused_even_with_overwrite(parents, tmp_path, run_cli):
    import shutil

    for name in "ab":
        shutil.copytree(parents[name], tmp_path / "models" / name)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "models" / n), "parameters": {"weight": 1.0}} for n in "ab"]})
    shutil.copytree(parents["b"], tmp_path / "models" / "c")
    tokens_from_c = write_recipe(tmp_path, {
        "merge_method": "linear", "tokenizer_source": str(tmp_path / "models" / "c"),
        "models": [{"model": str(tmp_path / "models" / n), "parameters": {"weight": 1.0}} for n in "ab"]}, "tokens.yaml")
    before = {p: p.read_bytes() for p in (tmp_path / "models").rglob("*") if p.is_file()}
    for path, out in ((recipe, tmp_path / "models" / "a"), (recipe, tmp_path / "models"),
                      (tokens_from_c, tmp_path / "models" / "c")):  # not a parent: the tokenizer's source
        code, _, err = run_cli("merge", path, out, "--overwrite")
        assert code == 2 and f"OUT_DIR {out} is or holds" in err and "write the merge elsewhere" in err, err
    assert {p: p.read_bytes() for p in (tmp_path / "models").rglob("*") if p.is_file()} == before
    code, _, _ = run_cli("merge", recipe, tmp_path / "models" / "d", "--overwrite")  # beside them: merged
    assert code == 0 and (tmp_path / "models" / "d" / "config.json").exists()


def test_reader_lists_shapes_without_loading(parents):
    ck = open_checkpoint(parents["a"])
    assert ck.shape("model.embed_tokens.weight") == (256, 64)
    assert ck.dtype("model.embed_tokens.weight") == "F32"
    assert ck.num_layers == 4


def assert_chunks_equal_one_pass(recipe, tmp_path, monkeypatch, module, counted: str) -> None:
    """recipe merged with chunks of 1,000 entries (the 64 x 128 MLP matrices: 9 chunks, the last of 192) is bit-equal
    to the one-pass merge (the L1 rescale's norms too: exact sums, merge.norms), and the resident merger to it;
    module.counted must run once per chunk."""
    from shoal.merge import methods
    from shoal.merge.resident import ResidentMerger

    run_merge(recipe, tmp_path / "whole")
    calls = []
    original = getattr(module, counted)
    monkeypatch.setattr(module, counted, lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(methods, "CHUNK", 1000)
    run_merge(recipe, tmp_path / "chunked")
    whole, chunked = tensors(tmp_path / "whole"), tensors(tmp_path / "chunked")
    assert len(calls) > 2 * len(whole)  # most tensors went in several chunks
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
    merger = ResidentMerger(recipe)
    merger.apply(recipe)
    live = dict(merger.model.named_parameters())
    for name in whole:
        assert torch.equal(live[name].detach(), chunked[name]), name


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_an_elementwise_merge_in_chunks_is_bit_equal_to_one_pass(parents, tmp_path, monkeypatch, method, dtype):
    from shoal.merge import engine, methods

    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": method, "dtype": dtype, "base_model": str(parents["base"]),
        "models": [{"model": str(parents[n]), "parameters": {"weight": w}} for n, w in (("a", 0.3), ("b", 0.9), ("c", -0.4))],
    }))
    # linear goes through merged_values chunk by chunk; task arithmetic is combined a piece at a time
    module, counted = (engine, "merged_values") if method == "linear" else (methods, "_combine")
    assert_chunks_equal_one_pass(recipe, tmp_path, monkeypatch, module, counted)


def test_a_chunk_with_nan_is_refused_with_the_tensor_named(parents, tmp_path, monkeypatch):
    from shoal.errors import ShoalError
    from shoal.merge import methods

    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(methods, "CHUNK", 1000)
    shutil.copytree(parents["b"], tmp_path / "b")
    weights = load_file(tmp_path / "b" / "model.safetensors")
    weights["model.embed_tokens.weight"].view(-1)[5000] = float("nan")  # in the embeddings' sixth chunk
    save_file(weights, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    recipe = parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(parents["a"]), "parameters": {"weight": 1.0}},
        {"model": str(tmp_path / "b"), "parameters": {"weight": 1.0}}]}))
    with pytest.raises(ShoalError, match="NaN or inf in tensor model.embed_tokens.weight .* check the weights"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_linear_weights_summing_to_zero_are_refused_before_any_tensor_is_read(parents, tmp_path, monkeypatch):
    from shoal.errors import ShoalError
    from shoal.merge import engine

    monkeypatch.setattr(engine, "_load", lambda *args: pytest.fail("a tensor was read"))
    weights = {"a": 1.0, "b": {"filter": "mlp", "value": -1.0}}  # cancels only in the MLP's tensors
    recipe = parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(parents[n]), "parameters": {"weight": weights[n] if n == "a" else [weights[n], {"value": 0.5}]}}
        for n in "ab"]}))
    with pytest.raises(ShoalError, match=r"weights for tensor model\.layers\.0\.mlp\.\w+\.weight sum to 0 with "
                                         r"normalize: true"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_finiteness_check_refuses_only_nan_and_inf(dtype):
    """A sum settles the check when finite; one that overflows (every entry finite) is checked entry by entry."""
    from shoal.merge.engine import _finite

    big = torch.full((4096,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum()) and _finite(big)  # the overflowing sum is no reason to refuse
    assert _finite(torch.linspace(-3, 3, 1001, dtype=dtype)) and _finite(torch.empty(0, dtype=dtype))
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        values = torch.ones(3000, dtype=dtype)
        values[1000:1000 + len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not _finite(values), bad
        big[7:7 + len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not _finite(big), bad
        big[7:7 + len(bad)] = torch.finfo(dtype).max / 2


@pytest.mark.parametrize("work", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("computed", [torch.float32, torch.float64])
def test_a_chunk_rounded_straight_into_the_output_holds_what_the_rounded_copy_held(work, computed):
    """engine._write's one conversion, where the work dtype is the output's, against rounding to the work dtype and
    then to the output's: the same bits; and a wider output still gets the work dtype's values."""
    from shoal.checkpoint.writer import TensorSpec
    from shoal.merge.engine import _rounded, _write
    from shoal.merge.plan import TensorJob

    generator = torch.Generator().manual_seed(3)
    values = (torch.randn(5000, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(
        -6, 6, (5000,), generator=generator)).to(computed)
    for spec_dtype, out_dtype in ((work, work), (work, torch.float32), (torch.float32, torch.float32)):
        job = TensorJob(spec=TensorSpec("w", (5000,), spec_dtype), work_dtype=work, inputs=[], base=None,
                        per_model=[], shared={}, seeds=[])
        out, expected = torch.empty(5000, dtype=out_dtype), torch.empty(5000, dtype=out_dtype)
        _write(values, job, out)
        expected.copy_(_rounded(values, job))
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), (spec_dtype, out_dtype)
        assert torch.equal(out.to(work).to(out_dtype), out)  # never more than the work dtype's precision


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_a_ties_vote_in_chunks_is_bit_equal_to_one_pass(parents, tmp_path, monkeypatch, method):
    from shoal.merge import methods

    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": method, "dtype": "bfloat16", "base_model": str(parents["base"]), "seed": 4,
        "models": [{"model": str(parents[n]), "parameters": {"weight": w, "density": d}}
                   for n, w, d in (("a", 0.3, 0.5), ("b", 0.9, 0.7), ("c", 0.4, 0.3))],
    }))
    assert_chunks_equal_one_pass(recipe, tmp_path, monkeypatch, methods, "_combine")


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_written_a_piece_at_a_time_is_bit_equal_to_its_whole_tensor(parents, tmp_path, monkeypatch, with_base,
                                                                          flatten):
    """Its angle found over the whole tensor first, then each chunk mixed and written alone (or, vector by vector,
    chunks of the whole result written): the same bits as the whole tensor merged and written at once."""
    from shoal.merge import engine, methods

    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": "nuslerp", "dtype": "bfloat16", "parameters": {"nuslerp_flatten": flatten},
        **({"base_model": str(parents["base"])} if with_base else {}),
        "models": [{"model": str(parents[n]), "parameters": {"weight": w}} for n, w in (("a", 0.6), ("b", 0.4))],
    }))
    monkeypatch.setattr(methods, "CHUNK", 1000)  # the angle's sums a chunk of 1,000 at a time in both merges
    with monkeypatch.context() as whole_tensors:
        whole_tensors.setattr(methods, "in_chunks", lambda tensor: False)
        run_merge(recipe, tmp_path / "whole")
    writes = []
    write = engine._write
    monkeypatch.setattr(engine, "_write", lambda *args: writes.append(1) or write(*args))
    run_merge(recipe, tmp_path / "pieces")
    whole, pieces = tensors(tmp_path / "whole"), tensors(tmp_path / "pieces")
    assert len(writes) > 2 * len(whole)  # most tensors written in several pieces
    for name in whole:
        assert torch.equal(whole[name], pieces[name]), name


def test_a_stream_reads_ahead_only_inputs_within_the_limit(bf16_parents, monkeypatch):
    """The next job's inputs are read while this one is used, unless they pass ahead_limit: then only once this one
    is done (the 256 x 64 head is read after the job before it; a 64 x 64 projection may be read ahead)."""
    from shoal.merge import engine
    from shoal.merge.plan import build_plan

    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(bf16_parents["base"]),
        "models": [{"model": str(bf16_parents[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in "ab"],
    }))
    parents = engine.open_parents(recipe)
    jobs = build_plan(recipe, parents).jobs
    events = []
    load = engine._load
    monkeypatch.setattr(engine, "_load", lambda job, *a: events.append(("load", job.spec.name)) or load(job, *a))
    limit = 3 * 128 * 64 * 2  # an MLP matrix of base and two parents in bf16; the head's are twice that
    names = [job.spec.name for job in jobs]
    head = names.index("lm_head.weight")
    for job, (base, tensors) in engine.prefetched(jobs, parents, "cpu", ahead_limit=limit):
        expected_base, expected = load(job, parents, "cpu")
        assert torch.equal(base, expected_base) and all(torch.equal(a, b) for a, b in zip(tensors, expected))
        events.append(("done", job.spec.name))
    assert sorted(e for e in events if e[0] == "load") == sorted(("load", n) for n in names)  # each read once
    assert events.index(("load", "lm_head.weight")) > events.index(("done", names[head - 1]))


def test_a_dare_merge_is_the_same_model_held_drawn_again_or_compiled_on_disk_or_resident(parents, tmp_path,
                                                                                         monkeypatch):
    """DARE's masks are drawn from each entry's index (merge.draws), in chunks of 1,000 entries here: held (a CPU's
    eager steps), drawn again a chunk at a time where they are used (as off a CPU: for the rescale and the merge),
    drawn inside the compiled pass (no mask made outside it), and in the resident merger, the model is one, bit
    for bit."""
    from shoal.merge import fused, methods, norms

    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": "dare_ties", "dtype": "bfloat16", "base_model": str(parents["base"]), "seed": 9,
        "models": [{"model": str(parents[n]), "parameters": {"weight": w, "density": d}}
                   for n, w, d in (("a", 0.3, 0.5), ("b", 0.9, 1.0), ("c", 0.4, 0.3))],
    }))
    monkeypatch.setattr(methods, "CHUNK", 1000)
    run_merge(recipe, tmp_path / "held")
    draws = []
    original = methods.RandomDraws.keep
    monkeypatch.setattr(methods.RandomDraws, "keep", lambda self, piece: draws.append(piece) or original(self, piece))
    monkeypatch.setattr(methods, "holds_draws", lambda on_cpu, compiled: False)
    run_merge(recipe, tmp_path / "drawn")
    chunked = sum(t.numel() > 1000 for t in tensors(tmp_path / "held").values())
    # a chunk of each tensor in chunks drawn where it is used for each of the two parents with a density below 1:
    # for the merge, and within the rescale's piece of whole blocks (merge.norms); held, it would be drawn once
    assert chunked > 5 and draws.count(slice(1000, 2000)) == 2 * chunked
    assert draws.count(slice(0, norms.BLOCK)) == 2 * len(tensors(tmp_path / "held"))
    monkeypatch.undo()
    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setattr(fused, "FUSED_MIN", 0)
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    kernels, draws = [], []
    kernel = fused._kernel
    monkeypatch.setattr(fused, "_kernel", lambda f: kernels.append(f) or kernel(f))
    monkeypatch.setattr(methods.RandomDraws, "keep", lambda self, piece: draws.append(piece) or original(self, piece))
    run_merge(recipe, tmp_path / "compiled")
    assert fused._merged in kernels and fused._norms in kernels and not fused._broken
    # the masks of tensors in chunks drawn inside the compiled passes (only the one-piece rescale of a tensor within
    # one chunk draws outside them)
    assert draws and all(piece is None or piece.start == 0 for piece in draws)
    assert_one_model(recipe, tmp_path, "held", ("drawn", "compiled"))


def test_a_random_drop_step_refuses_a_tensor_past_two_to_the_32_entries():
    from shoal.errors import ShoalError
    from shoal.merge.registry import METHODS, MergeCall

    big = torch.empty(2**32 + 1, dtype=torch.bfloat16, device="meta")
    for method in ("dare_ties", "della"):
        call = MergeCall(base=big, tensors=[big], per_model=[{"weight": 1.0, "density": 0.5, "epsilon": 0.1}],
                         shared=dict(METHODS[method].shared), work_dtype=torch.bfloat16, seeds=[1])
        with pytest.raises(ShoalError, match="at most 2\\^32 entries"):
            METHODS[method].pieces(call)


def test_ties_trims_found_again_where_used_merge_what_held_masks_merge(bf16_parents, tmp_path, monkeypatch):
    """Off a CPU and in a CPU's compiled pass, TIES' trim of a tensor in chunks is found again where it is used
    (methods.MagnitudeCut: a threshold and a tie position) instead of held: forced here in a CPU's eager steps too,
    with chunks of 1,000 entries, the merge on disk, compiled or not, and in the resident merger is the held masks'
    bit for bit."""
    from shoal.merge import fused, methods

    monkeypatch.setattr(methods, "CHUNK", 1000)
    recipe = parse_recipe(yaml.safe_dump({
        "merge_method": "ties", "dtype": "bfloat16", "base_model": str(bf16_parents["base"]),
        "models": [{"model": str(bf16_parents[n]), "parameters": {"weight": w, "density": d}}
                   for n, w, d in (("a", 0.3, 0.5), ("b", 0.9, 1.0), ("c", 0.4, 0.3))],
    }))
    run_merge(recipe, tmp_path / "held")
    cuts = []
    original = methods.magnitude_cut
    monkeypatch.setattr(methods, "magnitude_cut", lambda *a: cuts.append(1) or original(*a))
    monkeypatch.setattr(methods, "cuts", lambda tensor, dtype, compiled=False: methods.in_chunks(tensor))
    run_merge(recipe, tmp_path / "cut")
    assert len(cuts) > 10
    monkeypatch.setattr(fused, "FUSED_MIN", 0)
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    kernels = []
    kernel = fused._kernel
    monkeypatch.setattr(fused, "_kernel", lambda f: kernels.append(f) or kernel(f))
    run_merge(recipe, tmp_path / "cut, compiled")
    assert kernels and not fused._broken  # the compiled pass merged it
    assert_one_model(recipe, tmp_path, "held", ("cut", "cut, compiled"))


def assert_one_model(recipe, tmp_path, reference: str, others: tuple[str, ...]) -> None:
    """The merges written to tmp_path/reference and to each of tmp_path/others, and recipe applied by a resident
    merger with its inputs streamed, are one model, bit for bit."""
    from shoal.merge.resident import ResidentMerger

    expected = tensors(tmp_path / reference)
    for other in others:
        found = tensors(tmp_path / other)
        for name in expected:
            assert torch.equal(expected[name], found[name]), (other, name)
    merger = ResidentMerger(recipe, memory=methods_plan_stream())
    merger.apply(recipe)
    live = dict(merger.model.named_parameters())
    for name in expected:
        assert torch.equal(live[name].detach(), expected[name]), name


def methods_plan_stream():
    from shoal.merge.memory import MemoryPlan

    return MemoryPlan(inputs="stream")


