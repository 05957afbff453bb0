"""The resident merger's memory plans: the bytes each needs, counted from headers; the same weights as `shoal merge`
under every plan; and a search that does not fit refused before any tensor is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import one_error_line, write_two_split_task
from shoal.checkpoint.reader import Checkpoint, open_checkpoint
from shoal.errors import ShoalError
from shoal.merge.engine import open_parents, run_merge
from shoal.merge import methods
from shoal.merge.memory import MemoryPlan, TensorSize, format_bytes, memory_need, parse_bytes, tensor_sizes
from shoal.merge.plan import build_plan
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe, parse_recipe

# the tiny parents (synthetic.tiny_config): vocab 256, hidden 64, 4 layers, MLP 128
SHAPES = [(256, 64)] + 4 * ([(64, 64)] * 4 + [(128, 64), (128, 64), (64, 128), (64,), (64,)]) + [(64,), (256, 64)]
N = sum(torch.Size(s).numel() for s in SHAPES)  # 197,184 entries
L = 256 * 64  # the largest tensor, the embeddings
NORMS = 9 * 64  # 8 layer norms and the final norm: 64 entries each, ranked in int8; every other tensor in int16


def _recipe(parents: dict[str, Path], method: str, weights=(0.5, 0.5), densities=(0.5, 0.5), dtype=None) -> dict:
    params = lambda w, d: {"weight": w} | ({"density": d} if method != "linear" else {})
    recipe = {"merge_method": method, "seed": 5,
              "models": [{"model": str(parents[n]), "parameters": params(w, d)}
                         for n, w, d in zip(("a", "b"), weights, densities)]}
    if method != "linear":
        recipe["base_model"] = str(parents["base"])
    return recipe | ({"dtype": dtype} if dtype else {})


def _need(raw: dict, plan: MemoryPlan, slots: int = 2, on_cpu: bool = False):
    recipe = Recipe.model_validate(raw)
    parents = open_parents(recipe)
    return memory_need(tensor_sizes(build_plan(recipe, parents), parents, recipe.method), plan, slots=slots,
                       on_cpu=on_cpu)


def test_the_tiny_model_has_the_shapes_counted_by_hand(bf16_parents) -> None:
    base = open_checkpoint(bf16_parents["base"])
    assert sorted(info.shape for info in base.tensors.values()) == sorted(SHAPES) and N == 197_184


# TIES over two bf16 parents, two live models, on a GPU: per entry the base and parents take 2 bytes, a task vector
# or a merge temporary 4, a rank 2 (1 for the norms); a merge of a tensor this small (one piece, not in chunks)
# holds 3 n + 8 = 14 temporaries of its tensor; TIES writes no scratch buffer (linear does)
RANKS = 2 * (2 * (N - NORMS) + NORMS)  # two parents
MODELS = 2 * 2 * N
TIES_BF16 = [
    (MemoryPlan(), 10 * N, RANKS, MODELS + 10 * N + RANKS + 56 * L, 0),
    (MemoryPlan(keep="parents"), 6 * N, RANKS, MODELS + 6 * N + RANKS + 56 * L, 0),
    (MemoryPlan(ranks="recomputed"), 10 * N, 0, MODELS + 10 * N + 56 * L, 0),
    # the largest tensor's kept inputs and ranks are moved to the device while it merges: 10 + 2 * 2 bytes an entry
    (MemoryPlan(inputs="host"), 10 * N, RANKS, MODELS + 56 * L + 14 * L, 10 * N + RANKS),
    (MemoryPlan(inputs="host", keep="parents", ranks="recomputed"), 6 * N, 0, MODELS + 56 * L + 6 * L, 6 * N),
    # nothing kept; a tensor's base and parents are read (6 bytes an entry), and the next one's while it merges:
    # the embeddings' are followed (in name order) by a layer norm's 64 entries
    (MemoryPlan(inputs="stream"), 0, 0, MODELS + 56 * L + 6 * L + 6 * 64, 0),
]


@pytest.mark.parametrize("plan,inputs,ranks,device,host", TIES_BF16, ids=[p[0].describe() for p in TIES_BF16])
def test_bytes_of_each_plan_are_the_sum_by_hand(bf16_parents, plan, inputs, ranks, device, host) -> None:
    need = _need(_recipe(bf16_parents, "ties"), plan)
    assert (need.inputs, need.ranks, need.device, need.host) == (inputs, ranks, device, host)


def test_on_a_cpu_host_memory_is_the_device_memory(bf16_parents) -> None:
    need = _need(_recipe(bf16_parents, "ties"), MemoryPlan(inputs="host"), on_cpu=True)
    assert (need.device, need.host) == (MODELS + 10 * N + RANKS + 56 * L, 0)


def test_inputs_are_kept_in_the_narrower_of_their_own_and_the_recipe_dtype(parents, bf16_parents) -> None:
    keep_parents = MemoryPlan(keep="parents", ranks="recomputed")
    # fp32 parents merged in bf16 are kept rounded, as every trial would round them: 3 x 2 bytes an entry
    assert _need(_recipe(parents, "dare_ties", dtype="bfloat16"), keep_parents).inputs == 6 * N
    # bf16 parents merged in float32 stay bf16 (widened per tensor, per trial); the live models are float32
    widened = _need(_recipe(bf16_parents, "dare_ties", dtype="float32"), keep_parents)
    assert (widened.inputs, widened.models) == (6 * N, 2 * 4 * N)
    # linear keeps the parents only (no base, no task vectors), one live model
    linear = _need(_recipe(bf16_parents, "linear"), MemoryPlan(), slots=1)
    assert (linear.inputs, linear.ranks, linear.device) == (4 * N, 0, 2 * N + 4 * N + 4 * L + 16 * L)


def _on_disk(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(yaml.safe_dump(recipe)), out)
    return {k: v for shard in sorted(out.glob("*.safetensors")) for k, v in load_file(shard).items()}


PLANS = [MemoryPlan(), MemoryPlan(keep="parents", ranks="recomputed"), MemoryPlan(inputs="host", keep="parents"),
         MemoryPlan(inputs="host", ranks="recomputed"), MemoryPlan(inputs="stream")]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_every_plan_merges_what_shoal_merge_writes(parents, bf16_parents, tmp_path, method, kind) -> None:
    models = parents if kind == "fp32" else bf16_parents
    first = _recipe(models, method)
    # another recipe than the one the merger was built from: what a plan keeps must not depend on it
    later = _recipe(models, method, weights=(0.8, 0.3), densities=(0.3, 0.7))
    expected = _on_disk(later, tmp_path / "out")
    for plan in PLANS:
        merger = ResidentMerger(parse_recipe(yaml.safe_dump(first)), slots=1, memory=plan)
        merger.apply(parse_recipe(yaml.safe_dump(later)))
        live = dict(merger.model.named_parameters())
        for name, tensor in expected.items():
            assert torch.equal(live[name].detach(), tensor), (plan.describe(), name)


def test_ties_rescaled_from_stored_ranks_merges_what_shoal_merge_writes(bf16_parents, tmp_path) -> None:
    """TIES with mergekit's rescale switched on: the trim from stored ranks is rescaled as the recomputed one is."""
    recipe = _recipe(bf16_parents, "ties", densities=(0.3, 0.6)) | {"parameters": {"rescale": True}}
    expected = _on_disk(recipe, tmp_path / "out")
    unscaled = _on_disk(_recipe(bf16_parents, "ties", densities=(0.3, 0.6)), tmp_path / "plain")
    assert not torch.equal(expected["model.layers.0.mlp.up_proj.weight"], unscaled["model.layers.0.mlp.up_proj.weight"])
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)), slots=1, memory=MemoryPlan(ranks="stored"))
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    live = dict(merger.model.named_parameters())
    for name, tensor in expected.items():
        assert torch.equal(live[name].detach(), tensor), name


def test_a_task_vector_method_without_pieces_is_counted_whole_in_chunks_too() -> None:
    """SCE and RAM stack their task vectors whole: a tensor past one chunk is counted as in one piece (3 n + 8)."""
    numel = methods.CHUNK + 1
    size = lambda pieces: TensorSize(numel=numel, out=2, merged=True, base=2, inputs=(2, 2), compute=4,
                                     task_vectors=True, work=2, pieces=pieces, read=6 * numel)
    working = lambda pieces: memory_need([size(pieces)], MemoryPlan(inputs="stream"), slots=1, on_cpu=True).working
    assert working(False) == numel * (14 * 4 + 6)
    assert working(True) < working(False)


def test_ranks_take_the_smallest_integer_dtype_and_parents_beside_deltas_are_dropped(bf16_parents) -> None:
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(_recipe(bf16_parents, "ties"))), slots=1)
    embeddings, norm = merger._inputs["model.embed_tokens.weight"], merger._inputs["model.norm.weight"]
    assert [r.dtype for r in embeddings.ranks] == [torch.int16] * 2 and norm.ranks[0].dtype == torch.int8
    assert embeddings.tensors == [] and embeddings.base.dtype == torch.bfloat16
    assert [d.dtype for d in embeddings.deltas] == [torch.float32] * 2


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(self, name, device="cpu"):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(Checkpoint, "tensor", refuse)


def test_a_plan_over_its_limit_is_refused_with_its_figure_before_any_tensor_is_read(bf16_parents, no_tensor_reads):
    recipe = _recipe(bf16_parents, "ties")
    need = _need(recipe, MemoryPlan(limit="1MB"), slots=1, on_cpu=True)
    lines = []
    with pytest.raises(ShoalError) as refused:
        ResidentMerger(parse_recipe(yaml.safe_dump(recipe)), memory=MemoryPlan(limit="1MB"), report=lines.append)
    assert f"needs {format_bytes(need.device)} on cpu, more than 1 MB" in str(refused.value)
    assert "inputs: stream" in str(refused.value)  # and says what would fit better
    assert lines == [f"memory plan: inputs on device, keep deltas, ranks stored: {format_bytes(need.device)} on cpu "
                     f"(inputs {format_bytes(10 * N)}, ranks {format_bytes(RANKS)}, 1 live model "
                     f"{format_bytes(2 * N)}, working {format_bytes(need.working)})"]


def test_shoal_evolve_memory_limit_is_refused_like_other_errors(run_cli, bf16_parents, tmp_path, no_tensor_reads):
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"base": str(bf16_parents["base"]), "method": "ties",
                                      "parents": {"a": str(bf16_parents["a"]), "b": str(bf16_parents["b"])},
                                      "tasks": [{"path": str(write_two_split_task(tmp_path / "t"))}],
                                      "memory": {"inputs": "stream"}}))
    code, _, err = run_cli("evolve", search, tmp_path / "run", "--memory-limit", "200kB")
    one_error_line(code, err, "memory plan (inputs streamed from the parent files) needs", "more than 200 kB")
    assert "memory plan: inputs streamed from the parent files:" in err  # the start line came first
    assert not (tmp_path / "run" / "run.json").exists()
    code, _, err = run_cli("evolve", search, tmp_path / "run", "--memory-limit", "lots")
    one_error_line(code, err, "memory limit 'lots'")


def test_a_search_over_workers_prints_each_workers_plan_and_refuses_it_before_ray_starts(
    run_cli, bf16_parents, tmp_path, no_tensor_reads, monkeypatch
) -> None:
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray started before the memory plan was checked"))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"base": str(bf16_parents["base"]), "method": "ties",
                                      "parents": {"a": str(bf16_parents["a"]), "b": str(bf16_parents["b"])},
                                      "tasks": [{"path": str(write_two_split_task(tmp_path / "t"))}]}))
    recipe = _recipe(bf16_parents, "ties")
    need = _need(recipe, MemoryPlan(), slots=1, on_cpu=True)  # one live model each: workers do not merge ahead
    code, _, err = run_cli("evolve", search, tmp_path / "run", "--workers", "2", "--memory-limit", "1MB")
    one_error_line(code, err, f"needs {format_bytes(need.device)} on cpu, more than 1 MB")
    printed = " ".join(err.split())  # the console wraps long lines
    assert f"each worker's memory plan: inputs on device, keep deltas, ranks stored: {format_bytes(need.device)} on cpu" in printed
    assert not (tmp_path / "run" / "run.json").exists()


def test_sizes_read_as_users_write_them() -> None:
    assert [parse_bytes(s) for s in ("24GB", "24 GiB", "512mb", "1.5e9", "100")] == \
        [24 * 10**9, 24 * 2**30, 512 * 10**6, 1_500_000_000, 100]
    assert [format_bytes(b) for b in (999, 812_000_000, 1_234_000_000, 170 * 10**9)] == \
        ["999 B", "812 MB", "1.23 GB", "170 GB"]
    with pytest.raises(ShoalError, match="24 parsecs"):
        parse_bytes("24 parsecs")


def _kept_bytes(merger: ResidentMerger) -> tuple[int, int]:
    """What the merger really keeps: (inputs: base, parents, task vectors; ranks), in bytes."""
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts or [])  # noqa: E731
    kept = sum(size(([i.base] if i.base is not None else []) + i.tensors + (i.deltas or [])) for i in merger._inputs.values())
    return kept, sum(size(i.ranks) for i in merger._inputs.values())


@pytest.mark.parametrize("plan", [MemoryPlan(), MemoryPlan(keep="parents"), MemoryPlan(ranks="recomputed"),
                                  MemoryPlan(keep="parents", ranks="recomputed")], ids=lambda p: p.describe())
@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("tokenizer", [None, {"source": "base", "pad_to_multiple_of": 96}], ids=["own", "padded"])
def test_the_counted_inputs_are_what_the_merger_keeps(bf16_parents, plan, dtype, tokenizer) -> None:
    """Counted from headers, kept in fact, for bf16 parents: in their own dtype or the recipe's float32, and with a
    tokenizer setting (embedding and head rows aligned, 256 -> 288, in the working dtype)."""
    raw = _recipe(bf16_parents, "ties", dtype=dtype) | ({"tokenizer": tokenizer} if tokenizer else {})
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(raw)), slots=1, memory=plan)
    assert _kept_bytes(merger) == (merger.need.inputs, merger.need.ranks)


@pytest.mark.parametrize("on_cpu,chunk", [(True, methods.CHUNK), (False, methods.DEVICE_CHUNK)])
def test_a_tensor_merged_in_chunks_holds_its_masks_and_chunks_where_one_piece_holds_whole_temporaries(on_cpu, chunk):
    """Two bf16 parents, inputs streamed (6 bytes an entry read), one live model. In chunks: a bool keep mask a
    parent (only in a CPU's eager steps: off a CPU and in its compiled pass, DARE's is drawn again and TIES' trim
    found again where it is used), and the most
    held while one is formed (DARE, and TIES off a CPU: 2 bytes of allocator slack; TIES without stored ranks on a
    CPU: the bf16 task vector, its magnitudes, a threshold mask and 2 bytes of slack, 8), and 2 n + 6 = 10 float32
    chunks (or DARE's table, made first, where it holds more); in one piece, 3 n + 8 = 14 float32 temporaries."""
    def working(numel: int, sparsify: str) -> int:
        size = TensorSize(numel=numel, out=2, merged=True, base=2, inputs=(2, 2), compute=4, task_vectors=True,
                          sparsify=sparsify, work=2, pieces=True, read=6 * numel)
        return memory_need([size], MemoryPlan(inputs="stream"), slots=1, on_cpu=on_cpu).working

    held = 2 if on_cpu else 0  # off a CPU, DARE's masks are drawn again and TIES' trims found again where used
    # DARE's table of its draws (a search's, made before the chunks are merged): 48 bytes an entry of its pieces, of
    # a chunk on a CPU and 2^20 entries elsewhere, where they pass the chunks' temporaries
    table = min(chunk, 1 << 20) * 48
    assert working(chunk + 1, "random") == (chunk + 1) * (held + 2 + 6) + max(chunk * 10 * 4, table)
    # a CPU's compiled pass draws DARE's masks and finds TIES' trims inside it (none held), and merges larger chunks
    # (of 2^21 entries): a float32 result, its bf16 copy and a byte a parent each, where they pass the eager steps'
    # 2 n + 6 chunks; DARE's table's pieces have 2^20 entries
    def compiled(numel: int, sparsify: str = "random") -> int:
        size = TensorSize(numel=numel, out=2, merged=True, base=2, inputs=(2, 2), compute=4, task_vectors=True,
                          sparsify=sparsify, work=2, pieces=True, read=6 * numel)
        return memory_need([size], MemoryPlan(inputs="stream"), slots=1, on_cpu=on_cpu, compiled=True).working

    if on_cpu:  # (only a CPU compiles)
        assert compiled(chunk + 1) == (chunk + 1) * (2 + 6) + (chunk + 1) * 48
        assert compiled(8 * chunk) == 8 * chunk * (2 + 6) + (1 << 20) * 48
        assert compiled(1 << 24) == (1 << 24) * (2 + 6) + (1 << 20) * 48
        assert compiled(8 * chunk, "magnitude") == 8 * chunk * (2 + 6) + 8 * chunk * (4 + 2 + 2)
        assert compiled(1 << 24, "magnitude") == (1 << 24) * (2 + 6) + methods.COMPILED_CHUNK * (4 + 2 + 2)
    else:
        assert compiled(chunk + 1) == (chunk + 1) * (2 + 6) + chunk * 10 * 4
    forming = 8 if on_cpu else 2
    assert working(chunk + 1, "magnitude") == (chunk + 1) * (held + forming + 6) + chunk * 10 * 4
    assert working(chunk, "random") == working(chunk, "magnitude") == chunk * (14 * 4 + 6)
    # a 128k-token embedding of width 4096 (525M entries) in chunks: under a sixth of its bytes in one piece (most of it the inputs read)
    big = 128_256 * 4096
    assert working(big, "random") * 6 < big * (14 * 4 + 6)
