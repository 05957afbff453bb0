"""DARE's and DELLA's draws (merge.draws): the hash its docstring states, the same in numpy and in torch's int64
arithmetic (a CPU and any other device), for any piece; keep masks that are u < density; uniform and independent
enough for a random mask."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from shoal.merge import draws


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
    monkeypatch.setattr(draws, "DEVICE_PIECE", 1000)
    monkeypatch.setattr(draws, "_in_numpy", lambda device: False)
    assert all(torch.equal(draws.kept(8, d, start, count), m) for d, m in zip((0.2, 0.7), expected[0]))
    assert torch.equal(draws.uniforms(8, start, count), expected[1])


def test_a_piece_draws_what_the_whole_draws_there():
    whole = draws.uniforms(3, 0, 10_000)
    for start, stop in ((0, 1), (4096, 4099), (9_000, 10_000), (17, 8_000)):
        assert torch.equal(draws.uniforms(3, start, stop - start), whole[start:stop])


def test_draws_past_two_to_the_32_entries_are_refused():
    with pytest.raises(ValueError, match="2\\^32"):
        draws.kept(1, 0.5, 2**32 - 10, 11)
    assert draws.kept(1, 0.5, 2**32 - 10, 10).numel() == 10


def test_the_draws_are_uniform_and_independent_enough_for_a_random_mask():
    """2^22 draws of one seed: each of the 24 bits a uniform is made of is set half the time, 256 equal bins are
    evenly filled, neighbouring entries (next in a row, next row of a 4096-wide matrix) are uncorrelated, and two
    parents' seeds (made as merge.plan makes them) draw uncorrelated masks. Bounds are six standard errors."""
    n = 1 << 22
    seeds = [zlib.crc32(f"5/model.layers.0.mlp.up_proj.weight/{i}".encode()) for i in (0, 1)]
    h = draws._hashed_numpy(seeds[0], 0, n)
    bits = (h[None, :] >> np.arange(8, 32, dtype=np.uint32)[:, None]) & 1
    assert np.abs(bits.mean(axis=1) - 0.5).max() < 6 * 0.5 / math.sqrt(n)
    counts = np.bincount(h >> 24, minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)
    u = draws.uniforms(seeds[0], 0, n).double()
    v = draws.uniforms(seeds[1], 0, n).double()
    correlation = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    bound = 6 / math.sqrt(n)
    assert abs(correlation(u[1:], u[:-1])) < bound
    assert abs(correlation(u[4096:], u[:-4096])) < bound
    assert abs(correlation(u, v)) < bound
    both = ((u < 0.3) & (v < 0.3)).double().mean().item()
    assert abs(both - 0.09) < 6 * math.sqrt(0.09 * 0.91 / n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_draws_what_a_cpu_draws():
    for density in (0.1, 0.5, 1.0):
        assert torch.equal(draws.kept(11, density, 12345, 1 << 20, "cuda").cpu(), draws.kept(11, density, 12345, 1 << 20))
    assert torch.equal(draws.uniforms(11, 0, 1 << 20, "cuda").cpu(), draws.uniforms(11, 0, 1 << 20))
