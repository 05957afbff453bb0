"""The sphere-based merge formulas (NuSLERP, Multi-SLERP, Karcher mean) on small tensors against values computed by
hand."""

import math

import pytest
import torch

from shoal.errors import ShoalError
from shoal.merge import spherical

H = math.sqrt(0.5)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_nuslerp_of_whole_tensors_follows_the_arc_and_interpolates_the_norms():
    assert torch.allclose(spherical.nuslerp(0.5, t(1.0, 0.0), t(0.0, 1.0)), t(H, H))
    # 90 degrees apart, both of norm 2: sin(45°) / sin(90°) of each
    assert torch.allclose(spherical.nuslerp(0.5, t(2.0, 0.0), t(0.0, 2.0)), t(2 * H, 2 * H))
    assert torch.allclose(spherical.nuslerp(0.25, t(1.0, 2.0), t(2.0, 4.0)), t(1.25, 2.5))  # parallel: linear


def test_nuslerp_by_rows_by_columns_or_whole():
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # rows: (1,0)->(0,1) at 90°; (0,1)->(1,1) at 45°, coefficients sin(22.5°) / sin(45°) = 0.541196 on both
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    rows = spherical.nuslerp(0.5, v0, v1, flatten=False)
    assert torch.allclose(rows, torch.tensor([[H, H], [c, 2 * c]]), atol=1e-6)
    # columns: (1,0)->(0,1) and (0,1)->(1,1), the same pairs, written down the columns
    columns = spherical.nuslerp(0.5, v0, v1, flatten=False, row_wise=True)
    assert torch.allclose(columns, torch.tensor([[H, c], [H, 2 * c]]), atol=1e-6)
    # whole: (1,0,0,1) and (0,1,1,1): cos = 1 / (sqrt 2 · sqrt 3), one angle for all four entries
    theta = math.acos(1 / math.sqrt(6))
    k = math.sin(theta / 2) / math.sin(theta)
    whole = spherical.nuslerp(0.5, v0, v1)
    assert torch.allclose(whole, k * torch.tensor([[1.0, 1.0], [1.0, 2.0]]), atol=1e-6)


def test_nuslerp_of_scalars_is_linear_whether_or_not_flattened():
    # a scalar is a vector of one: two scalars of one sign are parallel, so interpolated linearly (mergekit: 2.3)
    for flatten in (True, False):
        merged = spherical.nuslerp(0.3, torch.tensor(2.0), torch.tensor(3.0), flatten=flatten)
        assert merged.shape == () and torch.allclose(merged, torch.tensor(2.3))


def test_multislerp_is_the_weighted_mean_direction_scaled_by_the_weighted_mean_norm():
    # weights 3, 1 -> 0.75, 0.25; directions (1,0), (0,1): mean (0.75, 0.25) -> (3, 1) / sqrt(10); the tangent
    # vectors at that point average to zero; scale 0.75 · 2 + 0.25 · 4 = 2.5
    out = spherical.multislerp([t(2.0, 0.0), t(0.0, 4.0)], [3.0, 1.0])
    assert torch.allclose(out, 2.5 * t(3.0, 1.0) / math.sqrt(10), atol=1e-6)
    based = spherical.multislerp([t(3.0, 1.0), t(1.0, 5.0)], [3.0, 1.0], base=t(1.0, 1.0))  # offsets as above
    assert torch.allclose(based, t(1.0, 1.0) + 2.5 * t(3.0, 1.0) / math.sqrt(10), atol=1e-6)
    assert torch.equal(spherical.multislerp([t(5.0, 6.0)], [0.2]), t(5.0, 6.0))


def test_multislerp_of_opposite_inputs_is_linear_for_two_and_refused_for_more():
    assert torch.allclose(spherical.multislerp([t(1.0, 0.0), t(-1.0, 0.0)], [1.0, 1.0]), t(0.0, 0.0))
    with pytest.raises(ShoalError, match="weighted mean of the inputs' directions is zero"):
        spherical.multislerp([t(1.0, 0.0), t(-1.0, 0.0), t(2.0, 0.0), t(-2.0, 0.0)], [1.0, 1.0, 1.0, 1.0])


def test_karcher_mean_of_angles_on_a_circle():
    # directions at 0°, 0°, 90°: the arc-length mean is 30° (the Euclidean mean would be atan(1/2) = 26.6°);
    # norms 1, 3, 2 -> scale 2
    out = spherical.karcher([t(1.0, 0.0), t(3.0, 0.0), t(0.0, 2.0)])
    assert torch.allclose(out, 2 * t(math.cos(math.pi / 6), 0.5), atol=1e-5)
    assert torch.allclose(spherical.karcher([t(2.0, 0.0), t(0.0, 4.0)]), 3 * t(H, H), atol=1e-6)


def test_karcher_leaves_zero_tensors_out_of_the_direction_but_not_the_scale():
    assert torch.allclose(spherical.karcher([t(0.0, 0.0), t(1.0, 0.0)]), t(0.5, 0.0))
    assert torch.equal(spherical.karcher([t(0.0, 0.0), t(0.0, 0.0)]), t(0.0, 0.0))
    # no step at all: the start, the normalised mean of the directions
    assert torch.allclose(spherical.karcher([t(1.0, 0.0), t(1.0, 0.0), t(0.0, 1.0)], max_iter=0),
                          t(2.0, 1.0) / math.sqrt(5), atol=1e-6)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("own,work", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                      (torch.float32, torch.float64)])
@pytest.mark.parametrize("shape", [(37, 101), ()])  # 3,737 entries: three chunks of 1,000 and a short one; a scalar
def test_nuslerp_of_whole_tensors_in_chunks_is_bit_equal_to_upcasting_first(monkeypatch, with_base, own, work, shape):
    from shoal.merge import methods

    monkeypatch.setattr(methods, "CHUNK", 1000)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g).to(own)
    v0, v1 = ((base.double() + 0.1 * torch.randn(shape, generator=g)).to(own) for _ in range(2))
    wide = [x.to(work) for x in (base, v0, v1)]
    before = v0.clone()
    if with_base:
        expected = spherical.nuslerp(0.3, wide[1] - wide[0], wide[2] - wide[0]).add_(wide[0])
    else:
        expected = spherical.nuslerp(0.3, wide[1], wide[2])
    got = spherical.nuslerp_flat(0.3, v0, v1, base if with_base else None, dtype=work)
    assert got.dtype == work and got.shape == shape and torch.equal(got, expected)
    assert torch.equal(v0, before)  # the inputs are read, never written
    # the arc by hand, in float64: the chunks' sums of products give the whole tensors' angle
    a, b = ((x.double() - base.double()) if with_base else x.double() for x in (v0, v1))
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()
    if abs(cos) > 1 - 1e-12:  # a scalar is a vector of one: parallel or opposite, so linear
        by_hand = 0.7 * a + 0.3 * b
    else:
        theta = math.acos(cos)
        by_hand = (math.sin(0.7 * theta) * a + math.sin(0.3 * theta) * b) / math.sin(theta)
    by_hand = by_hand + base.double() if with_base else by_hand
    scale = by_hand.abs().max().item()
    assert (got.double() - by_hand).abs().max().item() <= (1e-6 if work == torch.float32 else 1e-14) * scale


def test_nuslerp_of_float16_tensors_past_norm_256_takes_their_angle_in_float32():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(10_000, generator=g)
    b = 0.5 * a + math.sqrt(0.75) * torch.randn(10_000, generator=g)
    a, b = (300 * x / x.norm() for x in (a, b))  # |a|² = 90,000 overflows float16 (max 65,504)
    merged = spherical.nuslerp(0.5, a.half(), b.half())
    by_hand = spherical.nuslerp(0.5, a.half().double(), b.half().double())
    assert merged.dtype == torch.float16  # within float16's own rounding of the arc taken in float64
    assert (merged.double() - by_hand).abs().max() <= 2e-3 * by_hand.abs().max()


def test_nuslerp_of_parallel_whole_tensors_is_linear():
    v = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(spherical.nuslerp_flat(0.25, v, 2 * v, dtype=torch.float32), 1.25 * v)


def test_the_nuslerp_method_takes_whole_tensors_unless_told_rows_or_columns():
    from shoal.merge.registry import METHODS, MergeCall

    g = torch.Generator().manual_seed(5)
    base, v0, v1 = (torch.randn(64, 48, generator=g) for _ in range(3))
    def merged(**shared) -> torch.Tensor:
        call = MergeCall(base=base, tensors=[v0, v1], per_model=[{"weight": 1.0}, {"weight": 3.0}],
                         shared={**METHODS["nuslerp"].shared, **shared}, work_dtype=torch.float32,
                         compute_dtype=torch.float32)
        return METHODS["nuslerp"].merge(call)
    assert torch.equal(merged(), spherical.nuslerp(0.75, v0 - base, v1 - base).add_(base))
    rows = spherical.nuslerp(0.75, v0 - base, v1 - base, flatten=False).add_(base)
    assert torch.equal(merged(nuslerp_flatten=False), rows) and not torch.equal(rows, merged())
