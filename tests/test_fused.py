"""The compiled pass of task-vector merges (merge.fused) gives the eager steps' values, bit for bit, on disk and in
the resident merger under every plan; a compiler that fails leaves the same values; only large merges compile."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import read_tensors as tensors

from shoal.merge import engine, fused, methods
from shoal.merge.memory import MemoryPlan
from shoal.merge.plan import build_plan
from shoal.merge.resident import ResidentMerger
from shoal.recipe import parse_recipe


@pytest.fixture
def compiled(monkeypatch):
    """Every merge in chunks takes the compiled pass, in chunks of 3,000 entries where the eager steps take 1,000 (a
    fresh compile: no earlier test's kernels, nor dynamo's limit of recompiles reached); yields its calls."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setattr(methods, "COMPILED_CHUNK", 3000)  # other chunks than the eager steps', merging the same
    monkeypatch.setattr(fused, "FUSED_MIN", 0)
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    calls = []
    kernel = fused._kernel
    monkeypatch.setattr(fused, "_kernel", lambda f: lambda *a: calls.append(f.__name__) or kernel(f)(*a))
    yield calls
    assert not fused._broken  # nothing fell back to the eager steps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # and something was compiled


def recipe_of(method: str, parents, dtype: str, densities: tuple[float, ...] = (0.5, 0.7, 0.3)):
    """A recipe of method over parents a, b and c (method "ties+rescale": TIES with the L1 rescale)."""
    method, _, rescale = method.partition("+")
    models = [{"model": str(parents[n]), "parameters": {"weight": w, "density": d}}
              for n, w, d in zip("abc", (0.3, 0.9, -0.4), densities)]
    if method in ("task_arithmetic",):
        for m in models:
            del m["parameters"]["density"]
    return parse_recipe(yaml.safe_dump({
        "merge_method": method, "dtype": dtype, "base_model": str(parents["base"]), "seed": 5,
        "parameters": {"lambda": 0.8} | ({"rescale": True} if rescale else {}), "models": models,
    }))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bit patterns (so that -0.0 and 0.0 differ)."""
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def assert_same_bits(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(bits(ours[name]), bits(theirs[name])), name


@pytest.mark.parametrize("method,dtype", [
    ("task_arithmetic", "bfloat16"), ("ties", "bfloat16"), ("ties", "float32"), ("ties", "float16"),
    ("ties+rescale", "bfloat16"), ("dare_ties", "bfloat16"),
    ("dare_linear", "bfloat16"), ("della", "bfloat16"), ("breadcrumbs_ties", "float32"),
])
def test_the_compiled_pass_merges_what_the_eager_steps_merge(parents, tmp_path, compiled, method, dtype):
    recipe = recipe_of(method, parents, dtype)
    engine.run_merge(recipe, tmp_path / "fused")
    assert compiled.count("_merged") > 30  # every chunk of every matrix
    assert ("_norms" in compiled) == (method in ("ties+rescale", "dare_ties", "dare_linear", "della"))  # the L1 rescale
    fused.FUSED_MIN = 1 << 62  # noqa: the fixture's monkeypatch puts it back
    engine.run_merge(recipe, tmp_path / "eager")
    assert_same_bits(tensors(tmp_path / "fused"), tensors(tmp_path / "eager"))


@pytest.mark.parametrize("method,memory", [
    ("ties", MemoryPlan(keep="deltas", ranks="stored")), ("dare_ties", MemoryPlan(keep="deltas")),
    ("ties", MemoryPlan(inputs="stream")),
])
def test_parents_kept_whole_take_the_pass_compiled_for_masks(parents, tmp_path, compiled, method, memory):
    """With TIES' ranks stored, DARE's draws made inside the pass, or TIES' trims found inside it (streamed
    parents), a parent at density 1 has nothing dropped (no mask): it goes into the same compiled pass, kept whole
    (for DARE: drawn below 2^32; for a trim: cut at 0 with every tie kept), with the eager steps' values, and
    nothing is compiled anew for one such parent or two."""
    graphs = None
    for densities in ((0.5, 0.7, 0.3), (0.5, 1.0, 0.3), (1.0, 1.0, 0.3)):
        recipe = recipe_of(method, parents, "bfloat16", densities)
        merger = ResidentMerger(recipe, memory=memory)
        merger.apply(recipe)
        count = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs is None or count == graphs, densities
        graphs = count
        fused.FUSED_MIN = 1 << 62  # noqa: the eager steps, on disk (the fixture's monkeypatch puts it back)
        engine.run_merge(recipe, tmp_path / str(densities))
        fused.FUSED_MIN = 0
        live = {name: p.detach() for name, p in merger.model.named_parameters()}
        on_disk = tensors(tmp_path / str(densities))
        assert_same_bits({name: live[name] for name in on_disk}, on_disk)


@pytest.mark.parametrize("consensus,normalize,lam,elect,kept", [
    (True, True, 1.0, torch.bfloat16, False), (True, False, 0.7, None, False), (True, True, 1.3, torch.bfloat16, True),
    (False, True, 1.0, None, False), (False, False, 0.7, None, True),
])
def test_the_compiled_pass_keeps_the_eager_steps_signed_zeros_and_rounding(compiled, consensus, normalize, lam,
                                                                             elect, kept):
    """One tensor of hand-made pieces, a parent with nothing dropped, kept float32 task vectors or parents and a
    base, every setting: combiner's bits are combine_task_vectors', piece by piece. Every 7th entry the base is
    -0.0 and each term of the sum is -0.0 (two parents' negative τ dropped, the third's τ 0 under a negative
    weight): the eager sum starts from 0.0 and gives 0.0 + -0.0 = 0.0 there, where a compiler that drops adding
    zero would keep -0.0."""
    generator = torch.Generator().manual_seed(3)
    n = 3000
    base = torch.randn(n, generator=generator).bfloat16()
    base[::7] = -0.0
    parents = [(base.float() + 0.02 * torch.randn(n, generator=generator)).bfloat16() for _ in range(3)]
    parents[0][::7] = parents[1][::7] = -0.01
    parents[2][::7] = -0.0
    masks = [torch.rand(n, generator=generator) < d for d in (0.4, 0.8)]
    for mask in masks:
        mask[::7] = False
    vectors = [methods.TaskVector(p.float() - base.float(), None) if kept else methods.TaskVector(p, base)
               for p in parents]
    vectors = [methods.rescaled(replace(v, mask=m))[0] for v, m in zip(vectors, masks)] + vectors[2:]
    settings = dict(consensus=consensus, normalize=normalize, lam=lam, elect_dtype=elect)
    weights = [0.6, 0.3, -0.9]
    merge = fused.combiner(base, vectors, weights, **settings)
    for piece in methods.chunks(n, 1000):
        ours = merge(piece)
        theirs = methods.combine_task_vectors(base, vectors, weights, piece=piece, **settings)
        assert torch.equal(bits(ours), bits(theirs)), piece
    assert bool((bits(merge(None)[::7]) == 0).all())  # 0.0, not -0.0


@pytest.mark.parametrize("dtypes,zero", [
    ((torch.bfloat16, torch.bfloat16), torch.bfloat16), ((torch.float16, torch.float16), torch.float16),
    ((torch.float32, torch.bfloat16), torch.bfloat16), ((torch.bfloat16, torch.float32), torch.bfloat16),
    ((torch.bfloat16, torch.float16), torch.float32), ((torch.float32, torch.float32), torch.float32),
])
def test_the_zero_of_the_compiled_sums_takes_the_inputs_one_16_bit_type(dtypes, zero):
    """The 16-bit float type of a base and its task vectors (dtypes: the base's, the vectors') is the zero's (so
    every step of the compiled loop loads one, and Inductor gives the loop that type's lanes); two such types, or
    none, leave float32. (That the sums starting from it keep their bits: the signed-zeros test above.)"""
    base, tensors = torch.zeros(4, dtype=dtypes[0]), [torch.zeros(4, dtype=dtypes[1]) for _ in range(2)]
    assert fused.in_lanes(base, tensors) == zero


@pytest.mark.parametrize("consensus", [True, False])
def test_draws_made_inside_the_compiled_pass_are_the_eager_draws_of_any_piece(compiled, consensus):
    """DARE's masks drawn inside the pass from each entry's index (a matrix's whole tensor too, and a parent with
    nothing dropped among drawn ones): the rescale's factors and the merged values are the eager steps' with the
    masks drawn outside it, bit for bit."""
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(30, 100, generator=generator).bfloat16()
    parents = [(base.float() + 0.02 * torch.randn(30, 100, generator=generator)).bfloat16() for _ in range(3)]
    vectors = [methods.TaskVector(p, base) for p in parents]
    drawn = [replace(v, mask=methods.RandomDraws(base.shape, base.device, d, seed))
             for v, d, seed in zip(vectors, (0.4, 0.8), (11, 12))] + vectors[2:]
    ours = [methods.rescaled(v, fused.piece_norms)[0] for v in drawn[:2]] + drawn[2:]
    theirs = [methods.rescaled(v)[0] for v in drawn[:2]] + drawn[2:]
    assert [float(v.scale) for v in ours[:2]] == [float(v.scale) for v in theirs[:2]]
    settings = dict(consensus=consensus, normalize=False, lam=1.0, elect_dtype=torch.bfloat16)
    weights = [0.6, 0.3, -0.9]
    merge = fused.combiner(base, ours, weights, **settings)
    for piece in [*methods.chunks(base.numel(), 1000), None]:
        expected = methods.combine_task_vectors(base, theirs, weights, piece=piece, **settings)
        assert torch.equal(bits(merge(piece)), bits(expected)), piece
    # the norms a piece of whole blocks of 2^16 entries: one; the merge in chunks of 1,000
    assert compiled.count("_norms") == 2 and compiled.count("_merged") == 3 + 1


@pytest.mark.parametrize("method,memory", [
    ("ties", MemoryPlan(keep="deltas", ranks="stored")), ("dare_ties", MemoryPlan(keep="deltas")),
    ("ties", MemoryPlan(inputs="stream")),
])
def test_the_resident_merger_compiles_the_same_merge_under_every_plan(parents, tmp_path, compiled, method, memory):
    """Kept float32 task vectors and TIES' stored ranks go into the compiled pass as parents and masks do."""
    recipe = recipe_of(method, parents, "bfloat16")
    engine.run_merge(recipe, tmp_path / "disk")
    before = len(compiled)
    said = []
    merger = ResidentMerger(recipe, memory=memory, report=said.append)
    assert said[0].endswith("; merged a chunk at a time in one compiled pass (compiled at the first merge; "
                            "SHOAL_FUSED=0: in eager steps)")
    merger.apply(recipe)
    assert len(compiled) > before
    live = {name: p.detach() for name, p in merger.model.named_parameters()}
    on_disk = tensors(tmp_path / "disk")
    assert_same_bits({name: live[name] for name in on_disk}, on_disk)


@pytest.mark.parametrize("memory", [MemoryPlan(keep="deltas"), MemoryPlan(inputs="stream")])
@pytest.mark.parametrize("steps", ["eager", "compiled"])
def test_a_search_s_later_merges_read_the_rescale_s_norms_from_a_table_of_its_draws(parents, tmp_path, monkeypatch,
                                                                                     request, memory, steps):
    """Under one seed and at densities on the draws' grid, the resident merger sums each DARE task vector's q by its
    draws' bins at its first merge (norms.Drawn) and reads every later merge's |τ · keep|_1 from that table: the
    models `shoal merge` writes (which finds its norms in a pass), bit for bit. Another seed makes its tables anew."""
    from shoal.merge import norms

    if steps == "compiled":
        request.getfixturevalue("compiled")
    monkeypatch.setattr(norms, "TABLE_MIN", 0)  # the test parents' tensors are far smaller than a search's
    made = []
    tabulated = methods._tabulated
    monkeypatch.setattr(methods, "_tabulated", lambda *args: made.append(args[1].seed) or tabulated(*args))
    # the last densities off the grid (as `shoal merge` of another recipe): found in a pass, no table read or made
    densities = [(0.5, 307 / 1024, 0.25), (0.75, 0.5, 1 / 1024), (1023 / 1024, 0.5, 0.5), (0.3, 0.7, 0.45)]
    recipes = [recipe_of("dare_ties", parents, "bfloat16", d) for d in densities]
    recipes.insert(3, recipes[0].model_copy(update={"seed": 6}))
    merger = ResidentMerger(recipes[0], memory=memory)
    tables = []
    for i, recipe in enumerate(recipes):
        merger.apply(recipe)
        tables.append(len(made))
        engine.run_merge(recipe, tmp_path / str(i))
        on_disk = tensors(tmp_path / str(i))
        live = {name: p.detach() for name, p in merger.model.named_parameters()}
        assert_same_bits({name: live[name] for name in on_disk}, on_disk)
    vectors = 3 * sum(job.base is not None for job in build_plan(recipes[0], merger.parents).jobs)
    assert tables == [vectors, vectors, vectors, 2 * vectors, 2 * vectors] and len(set(made)) == 2 * vectors


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_nan_in_a_trimmed_parent_is_refused_with_its_tensor_named_compiled_or_not(parents, tmp_path, compiled,
                                                                                    dtype):
    """TIES' trims counted from |τ| formed by a compiled pass: a NaN there (which AVX2's rounding to bfloat16 gives
    the sign bit that abs cleared) is counted as the eager steps count it, above inf, and the merge is refused
    with the tensor named, as in the eager steps, not failed inside the histogram."""
    import shutil

    from safetensors.torch import load_file, save_file

    from shoal.errors import ShoalError

    shutil.copytree(parents["b"], tmp_path / "b")
    weights = load_file(tmp_path / "b" / "model.safetensors")
    weights["model.embed_tokens.weight"].view(-1)[5000] = float("nan")  # inside a compiled chunk's vector lanes
    save_file(weights, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    recipe = recipe_of("ties", parents | {"b": tmp_path / "b"}, dtype)
    with pytest.raises(ShoalError, match="NaN or inf in tensor model.embed_tokens.weight"):
        engine.run_merge(recipe, tmp_path / "fused")
    assert "_magnitudes" in compiled and "_merged" in compiled
    fused.FUSED_MIN = 1 << 62  # noqa: the eager steps (the fixture's monkeypatch puts it back)
    with pytest.raises(ShoalError, match="NaN or inf in tensor model.embed_tokens.weight"):
        engine.run_merge(recipe, tmp_path / "eager")


def test_a_merge_ahead_in_another_thread_compiles_the_same_merge(parents, compiled):
    """The search merges the next candidate into the second live model in a thread while this one is scored: the
    compiled pass runs (and is first compiled) there, with the values the main thread's gives."""
    recipe = recipe_of("dare_ties", parents, "bfloat16")
    merger = ResidentMerger(recipe, slots=2, memory=MemoryPlan(inputs="stream"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(merger.apply, recipe, 1).result()
    assert compiled and not fused._broken  # the thread took the compiled pass
    merger.apply(recipe, 0)
    ahead, here = (dict(model.named_parameters()) for model in merger.models)
    assert_same_bits({n: p.detach() for n, p in ahead.items()}, {n: p.detach() for n, p in here.items()})


def test_a_compiler_that_fails_leaves_the_same_merge_and_is_said_once(parents, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setattr(fused, "FUSED_MIN", 0)
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    failures = []

    def no_compiler(*args):
        failures.append(1)
        raise RuntimeError("C++ compile error\ng++: not found")

    monkeypatch.setattr(fused, "_kernel", lambda function: no_compiler)
    recipe = recipe_of("dare_ties", parents, "bfloat16")
    with caplog.at_level(logging.WARNING, logger="shoal.merge.fused"):
        engine.run_merge(recipe, tmp_path / "failed")
    assert len(failures) == 2  # tried with the C++ wrapper and without, then the eager steps for every chunk
    assert [r.getMessage() for r in caplog.records] == [
        "the fused merge pass's C++ wrapper could not be built (RuntimeError: C++ compile error); its kernels hold "
        "the GIL",
        "the fused merge pass could not be compiled (RuntimeError: C++ compile error); merging with eager steps"]
    assert not fused.enabled("cpu")
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    monkeypatch.setattr(fused, "FUSED_MIN", 1 << 62)
    engine.run_merge(recipe, tmp_path / "eager")
    assert_same_bits(tensors(tmp_path / "failed"), tensors(tmp_path / "eager"))


def test_a_c_plus_plus_wrapper_that_cannot_be_built_leaves_the_default_binding(parents, tmp_path, monkeypatch, caplog):
    """Inductor's C++ wrapper needs more of torch's build than a kernel does: where it fails, the kernels are called
    through the default binding (said once), not given up for the eager steps; the same merge."""
    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setattr(fused, "FUSED_MIN", 0)
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    monkeypatch.setattr(fused, "_compiled", {})
    built = []

    def compile_(function, dynamic, options):  # the traced function itself stands for its kernel here
        built.append(options["cpp_wrapper"])
        if options["cpp_wrapper"]:
            return lambda *args: (_ for _ in ()).throw(RuntimeError("undefined reference to `aoti_torch_empty'"))
        return function

    monkeypatch.setattr(fused.torch, "compile", compile_)
    recipe = recipe_of("dare_ties", parents, "bfloat16")
    with caplog.at_level(logging.WARNING, logger="shoal.merge.fused"):
        engine.run_merge(recipe, tmp_path / "default binding")
    assert built[:2] == [True, False] and not any(built[2:]) and not fused._broken
    assert [r.getMessage() for r in caplog.records] == [
        "the fused merge pass's C++ wrapper could not be built (RuntimeError: undefined reference to "
        "`aoti_torch_empty'); its kernels hold the GIL"]
    monkeypatch.setattr(fused, "FUSED_MIN", 1 << 62)
    engine.run_merge(recipe, tmp_path / "eager")
    assert_same_bits(tensors(tmp_path / "default binding"), tensors(tmp_path / "eager"))


def test_a_compiled_kernel_lets_another_thread_run_python_meanwhile(compiled):
    """Through Inductor's C++ wrapper a kernel lets go of the GIL: a thread making small torch calls (as a search's
    scoring does: each lets go of the GIL and takes it back) beside one that calls a compiled pass over and over
    keeps much of its pace (the default binding held the GIL through each kernel: such a thread made 100 of its 1.2
    million calls in 3 s, BENCHMARKS.md)."""
    import threading
    import time

    from shoal.merge import draws, norms

    generator = torch.Generator().manual_seed(2)
    rows, base = (torch.randn(256, norms.BLOCK, generator=generator).bfloat16() for _ in range(2))
    args = (rows, base, fused.Drawn(torch.tensor(draws.offset(3)), torch.tensor(draws.threshold(0.5))), torch.tensor(0),
            None)
    fused._kernel(fused._norms)(*args)  # compiled (16.8M entries: about 45 ms a call here)

    def count(seconds: float) -> int:
        n, end, x = 0, time.perf_counter() + seconds, torch.ones(8)
        while time.perf_counter() < end:
            x = x + 1
            n += 1
        return n

    alone = count(1.0)
    stop = threading.Event()
    caller = threading.Thread(target=lambda: [fused._kernel(fused._norms)(*args) for _ in iter(stop.is_set, True)])
    caller.start()
    try:
        beside = count(1.0)
    finally:
        stop.set()
        caller.join()
    # here: 62 % of its pace beside the kernels through the wrapper, 6.5 % through the default binding
    assert beside > alone / 5


def test_only_merges_of_enough_entries_in_chunks_compile(parents, monkeypatch):
    """The tiny parents' matrices (64 x 64 attention, 64 x 128 MLP, 256 x 64 embedding and head) are in chunks of
    1,000 entries and count; their 64-entry norms are one chunk each and do not."""
    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    recipe = recipe_of("ties", parents, "bfloat16")
    plan = build_plan(recipe, engine.open_parents(recipe))
    chunked = sum(j.spec.shape[0] * j.spec.shape[1] for j in plan.jobs
                  if len(j.spec.shape) == 2 and j.spec.shape[0] * j.spec.shape[1] > 1000)
    assert chunked > 0
    monkeypatch.setattr(fused, "FUSED_MIN", chunked)
    assert engine.fused_pays(plan, "ties", "cpu")
    assert not engine.fused_pays(plan, "linear", "cpu")  # no task-vector pieces to compile
    monkeypatch.setattr(fused, "FUSED_MIN", chunked + 1)
    assert not engine.fused_pays(plan, "ties", "cpu")
    monkeypatch.setattr(fused, "FUSED_MIN", chunked * fused.SEARCH_MERGES)  # a search counts a generation's merges
    assert engine.fused_pays(plan, "ties", "cpu", fused.SEARCH_MERGES) and not engine.fused_pays(plan, "ties", "cpu")
    said = []
    ResidentMerger(recipe, report=said.append)
    assert said[0].endswith("(compiled at the first merge; SHOAL_FUSED=0: in eager steps)")
    monkeypatch.setattr(fused, "FUSED_MIN", 0)
    monkeypatch.setenv("SHOAL_FUSED", "0")
    assert not engine.fused_pays(plan, "ties", "cpu")
    monkeypatch.delenv("SHOAL_FUSED")
    assert engine.fused_pays(plan, "ties", "cpu") and not fused.enabled("meta")  # a CPU's pass only


def test_after_a_failed_compile_the_larger_pieces_merge_in_the_eager_steps_chunks(monkeypatch):
    """Once compiling fails, a piece of the compiled pass (methods.COMPILED_CHUNK, fused.NORMS_PIECE entries) is
    merged and its norms and a search's table of its draws found a chunk of the eager steps at a time, never whole:
    the same values as the eager steps, with their temporaries."""
    from shoal.merge import norms

    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    monkeypatch.setattr(fused, "_kernel", lambda function: lambda *args: (_ for _ in ()).throw(RuntimeError("no")))
    monkeypatch.setattr(methods, "CHUNK", 1000)  # rounded up to a block (2^16 entries) for the norms' sake
    numel = 3 * norms.BLOCK + 1234
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(numel, generator=generator)
    parents = [base + 0.01 * torch.randn(numel, generator=generator) for _ in range(2)]
    vectors = [methods.TaskVector(p, base, mask=methods.RandomDraws(base.shape, base.device, d, s))
               for p, d, s in zip(parents, (0.4, 0.7), (3, 4))]
    pieces: list[int] = []
    originals = {name: getattr(methods, name) for name in ("combine_task_vectors", "piece_norms", "piece_bins")}
    for name, original in originals.items():
        monkeypatch.setattr(methods, name, lambda *a, _original=original, **k: pieces.append(
            (k.get("piece") or a[-2]).stop - (k.get("piece") or a[-2]).start) or _original(*a, **k))
    everything = slice(0, 1 << 24)
    failed = [fused.piece_norms(vector, everything, None) for vector in vectors]
    assert fused._broken and max(pieces) <= norms.BLOCK and sum(pieces) == 2 * numel
    for vector, sums in zip(vectors, failed):
        expected = methods.rescaled(vector)[1]
        assert norms.total(sums[1], sums[0]) == expected.total and torch.equal(sums[0], expected.exponents)
    pieces.clear()
    # a search's table of its draws, made a chunk at a time too: the sums below every step as the eager steps' own
    for vector in vectors:
        found, below = fused.piece_bins(vector, vector.mask.seed, everything, None)
        expected_exponents, expected = originals["piece_bins"](vector, vector.mask.seed, slice(0, numel), None)
        assert torch.equal(found, expected_exponents) and torch.equal(below, expected)
    assert max(pieces) <= norms.BLOCK and sum(pieces) == 2 * numel
    pieces.clear()
    settings = dict(consensus=True, normalize=False, lam=1.0)
    merged = fused.combiner(base, vectors, [0.6, 0.5], **settings)(slice(0, 1 << 21))
    assert max(pieces) <= norms.BLOCK and sum(pieces) == numel
    eager = originals["combine_task_vectors"](base, vectors, [0.6, 0.5], piece=None, **settings)
    assert torch.equal(merged.view(torch.int32), eager.view(torch.int32))
