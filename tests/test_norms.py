"""The L1 rescale's norms (merge.norms): the definition written out in Python integers, the same in any chunking,
compiled or eager, held or drawn, found again or known."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from shoal.merge import draws, fused, methods, norms

N = 3 * norms.BLOCK + 1234  # three whole blocks and a short last one


def task_vector(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """τ with a block of its own scale, an outlier among tiny entries, zeros and subnormals."""
    generator = torch.Generator().manual_seed(5)
    delta = (0.01 * torch.randn(N, generator=generator, dtype=torch.float64)).to(dtype)
    delta[norms.BLOCK:2 * norms.BLOCK] *= 1e-30  # a block 2^-100 below the others (k at its limit, 126)
    delta[norms.BLOCK + 5] = 2**-127  # a subnormal float32 there: 0 (< 1 at 2^126), flushed or not
    second = slice(2 * norms.BLOCK, 3 * norms.BLOCK)
    delta[second] = 1e-9
    delta[2 * norms.BLOCK + 7] = -3.0  # the block's largest, 2^31 times its other entries
    delta[3 * norms.BLOCK:3 * norms.BLOCK + 100] = 0.0
    delta[3 * norms.BLOCK + 100:3 * norms.BLOCK + 110] = torch.finfo(torch.float32).tiny / 4  # subnormal in float32
    return delta


def written_out(delta: torch.Tensor, keep: torch.Tensor) -> tuple[Fraction, Fraction]:
    """|τ|_1 and |τ · keep|_1 as merge.norms defines them: in each block q = floor(|x| · 2^k), k = min(37 - e, 126)
    where the block's largest magnitude is below 2^e (a float32's e at least -125, a float64's at least -1021)."""
    lowest = -125 if delta.dtype == torch.float32 else -1021
    values, kept = delta.abs().double().tolist(), keep.tolist()
    before = after = Fraction(0)
    for start in range(0, len(values), norms.BLOCK):
        block = values[start:start + norms.BLOCK]
        e = max(math.frexp(max(block))[1], lowest) if max(block) > 0 else lowest
        k = min(37 - e, 126)
        for x, kept_x in zip(block, kept[start:start + norms.BLOCK]):
            q = Fraction(math.floor(Fraction(x) * 2**k), 2**k)
            before += q
            after += q if kept_x else 0
    return before, after


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_scale_is_the_ratio_of_the_norms_as_defined_rounded_once(dtype):
    delta = task_vector(dtype)
    mask = methods.RandomDraws(delta.shape, delta.device, 0.3, 17)
    vector, norm = methods.rescaled(methods.TaskVector(delta, compute=dtype, mask=mask.keep(None)))
    before, after = written_out(delta, mask.keep(None))
    assert Fraction(norm.total, 2**norm.top) == before
    assert vector.scale.dtype == dtype and vector.scale.item() == float(np.array(float(before / after), dtype=(
        np.float32 if dtype == torch.float32 else np.float64)))
    # within 2^-20 of the true norms (the block of an outlier among tiny entries is the worst case)
    true = sum(Fraction(x) for x in delta.abs().double().tolist())
    assert abs(before / true - 1) < 2**-20


def test_the_norms_are_the_same_in_any_chunking_compiled_or_eager_held_or_drawn(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(N, generator=generator).bfloat16()
    parent = (base.float() + 0.01 * torch.randn(N, generator=generator)).bfloat16()
    mask = methods.RandomDraws(base.shape, base.device, 0.45, 23)
    found = set()
    for chunk in (1000, norms.BLOCK, 2 * norms.BLOCK, 1 << 22):
        monkeypatch.setattr(methods, "CHUNK", chunk)
        for held in (mask.keep(None), mask):
            vector = methods.TaskVector(parent, base, mask=held)
            for norms_of in (methods.piece_norms, fused.piece_norms):
                rescaled, norm = methods.rescaled(vector, norms_of)
                found.add((norm.total, norm.top, rescaled.scale.item()))
    assert len(found) == 1
    assert not fused._broken


def test_a_known_norm_gives_the_same_scale_finding_only_the_kept_sums(monkeypatch):
    """A search keeps |τ|_1 (its exponents and total) from its first merge: a later merge of the same τ with
    another mask finds |τ · keep|_1 alone, and scales as a fresh merge does (a piece of one block at a time)."""
    monkeypatch.setattr(methods, "CHUNK", norms.BLOCK)
    delta = task_vector()
    masks = [torch.rand(N, generator=torch.Generator().manual_seed(s)) < d for s, d in ((4, 0.3), (5, 0.8))]
    fresh = [methods.rescaled(methods.TaskVector(delta, mask=mask)) for mask in masks]
    norm = fresh[0][1]
    monkeypatch.setattr(norms, "block_exponents", lambda magnitude: pytest.fail("exponents found again"))
    for mask, (expected, _) in zip(masks, fresh):
        known, again = methods.rescaled(methods.TaskVector(delta, mask=mask), known=norm)
        assert again is norm and torch.equal(known.scale, expected.scale)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("bins_of", [methods.piece_bins, fused.piece_bins])
def test_a_table_of_the_draws_gives_each_density_on_the_grid_the_pass_s_norms(monkeypatch, bins_of, blocks):
    """A search's DARE reads |τ · keep|_1 at any density on the draws' grid from one table of its seed's draws
    (norms.Drawn): the definition written out and the pass's scale at each, |τ|_1 over every bin; summed once a
    seed (in pieces of one block or three at different ks, and the tensor's short last block), again for another
    seed."""
    torch._dynamo.reset()
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_unwrapped", [])
    delta = task_vector()  # blocks at four ks (shifts from the largest: 0, 84, 85, 91)
    calls = []
    counted = lambda vector, seed, piece, exponents: calls.append(seed) or bins_of(vector, seed, piece, exponents)
    norm = None
    for seed, step in ((17, 307), (17, 1), (17, 512), (17, 1023), (4, 307)):
        mask = methods.RandomDraws(delta.shape, delta.device, step / 1024, seed)
        expected, found = methods.rescaled(methods.TaskVector(delta, mask=mask.keep(None)))
        tabled, norm = methods.rescaled(methods.TaskVector(delta, mask=mask), known=norm,
                                        table=methods.Tabulated(mask, counted, blocks * norms.BLOCK))
        assert torch.equal(tabled.scale, expected.scale) and (norm.total, norm.top) == (found.total, found.top)
        before, after = written_out(delta, mask.keep(None))
        assert Fraction(norm.drawn.kept(step), 2**norm.top) == after
        assert norm.drawn.kept(1 << draws.GRID_BITS) == norm.total and len(norm.drawn.tally.parts) == 4
    assert calls == ([17] * 4 + [4] * 4 if blocks == 1 else [17, 17, 4, 4])
    assert not fused._broken


def test_a_task_vector_that_is_not_finite_is_left_unscaled():
    delta = task_vector()
    delta[10] = float("inf")
    mask = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.5
    vector, norm = methods.rescaled(methods.TaskVector(delta, mask=mask))
    assert vector.scale is None and norm is None
    drawn = methods.RandomDraws(delta.shape, delta.device, 0.5, 3)  # nor from a table of its draws
    table = methods.Tabulated(drawn, methods.piece_bins, norms.BLOCK)
    assert methods.rescaled(methods.TaskVector(delta, mask=drawn), table=table)[1] is None
    delta[10] = float("nan")
    assert methods.rescaled(methods.TaskVector(delta.double(), compute=torch.float64, mask=mask))[0].scale is None


def test_an_empty_tensor_and_a_zero_task_vector_are_left_unscaled():
    empty = methods.TaskVector(torch.zeros(0), mask=torch.zeros(0, dtype=torch.bool))
    assert methods.rescaled(empty) == (empty, None)
    zeros, norm = methods.rescaled(methods.TaskVector(torch.zeros(N), mask=torch.ones(N, dtype=torch.bool)))
    assert zeros.scale is None and norm.total == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_a_gpu_finds_the_cpus_norms_and_scale(monkeypatch):
    """On a GPU a tensor is one chunk of 2^24 entries, its draws made in int64 torch steps and its sums in one
    reduction: the same integers and scale as a CPU's pieces of one block."""
    monkeypatch.setattr(methods, "CHUNK", norms.BLOCK)
    delta = task_vector()
    found = {}
    for device in ("cpu", "cuda"):
        mask = methods.RandomDraws(delta.shape, torch.device(device), 0.35, 41)
        vector, norm = methods.rescaled(methods.TaskVector(delta.to(device), mask=mask))
        after = methods.rescaled(methods.TaskVector(delta.to(device), mask=mask), known=norm)[0]
        drawn = methods.RandomDraws(delta.shape, torch.device(device), 358 / 1024, 41)  # 0.35 is off the grid
        tabled, with_table = methods.rescaled(methods.TaskVector(delta.to(device), mask=drawn),
                                              table=methods.Tabulated(drawn, methods.piece_bins, norms.BLOCK))
        assert after.scale.item() == vector.scale.item() and with_table.drawn.kept(1024) == norm.total
        found[f"{device} table"] = (sorted(with_table.drawn.tally.parts), with_table.drawn.kept(358),
                                    tabled.scale.item())
        found[device] = (norm.total, norm.top, vector.scale.item())
    assert found["cpu"] == found["cuda"] and found["cpu table"] == found["cuda table"]
