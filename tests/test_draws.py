"""DARE's and DELLA's draws (merge.draws): the hash its docstring states, the same in numpy and in torch's int64
arithmetic (a CPU and any other device), for any piece; keep masks that are u < density; uniform and independent
enough for a random mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shoal.merge import draws
from shoal.merge.plan import _seed


def reference(seed: int, start: int, count: int) -> list[int]:
    """h of each entry, written out from the docstring's formula in Python integers."""
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) % 2**32
        x ^= x >> 15
        x = (x * 0x735A2D97) % 2**32
        return x ^ (x >> 15)

    key = mix(seed % 2**32)
    return [mix((i + key) % 2**32) for i in range(start, start + count)]


@pytest.mark.parametrize("seed,start", [(0, 0), (9, 12345), (2**32 - 1, 2**32 - 300), (2**40 + 7, 5)])
def test_numpy_and_torch_hash_each_entry_as_the_formula_says(seed, start):
    count = 300
    expected = reference(seed, start, count)
    assert draws._hashed_numpy(seed, start, count).astype(np.int64).tolist() == expected
    index = torch.arange(start, start + count, dtype=torch.int64)
    assert draws.hashed(index, draws.offset(seed)).tolist() == expected
    # as the compiled pass takes the offset: a 0-dim int64 tensor
    assert draws.hashed(index, torch.tensor(draws.offset(seed))).tolist() == expected


def _wrapping_at(entry: int, seed: int = 3) -> tuple[int, int]:
    """A seed and a start for which entry `entry` is the first whose int32 index sum wraps to negative:
    (start + the seed's offset) mod 2^32 + entry reaches 2^31."""
    return seed, (2**31 - entry - draws.offset(seed)) % 2**32


@pytest.mark.parametrize("seed,start", [(0, 0), (9, 12345), (2**32 - 1, 2**32 - 300), (2**40 + 7, 5),
                                        _wrapping_at(5), _wrapping_at(295)])
@pytest.mark.parametrize("form", ["eager", "compiled", "compiled, scalar tail"])
def test_the_int32_hash_a_compiled_pass_draws_in_holds_the_formula_s_bits(seed, start, form):
    """hashed_int32 forms the indices in int32 (wrapping past 2^31 and 2^32), wraps its products and masks its
    shifts: the same 32 bits as the formula, eager and compiled (300 entries: vector lanes and a tail of 4, which
    Inductor's C++ runs in masked vector lanes, or as scalar C++ with its cpp.enable_loop_tail_vec off; the index
    wrapping in each), and top_bits reads them as h >> (32 - bits)."""
    count = 300
    expected = reference(seed, start, count)
    hashed = draws.hashed_int32 if form == "eager" else torch.compile(
        draws.hashed_int32, dynamic=False, options={"cpp.enable_loop_tail_vec": form == "compiled"})
    bits = hashed(count, torch.tensor(start), torch.tensor(draws.offset(seed)))
    assert bits.dtype == torch.int32
    assert (bits.to(torch.int64) & 0xFFFFFFFF).tolist() == expected
    for width in (24, draws.GRID_BITS):
        assert draws.top_bits(bits, width).tolist() == [h >> (32 - width) for h in expected]


@pytest.mark.parametrize("density", [1e-9, 0.01, 0.3, 0.5, 0.9999, 1 - 2**-26, 1.0, 1.5])
def test_an_entry_is_kept_where_its_uniform_is_below_the_density_in_float32(density):
    seed, start, count = 77, 1000, 1 << 16
    uniform = draws.uniforms(seed, start, count)
    assert uniform.dtype == torch.float32 and 0 <= uniform.min() and uniform.max() < 1
    expected = uniform < torch.tensor(density, dtype=torch.float32)
    assert torch.equal(draws.kept(seed, density, start, count), expected)
    # the other devices' form: the int64 hash below the threshold
    index = torch.arange(start, start + count, dtype=torch.int64)
    assert torch.equal(draws.hashed(index, draws.offset(seed)) < draws.threshold(density), expected)


def test_torch_draws_as_off_a_cpu_are_numpy_draws(monkeypatch):
    """Off a CPU the draws are made in torch's int64 arithmetic, DEVICE_PIECE entries at a time: run so on this CPU
    (pieces of 1,000 entries), they are the numpy draws."""
    start, count = 2**32 - 5_500, 5_432
    expected = [draws.kept(8, density, start, count) for density in (0.2, 0.7)], draws.uniforms(8, start, count)
    bins = draws.bins(8, start, count)  # the top bits a search's table of DARE's norms sums by
    assert bins.tolist() == [h >> (32 - draws.GRID_BITS) for h in reference(8, start, count)]
    monkeypatch.setattr(draws, "DEVICE_PIECE", 1000)
    monkeypatch.setattr(draws, "_in_numpy", lambda device: False)
    assert all(torch.equal(draws.kept(8, d, start, count), m) for d, m in zip((0.2, 0.7), expected[0]))
    assert torch.equal(draws.uniforms(8, start, count), expected[1]) and torch.equal(draws.bins(8, start, count), bins)


def test_a_piece_draws_what_the_whole_draws_there():
    whole = draws.uniforms(3, 0, 10_000)
    for start, stop in ((0, 1), (4096, 4099), (9_000, 10_000), (17, 8_000)):
        assert torch.equal(draws.uniforms(3, start, stop - start), whole[start:stop])


def test_draws_past_two_to_the_32_entries_are_refused():
    with pytest.raises(ValueError, match="2\\^32"):
        draws.kept(1, 0.5, 2**32 - 10, 11)
    assert draws.kept(1, 0.5, 2**32 - 10, 10).numel() == 10


def test_the_threshold_is_where_the_uniforms_pass_the_density():
    for density in (1e-9, 0.3, 0.5, 0.9999, 1 - 2**-26):
        top = draws.threshold(density) >> 8  # the first uniform, in units of 2^-24, not below float32(density)
        d = float(np.float32(density))
        assert (top - 1) / 2**24 < d <= top / 2**24


@pytest.mark.parametrize("density,step,nearest", [
    (1 / 1024, 1, 1 / 1024), (0.5, 512, 0.5), (307 / 1024, 307, 307 / 1024), (1023 / 1024, 1023, 1023 / 1024),
    (0.3, None, 307 / 1024), (1.0, None, 1.0), (1 / 2048, None, 1 / 1024), (0.0001, None, 1 / 1024),
    (0.9996, None, 1.0), (0.49023437499999994, 502, 502 / 1024),  # a gradient's interpolation, 502/1024 in float32
])
def test_a_density_on_the_grid_keeps_the_entries_whose_top_bits_are_below_its_step(density, step, nearest):
    assert draws.grid_step(density) == step and draws.on_grid(density) == nearest
    if step is not None:
        top = torch.tensor(reference(5, 1000, 4096)) >> (32 - draws.GRID_BITS)
        assert torch.equal(draws.kept(5, density, 1000, 4096), top < step)


def test_the_draws_are_uniform_and_independent_enough_for_a_random_mask():
    """2^22 draws of one seed: each of the 24 bits a uniform is made of is set half the time, 256 equal bins are
    evenly filled, neighbouring entries (1-16 apart in a row, a row of a 4096-wide matrix apart) are uncorrelated.
    Bounds are six standard errors."""
    n = 1 << 22
    h = draws._hashed_numpy(_seed(5, "model.layers.0.mlp.up_proj.weight", 0), 0, n)
    for bit in range(8, 32):
        assert abs(((h >> np.uint32(bit)) & 1).mean() - 0.5) < 6 * 0.5 / math.sqrt(n), bit
    counts = np.bincount(h >> np.uint32(24), minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)
    u = torch.from_numpy((h >> np.uint32(8)).astype(np.float64))
    correlation = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    for lag in [*range(1, 17), 4096]:
        assert abs(correlation(u[lag:], u[:-lag])) < 6 / math.sqrt(n), lag


def test_the_parents_masks_of_a_tensor_are_independent():
    """Two parents' draws of a tensor are one hash at two offsets (their seeds'); at the same entry they must be
    independent whatever the offsets' difference: for 200 pairs of seeds as merge.plan makes them (recipe seed,
    tensor, parent), 2^14 entries each, both kept at density 0.3 as often as 0.09 of the time, pair by pair and
    over all. Bounds are six standard errors (pair by pair: 4.5 sigma)."""
    n, density = 1 << 14, 0.3
    both = []
    for k in range(200):
        first, second = (_seed(k, f"model.layers.{k % 7}.self_attn.q_proj.weight", i) for i in (0, 1))
        joint = (draws.kept(first, density, 0, n) & draws.kept(second, density, 0, n)).double().mean().item()
        assert abs(joint - density**2) < 4.5 * math.sqrt(density**2 * (1 - density**2) / n), k
        both.append(joint)
    assert abs(sum(both) / len(both) - density**2) < 6 * math.sqrt(density**2 * (1 - density**2) / (n * 200))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_draws_what_a_cpu_draws():
    for density in (0.1, 0.5, 1.0):
        on_gpu = draws.kept(11, density, 12345, 1 << 20, "cuda").cpu()
        assert torch.equal(on_gpu, draws.kept(11, density, 12345, 1 << 20))
    assert torch.equal(draws.uniforms(11, 0, 1 << 20, "cuda").cpu(), draws.uniforms(11, 0, 1 << 20))
