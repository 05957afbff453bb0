"""Each merge formula on small tensors against values computed by hand."""

import math
from dataclasses import replace

import pytest
import torch

from shoal.merge import draws, methods


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def vectors(deltas):
    """Plain task vectors (kept, nothing dropped)."""
    return [methods.TaskVector(d) for d in deltas]


def test_linear_normalises_by_the_sum_of_weights():
    out = methods.linear([t(1.0, 2.0), t(3.0, 6.0)], [1.0, 3.0])
    assert torch.allclose(out, t((1 + 9) / 4, (2 + 18) / 4))


def test_linear_without_normalise_is_the_weighted_sum():
    out = methods.linear([t(1.0, 2.0), t(3.0, 6.0)], [0.5, 2.0], normalize=False)
    assert torch.allclose(out, t(6.5, 13.0))


def test_task_arithmetic_adds_scaled_task_vectors_to_the_base():
    base = t(1.0, 1.0, 1.0)
    deltas = [t(1.0, -2.0, 0.5), t(-1.0, 4.0, 0.5)]
    out = methods.combine_task_vectors(base, vectors(deltas), [0.5, 0.25], consensus=False, normalize=False, lam=2.0)
    # 1 + 2 * (0.5*d1 + 0.25*d2)
    assert torch.allclose(out, t(1 + 2 * (0.5 - 0.25), 1 + 2 * (-1.0 + 1.0), 1 + 2 * (0.25 + 0.125)))


def test_ties_elects_the_sign_of_the_weighted_sum_and_averages_agreeing_entries():
    base = torch.zeros(4)
    deltas = [t(3.0, -1.0, 2.0, 0.0), t(-1.0, -2.0, -5.0, 1.0), t(2.0, 4.0, 0.0, -1.0)]
    out = methods.combine_task_vectors(base, vectors(deltas), [1.0, 1.0, 1.0], consensus=True, normalize=True)
    # column 0: sum=4 (+): agreeing 3, 2 -> mean 2.5; column 1: sum=1 (+): only 4 -> 4
    # column 2: sum=-3 (-): only -5 -> -5; column 3: sum=0 counts as +: only 1 -> 1
    assert torch.allclose(out, t(2.5, 4.0, -5.0, 1.0))


def test_ties_divides_by_the_weights_that_contributed():
    base = t(10.0)
    deltas = [t(2.0), t(-1.0), t(4.0)]
    out = methods.combine_task_vectors(base, vectors(deltas), [0.5, 1.0, 0.25], consensus=True, normalize=True)
    # weighted: 1, -1, 1 -> sum 1 (+); agreeing: 0.5*2 + 0.25*4 = 2 over weights 0.75
    assert torch.allclose(out, t(10 + 2 / 0.75))


def test_magnitude_mask_keeps_the_top_density_fraction():
    delta = t(0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05)
    mask = methods.magnitude_mask(delta, 0.375)  # k = int(3) largest: -5, 2, 1
    assert mask.tolist() == [False, True, False, True, False, False, True, False]
    assert methods.magnitude_mask(delta, 0.01).sum() == 1  # at least one entry survives


def test_dare_mask_is_bernoulli_with_the_given_keep_rate_and_reproducible():
    mask = lambda seed: methods.RandomDraws(torch.Size([200_000]), torch.device("cpu"), 0.3, seed).keep(None)
    m1, m2, m3 = mask(7), mask(7), mask(8)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.3) < 0.005
    assert abs((m1 & m3).float().mean().item() - 0.09) < 0.005  # two seeds' masks independent


def test_dare_draws_of_any_piece_in_any_order_are_the_whole_draw():
    mask = methods.RandomDraws(torch.Size([37, 101]), torch.device("cpu"), 0.4, 5)
    whole = mask.keep(None)
    assert whole.shape == (37, 101)
    pieces = [slice(3000, 4000), slice(17, 1001), slice(0, 17), slice(1001, 3000)]  # 3,737 entries, out of order
    flat = whole.view(-1)
    for piece in pieces:
        assert torch.equal(mask.keep(piece), flat[piece])
    assert mask.keep(slice(3000, 4000)).numel() == 737  # a last piece past the end stops at it


def test_a_tensor_beyond_one_chunk_of_its_device_is_merged_in_chunks():
    assert methods.in_chunks(torch.empty(methods.CHUNK + 1))
    assert not methods.in_chunks(torch.empty(methods.CHUNK))
    assert methods.chunk_size(torch.empty(1, device="meta")) == methods.DEVICE_CHUNK > methods.CHUNK  # not a CPU
    assert not methods.in_chunks(torch.empty(methods.CHUNK + 1, device="meta"))
    assert methods.in_chunks(torch.empty(methods.DEVICE_CHUNK + 1, device="meta"))


def test_a_dropped_vector_formed_in_pieces_is_the_rescaled_product():
    delta = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3000, generator=torch.Generator().manual_seed(2)) < 0.3
    dropped, norm = methods.rescaled(methods.TaskVector(delta, mask=mask))
    whole = delta * mask
    assert torch.equal(dropped.part(), whole * dropped.scale)
    assert abs(dropped.scale.item() / (delta.double().abs().sum() / whole.double().abs().sum()).item() - 1) < 2**-23
    assert torch.equal(torch.cat([dropped.part(slice(s, s + 1000)) for s in (0, 1000, 2000)]), dropped.part())
    assert methods.TaskVector(delta, mask=mask).scale is None
    assert methods.rescaled(methods.TaskVector(torch.zeros(4), mask=torch.ones(4, dtype=torch.bool)))[0].scale is None


def test_a_task_vector_in_chunks_is_formed_from_the_parent_and_base_a_piece_at_a_time():
    generator = torch.Generator().manual_seed(4)
    n = 2 * methods.CHUNK + 999  # two chunks and a remainder
    base = torch.randn(n, generator=generator).bfloat16()
    parent = (base.float() + 0.01 * torch.randn(n, generator=generator)).bfloat16()
    mask = torch.rand(n, generator=generator) < 0.4
    vector, _ = methods.rescaled(methods.TaskVector(parent, base, torch.float32, mask=mask))
    delta = parent.float() - base.float()
    # the rescale's norms are exact sums (merge.norms): the exact ratio, to float32's precision
    exact = delta.double().abs().sum() / (delta.double() * mask).abs().sum()
    assert vector.scale.dtype == torch.float32 and abs(vector.scale.item() / exact.item() - 1) < 1e-6
    assert torch.equal(vector.part(), (delta * mask).mul_(vector.scale))
    assert torch.equal(vector.whole_in(torch.bfloat16), delta.bfloat16())
    # ranks kept below a limit are the trim's mask, compared a piece at a time
    ranks = methods.magnitude_ranks(delta)
    below = methods.rank_limit(ranks, 0.3)
    trimmed = methods.TaskVector(parent, base, torch.float32, mask=ranks, below=below)
    assert torch.equal(trimmed.part(), delta * methods.magnitude_mask(delta, 0.3))
    assert methods.rank_limit(ranks, 1.0) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37,), (9, 301), (3, 5, 7)])
def test_magnitude_places_and_ranks_are_torch_s_stable_sorts_whatever_sorts_them(dtype, shape):
    """On a CPU, 16-bit magnitudes are ordered by numpy's radix sort (methods.stable_order): the places and ranks are
    still those of torch's stable sort, ties (many, from a few distinct values), +-0, inf, NaN and subnormals
    included; descending ranks keep ties in index order too."""
    generator = torch.Generator().manual_seed(len(shape))
    delta = torch.randint(-6, 7, shape, generator=generator).float().mul_(0.25).to(dtype)
    flat = delta.view(-1)
    odd = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, torch.finfo(dtype).tiny / 4, -1e-45]).to(dtype)
    flat[: odd.numel()] = odd
    keys = delta.abs().view(methods.SORT_BITS[dtype])
    rows = keys if keys.dim() >= 2 else keys.unsqueeze(0)
    order = torch.sort(rows, dim=1, stable=True).indices
    places = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).view(
        [1, -1] + [1] * (rows.dim() - 2)).expand(rows.shape).contiguous())
    assert torch.equal(methods.magnitude_places(delta).long(), places.reshape(shape))
    descending = torch.sort(keys.reshape(-1), descending=True, stable=True).indices
    ranks = torch.empty_like(descending).scatter_(0, descending, torch.arange(descending.numel()))
    assert torch.equal(methods.magnitude_ranks(delta).long(), ranks.reshape(shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.9, 0.9999, 1.0])
def test_ties_trim_found_a_chunk_at_a_time_is_the_held_mask(monkeypatch, dtype, density):
    """magnitude_cut's threshold and tie position, applied to each piece of τ, give magnitude_mask's mask of the
    whole τ bit for bit: many magnitudes are tied in 16 bits (parents close to the base), and the ties at the
    threshold go to the lowest indices across chunks of 1,000 entries."""
    monkeypatch.setattr(methods, "CHUNK", 1000)
    generator = torch.Generator().manual_seed(int(density * 1000))
    n = 20 * 1000 + 321
    base = torch.randn(n, generator=generator).to(dtype)
    parent = (base.float() + 0.01 * torch.randint(-3, 4, (n,), generator=generator)).to(dtype)
    vector = methods.TaskVector(parent, base, torch.float32)
    held = methods.magnitude_mask(vector.whole_in(dtype), density)
    cut = methods.magnitude_cut(vector, density, dtype)
    if density == 1.0:
        assert cut is None and bool(held.all())
        return
    trimmed = replace(vector, mask=cut)
    pieces = list(methods.chunks(n, 1000))
    assert torch.equal(torch.cat([trimmed.keep(piece) for piece in pieces]), held)
    assert torch.equal(trimmed.keep(), held)  # the whole tensor at once
    assert torch.equal(torch.cat([trimmed.part(piece) for piece in pieces]), vector.formed() * held)
    assert int(held.sum()) == max(1, int(density * n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps", ["eager", "compiled"])
def test_ties_trim_counted_in_larger_pieces_than_it_is_used_in_is_the_held_mask(monkeypatch, dtype, steps):
    """magnitude_cut counting pieces of 3,000 entries (as a CPU's compiled pass counts pieces of its own chunk's
    size), its magnitudes formed in eager steps or in merge.fused's compiled pass, finds the threshold and the tie
    position of magnitude_mask: the k-th kept entry's piece is found from each piece's count at the threshold, then
    searched alone, wherever in the tensor it lies (the first piece, a middle one, or the last, whose 2,321 entries
    are no whole piece)."""
    from shoal.merge import fused

    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setattr(fused, "_broken", [])
    magnitudes_of = methods.piece_magnitudes if steps == "eager" else fused.piece_magnitudes
    generator = torch.Generator().manual_seed(3)
    n = 10 * 1000 + 1321
    base = torch.randn(n, generator=generator).to(dtype)
    # few magnitudes, so each one is shared by many entries across pieces: ties at the threshold in every piece
    parent = (base.float() + 0.01 * torch.randint(-3, 4, (n,), generator=generator)).to(dtype)
    vector = methods.TaskVector(parent, base, torch.float32)
    # (these densities put it in the first piece, a middle one and the last, in both dtypes)
    for density in (0.02, 0.05, 0.1, 0.16, 0.5, 0.97):
        held = methods.magnitude_mask(vector.whole_in(dtype), density)
        cut = methods.magnitude_cut(vector, density, dtype, magnitudes_of, 3000)
        assert torch.equal(replace(vector, mask=cut).keep(), held), density
        assert int(held.sum()) == max(1, int(density * n))
    assert not fused._broken  # compiled, where asked


@pytest.mark.parametrize("share", [0.01, 0.3])
def test_the_nth_true_entry_is_found_a_row_of_words_at_a_time_from_any_start(share):
    """_nth_true counts a bool tensor's entries a row of 127 int64 words (1,016 entries) at a time: any n of a
    tensor of three rows and a tail, of views that start inside a word, end inside a row or step over entries, few
    or many True, as torch.nonzero finds it."""
    rows = methods._ROW_WORDS * 8
    found = torch.rand(3 * rows + 13, generator=torch.Generator().manual_seed(4)) < share
    found[-2:] = True  # entries in the tail past the last whole row
    for view in (found, found[3:], found[8:2 * rows + 5], found[:rows], found[8::3]):
        places = torch.nonzero(view).view(-1)
        for n in range(1, places.numel() + 1):
            assert methods._nth_true(view, n) == int(places[n - 1]), n
    assert methods._end_of_nth(lambda piece: found[piece], list(methods.chunks(found.numel(), 100)), 7) == \
        int(torch.nonzero(found).view(-1)[6]) + 1


def test_rescale_keeps_the_l1_norm():
    delta = t(1.0, -2.0, 3.0, -4.0)
    mask = torch.tensor([True, False, True, False])
    out = methods.rescaled(methods.TaskVector(delta, mask=mask))[0].part()
    assert torch.allclose(out, t(1.0, 0.0, 3.0, 0.0) * (10 / 4))
    assert torch.allclose(out.abs().sum(), delta.abs().sum())
    assert torch.equal(methods.TaskVector(delta, mask=mask).part(), t(1.0, 0.0, 3.0, 0.0))


def test_breadcrumbs_drops_outliers_and_the_smallest():
    delta = torch.arange(1.0, 11.0)  # magnitudes 1..10
    mask = methods.outlier_mask(delta, density=0.5, gamma=0.2)
    # drop the top 2 (9, 10) and the bottom 10 - 5 - 2 = 3 (1, 2, 3): keep 4..8
    assert delta[mask].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]


def test_della_ranks_magnitudes_within_each_row():
    fractions = methods.magnitude_fractions(torch.tensor([[3.0, -1.0, 2.0], [0.5, -4.0, 1.0]]))
    # row 0: |3| > |2| > |-1| -> places 2, 0, 1 of 0..2; row 1: |0.5| < |1| < |-4| -> 0, 2, 1
    assert fractions.tolist() == [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]
    # a vector is one row; equal magnitudes are ordered by index: 1 (index 2) < 2 (index 0) <= -2 (index 1)
    assert methods.magnitude_fractions(t(2.0, -2.0, 1.0)).tolist() == [0.5, 1.0, 0.0]


def test_della_keeps_larger_magnitudes_more_often():
    fractions = torch.tensor([0.0, 0.5, 1.0]).repeat(40_000, 1)
    kept = methods.magprune_mask(fractions, 0.5, 0.2, 0).float().mean(dim=0)
    # p = density - eps + 2 eps * fraction: 0.3, 0.5, 0.7
    assert torch.allclose(kept, t(0.3, 0.5, 0.7), atol=0.01)
    assert methods.magprune_mask(fractions, 1.0, 0.2, 0).all()


def test_della_keeps_the_entries_whose_draw_is_below_their_probability_across_chunks():
    # several CPU chunks and a remainder: each entry's own draw, wherever the chunks fall
    delta = torch.randn(3, methods.CHUNK + 4321, generator=torch.Generator().manual_seed(1))
    fractions = methods.magnitude_fractions(delta)
    mask = methods.magprune_mask(fractions, 0.4, 0.25, 7)
    expected = draws.uniforms(7, 0, delta.numel()).view(delta.shape) < (0.4 - 0.25) + fractions * 2 * 0.25
    assert torch.equal(mask, expected)
    assert 0.35 < mask.float().mean().item() < 0.45


def test_della_at_the_extreme_epsilon_keeps_exactly_the_larger_entry_and_rescales():
    delta = t(1.0, -3.0)  # fractions 0, 1 -> p = 0.5 - 0.5 + 2 * 0.5 * fraction = 0, 1
    mask = methods.magprune_mask(methods.magnitude_fractions(delta), 0.5, 0.5, 3)
    assert mask.tolist() == [False, True]
    # L1 4 -> kept -3 scaled by 4/3
    assert methods.rescaled(methods.TaskVector(delta, mask=mask))[0].part().tolist() == [0.0, -4.0]


def test_sce_weights_by_mean_square_and_erases_the_minority_sign():
    deltas = [t(2.0, -1.0, 0.5, 0.0), t(4.0, 1.0, -0.5, 0.0)]
    out = methods.sce(torch.zeros(4), deltas, select_topk=1.0)
    # c ∝ mean(τ²): (4 + 1 + 0.25) / 4 = 1.3125 and (16 + 1 + 0.25) / 4 = 4.3125 -> 7/30 and 23/30
    # column 0: both positive -> 2·7/30 + 4·23/30 = 106/30; columns 1, 2: the sum is 0, counted as +, so only the
    # positive entry stays (and is divided by its own coefficient); column 3: no sign, nothing kept -> 0
    assert torch.allclose(out, t(106 / 30, 1.0, 0.5, 0.0))


def test_sce_selects_the_entries_of_largest_variance_first():
    base = t(1.0, 1.0, 1.0, 1.0)
    deltas = [t(2.0, -1.0, 0.5, 0.0), t(4.0, 2.0, -0.5, 0.0)]
    # variances across the two: 1, 2.25, 0.25, 0 -> 3 nonzero
    # k = int(3 · 0.5) = 1: column 1 alone; τ = (0, -1), (0, 2); c = 0.2, 0.8; sum +1 -> only 2 stays
    assert torch.allclose(methods.sce(base, deltas, 0.5), base + t(0.0, 2.0, 0.0, 0.0))
    # k = int(3 · 0.7) = 2: columns 0 and 1; c ∝ (4 + 1) / 4, (16 + 4) / 4 -> 0.2, 0.8
    # column 0: 0.2·2 + 0.8·4 = 3.6; column 1: only 2 stays
    assert torch.allclose(methods.sce(base, deltas, 0.7), base + t(3.6, 2.0, 0.0, 0.0))


def test_ram_averages_only_the_models_that_change_an_entry():
    deltas = [t(1.0, 2.0, 0.0, 0.5, 1e-6), t(3.0, 0.0, 0.0, -0.5, 2.0)]
    # changed by: both, a, none, both, b (1e-6 is below epsilon) -> (1+3)/2, 2, 0, 0, 2
    assert torch.allclose(methods.ram(t(1.0, 1.0, 1.0, 1.0, 1.0), deltas, epsilon=1e-5), t(3.0, 3.0, 1.0, 1.0, 3.0))


def test_ramplus_scales_a_models_own_entries_by_its_shared_to_own_ratio():
    deltas = [t(1.0, 2.0, 4.0, 1.0, 0.5), t(3.0, 0.0, 0.0, 0.0, -0.5)]
    # model a changes 2 shared entries (0, 4) and 3 of its own (1, 2, 3): ρ = 2/3, λ = 1 + 0.3 · 2/3 = 1.2
    out = methods.ram(torch.zeros(5), deltas, epsilon=1e-5, r=0.3, alpha=1.0)
    assert torch.allclose(out, t(2.0, 2.4, 4.8, 1.2, 0.0))
    # alpha caps ρ: λ = 1 + 0.3 · 0.5 = 1.15
    capped = methods.ram(torch.zeros(5), deltas, epsilon=1e-5, r=0.3, alpha=0.5)
    assert torch.allclose(capped, t(2.0, 2.3, 4.6, 1.15, 0.0))


def test_nearswap_moves_by_t_over_the_distance():
    out = methods.nearswap(0.1, t(0.0, 0.0, 0.0, 1.0), t(0.05, 0.5, -2.0, 1.0))
    # distances 0.05, 0.5, 2, 0: weights min(1, 0.1/d) = 1, 0.2, 0.05, 1
    assert torch.allclose(out, t(0.05, 0.1, -0.1, 1.0))


def test_arcee_fusion_keeps_only_the_outlying_changes():
    other = t(0.0, 1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 20.0)
    # one row: importance = |Δ| · KL, KL > 0 the same for all; quartiles at floor(0.25·7, 0.5·7, 0.75·7) = 1, 3, 5
    # of the sorted |Δ|: 1, 3, 5 -> threshold (3 + 1.5 · (5 - 1)) · KL = 9 · KL: only 20 is kept
    assert torch.equal(methods.arcee_fusion(torch.zeros(8), other), t(0, 0, 0, 0, 0, 0, 0, 20.0))
    assert torch.equal(methods.arcee_fusion(other, other), other)  # no change, KL 0: every importance 0 >= 0


def test_slerp_moves_along_the_great_circle():
    v0, v1 = t(1.0, 0.0), t(0.0, 1.0)
    out = methods.slerp(0.5, v0, v1)
    assert torch.allclose(out, t(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)
    assert torch.allclose(methods.slerp(1 / 3, v0, v1), t(math.cos(math.pi / 6), math.sin(math.pi / 6)), atol=1e-6)
    assert torch.allclose(methods.slerp(0.0, v0, v1), v0) and torch.allclose(methods.slerp(1.0, v0, v1), v1, atol=1e-6)


def test_slerp_falls_back_to_linear_for_parallel_tensors():
    v0, v1 = t(1.0, 2.0), t(2.0, 4.0)
    assert torch.allclose(methods.slerp(0.25, v0, v1), 0.75 * v0 + 0.25 * v1)


def test_model_stock_interpolates_with_the_papers_ratio():
    base = t(0.0, 0.0)
    w1, w2 = t(1.0, 0.0), t(0.0, 1.0)  # orthogonal offsets: cos = 0 -> t = 0 -> base
    assert torch.allclose(methods.model_stock(base, [w1, w2]), base)
    w1, w2 = t(1.0, 1.0), t(1.0, 0.0)  # cos = 1/sqrt(2); t = 2c / (1 + c)
    c = 1 / math.sqrt(2)
    ratio = 2 * c / (1 + c)
    assert torch.allclose(methods.model_stock(base, [w1, w2]), ratio * t(1.0, 0.5), atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_mask_count_matches_density_on_distinct_values(density):
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert methods.magnitude_mask(delta, density).sum().item() == int(density * 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 500, 999])
@pytest.mark.parametrize("chunk", [None, 64, 7])
def test_top_mask_equals_a_stable_descending_sort_even_with_ties(dtype, k, chunk, monkeypatch):
    """Ties at the threshold go to the lowest indices, also when they are counted a chunk at a time (chunks of 64
    or 7 entries: the threshold's ~50 ties spread over many)."""
    if chunk is not None:
        monkeypatch.setattr(methods, "CHUNK", chunk)
    values = (torch.randint(0, 20, (1000,), generator=torch.Generator().manual_seed(k)) / 4).to(dtype)
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[torch.sort(values.float(), descending=True, stable=True).indices[:k]] = True
    assert torch.equal(methods.top_mask(values, k), expected)


def test_top_mask_over_a_nan_keeps_what_it_can():
    """kthvalue ranks NaN above every number, so a float32 threshold can have fewer ties than it needs: the ties
    there are all kept (the merge's NaN is then refused with its tensor named), nothing raised."""
    assert methods.top_mask(torch.tensor([float("nan"), 3.0, 2.0, 1.0]), 2).tolist() == [False, True, False, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_top_mask_ranks_a_nan_above_inf_and_keeps_k(dtype):
    """16-bit magnitudes are counted and compared as their bit patterns, where a NaN lies above inf: it is kept
    with the k - 1 largest numbers, by the held mask and by the cut found a chunk at a time alike."""
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0], dtype=dtype)
    assert methods.top_mask(values, 2).tolist() == [False, True, False, True, False]
    vector = methods.TaskVector(values.float(), None)
    cut = methods.magnitude_cut(vector, 0.4, dtype)
    assert cut.keep(values.float(), 0).tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_mask_equals_a_stable_ascending_sort_even_with_ties(dtype):
    delta = ((torch.randint(0, 9, (300,), generator=torch.Generator().manual_seed(1)) - 4) / 8).to(dtype)
    order = torch.sort(delta.abs().float(), stable=True).indices
    n, keep, top = 300, int(0.4 * 300), int(0.1 * 300)
    bottom = n - keep - top
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[bottom : bottom + keep]] = True
    assert torch.equal(methods.outlier_mask(delta, 0.4, 0.1), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_magnitude_keys_sort_in_the_magnitudes_order_ties_and_nan_included(dtype) -> None:
    torch.manual_seed(0)
    delta = torch.randn(64, 300).to(dtype)
    delta[0, :10] = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 2.0, -2.0, 1.0])
    for descending in (False, True):
        by_keys = torch.sort(methods.magnitude_keys(delta), dim=1, descending=descending, stable=True).indices
        by_floats = torch.sort(delta.abs(), dim=1, descending=descending, stable=True).indices
        assert torch.equal(by_keys, by_floats)
