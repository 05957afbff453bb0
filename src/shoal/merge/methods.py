"""Merge formulas as pure tensor functions: tensors and numbers in, one tensor out, no I/O.

Each function follows its paper and mergekit's conventions, so a mergekit recipe gives the same model:
- linear (Wortsman et al. 2022, model soups): sum_i w_i θ_i / sum_i w_i.
- task arithmetic (Ilharco et al. 2023): θ_0 + λ sum_i w_i τ_i, with τ_i = θ_i - θ_0.
- TIES (Yadav et al. 2023): trim each τ_i to its top-density magnitudes, elect a sign per entry
  from the sum of the weighted vectors, keep the entries that agree, average them.
- DARE (Yu et al. 2024): drop entries of τ_i at random with keep-probability = density and rescale
  (mergekit's L1 rescale: the kept entries are scaled so |τ_i|_1 is unchanged).
- Model Breadcrumbs (Davari & Belilovsky 2023): drop the top-gamma fraction of magnitudes (outliers)
  and the smallest, keeping a density fraction.
- SLERP: spherical interpolation of the whole tensor, linear where the two are nearly parallel.
- Model Stock (Jang et al. 2024): interpolate between θ_0 and the average of the fine-tunes with
  t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _stack_weights(weights: Sequence[float], like: Tensor) -> Tensor:
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * like.dim()))


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """Weighted sum of the tensors, divided by the sum of weights when normalize."""
    result = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor, alpha=float(weight))
    if normalize:
        result.div_(float(sum(weights)))
    return result


def _kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of non-negative values, in O(n): a histogram of the bit patterns for 16-bit floats."""
    flat = values.reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        bits = flat.view(torch.int16).to(torch.int32)  # ordered like the values, since all are >= 0
        counts = torch.bincount(bits, minlength=1 << 15)
        from_top = counts.flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, k))
        return torch.tensor((1 << 15) - 1 - position, dtype=torch.int16).view(flat.dtype)
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def _first(mask: Tensor, count: int) -> Tensor:
    """The first `count` True entries of a flat mask, by index."""
    return mask & (mask.cumsum(0) <= count)


def top_mask(values: Tensor, k: int) -> Tensor:
    """Mask of the k largest non-negative values; ties at the threshold go to the lowest indices.

    This is the order of a stable descending sort (and of torch.argsort, which mergekit uses, on
    tensors small enough to be sorted in one thread), found in linear time.
    """
    flat = values.reshape(-1)
    if k >= flat.numel():
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = _kth_largest(flat, k)
    above = flat > threshold
    return (above | _first(flat == threshold, k - int(above.sum()))).reshape(values.shape)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """TIES' trim: mask of the k = max(1, int(density * n)) entries of largest magnitude."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return top_mask(delta.abs(), max(1, int(density * delta.numel())))


def random_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Boolean Bernoulli(density) mask drawn from a seeded generator (DARE's drop step)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    noise = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    return noise < density


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the int(gamma * n) largest magnitudes, then the smallest, keeping int(density * n).

    Ranks are those of a stable ascending sort by magnitude, as mergekit's argsort gives on small tensors.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    # the m smallest under a stable ascending sort are the complement of the n - m largest under a
    # stable descending sort with ties going to the highest indices, i.e. top_mask on the reversed tensor
    magnitude = delta.abs().reshape(-1).flip(0)
    largest_beyond = lambda m: top_mask(magnitude, n - m).flip(0)  # noqa: E731
    return (largest_beyond(bottom) & ~largest_beyond(bottom + keep)).reshape(delta.shape)


def apply_mask(delta: Tensor, mask: Tensor, *, rescale: bool) -> Tensor:
    """Zero the dropped entries; with rescale, scale the rest so the L1 norm is unchanged (mergekit's rule)."""
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES' elect step: mask of entries whose sign agrees with the sign of the column sum (0 counts as +)."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


def combine_task_vectors(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    elect_dtype: torch.dtype | None = None,
) -> Tensor:
    """θ_0 + λ · combine(w_i τ_i): a plain sum, or TIES' disjoint mean over sign-agreeing entries.

    With normalize the sum is divided by the sum of the weights that contributed (per entry under consensus).
    elect_dtype, if given, is the precision of the sign election (mergekit elects in the recipe's dtype;
    in bfloat16 that decides the sign of entries whose weighted sum is near zero).
    """
    w = _stack_weights(weights, base)
    weighted = torch.stack(list(deltas)) * w
    if consensus:
        voters = weighted
        if elect_dtype is not None and elect_dtype != weighted.dtype:
            voters = torch.stack([d.to(elect_dtype) for d in deltas]) * _stack_weights(weights, base).to(elect_dtype)
        mask = sign_consensus(voters)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1) over the whole tensor; linear when nearly parallel."""
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    norm_a = a.norm()
    norm_b = b.norm()
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * v0 + (torch.sin(t * theta) / sin_theta) * v1


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock: t·mean(θ_i) + (1 - t)·θ_0 with t = N cos / (1 + (N - 1) cos); base kept where singular."""
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [w if w.dim() > 1 else w.unsqueeze(0) for w in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)
