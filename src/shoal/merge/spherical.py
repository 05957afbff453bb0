"""Merge formulas that work on the sphere, as pure tensor functions: tensors and numbers in, one tensor out.

- NuSLERP (mergekit's): spherical interpolation of two tensors, either whole or vector by vector along one dim.
- Multi-SLERP (Goddard 2024): barycentric interpolation of any number of tensors, in the tangent space at their
  weighted mean direction, mapped back to the sphere and scaled by their weighted mean norm.
- Karcher mean (Grove & Karcher 1973): the point of the unit sphere nearest, in arc length, to all the tensors'
  directions, found by Riemannian gradient steps, scaled by their mean norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import ShoalError
from shoal.merge.methods import chunk_size, chunks

Tensor = torch.Tensor


def nuslerp(
    t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True, row_wise: bool = False, eps: float = 1e-8
) -> Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), with the norms interpolated as the vectors are.

    flatten: each tensor is one vector. Otherwise each vector runs along the last dim (a matrix's rows), or along
    dim 0 with row_wise (its columns), each pair interpolated on its own. A pair at cos² within eps² of 1
    (parallel or opposite) is interpolated linearly.
    """
    shape = v0.shape
    flatten = flatten or v0.dim() == 0  # a scalar is a vector of one
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    c0, c1 = _coefficients(t, a, b, flatten=flatten, eps=eps)
    if flatten:
        result = torch.mul(a, c0.item()).add_(b, alpha=c1.item())
    else:
        result = torch.mul(a, c0).addcmul_(b, c1)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def _coefficients(t: float, a: Tensor, b: Tensor, *, flatten: bool, eps: float) -> tuple[Tensor, Tensor]:
    """The arc's two coefficients of each pair of vectors along the last dim (flat a and b: one pair), or 1 - t and
    t where the pair is parallel or opposite: reductions only, no tensor-sized temporaries, so the arc and its
    linear fallback are then the same product and fused multiply-add over the data."""
    norms = a.norm(dim=-1, keepdim=True).clamp(min=1e-7) * b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    dot = torch.dot(a, b).reshape(1) if flatten else torch.einsum("...d,...d->...", a, b).unsqueeze(-1)
    cos = (dot / norms).clamp(-1, 1)
    parallel = 1 - cos.square() <= eps**2
    theta = torch.acos(torch.where(parallel, 0.0, cos))
    sin_theta = torch.where(parallel, 1.0, torch.sin(theta))
    c0 = torch.where(parallel, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(parallel, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def nuslerp_flat(
    t: float, v0: Tensor, v1: Tensor, base: Tensor | None = None, *, dtype: torch.dtype, eps: float = 1e-8
) -> Tensor:
    """base + nuslerp(t, v0 - base, v1 - base) of whole tensors (flatten; without base, of v0 and v1), from the
    inputs in their own dtype, computed in `dtype`, with the same values, bit for bit, as upcasting every input
    first. The task vectors are formed a chunk at a time (methods.chunk_size; an input already in `dtype` without a
    base is read as it is), their norms and dot product taken whole as nuslerp takes them, and the result written a
    chunk at a time over the first task vector formed here (else into a new tensor). For 16-bit parents and a base
    that is two float32 temporaries where upcasting first made six."""
    n = v0.numel()
    size = chunk_size(v0)
    flat_base = None if base is None else base.reshape(-1)

    def formed(v: Tensor) -> tuple[Tensor, bool]:
        """v's task vector in dtype, flat, and whether it is a new tensor (not v itself)."""
        flat = v.reshape(-1)
        if flat_base is None:
            return flat.to(dtype), flat.dtype != dtype
        out = torch.empty(n, dtype=dtype, device=v.device)
        for piece in chunks(n, size):
            torch.sub(flat[piece].to(dtype), flat_base[piece].to(dtype), out=out[piece])
        return out, True

    a, own = formed(v0)
    b, _ = formed(v1)
    c0, c1 = (c.item() for c in _coefficients(t, a, b, flatten=True, eps=eps))
    result = a if own else torch.empty_like(a)
    for piece in chunks(n, size):
        part = torch.mul(a[piece], c0, out=result[piece]).add_(b[piece], alpha=c1)
        if flat_base is not None:
            part.add_(flat_base[piece].to(dtype))
    return result.reshape(v0.shape)


def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Barycentric interpolation of the tensors (of their offsets from base, if given) on the sphere.

    Each v_i is flattened and made a unit vector u_i; m = sum_i w_i u_i, normalised, is the tangent point; the
    tangent vectors u_i - (u_i·m) m are averaged with the weights, mapped back by the exponential map and scaled
    by sum_i w_i |v_i|. One tensor is returned as it is; two whose m is zero are averaged linearly.
    """
    if len(tensors) == 1:
        return tensors[0]
    vectors = torch.stack(list(tensors))
    if base is not None:
        vectors -= base
    flat = vectors.reshape(len(tensors), -1)
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(dim=0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ShoalError(
                "multislerp: the weighted mean of the inputs' directions is zero (opposite inputs whose weights "
                "balance out); change the weights"
            )
        result = (vectors[0] * w[0] + vectors[1] * w[1]).reshape(flat.shape[1:])
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
        step = (tangents * w.view(-1, 1)).sum(dim=0)
        length = step.norm() + eps
        result = (mean * torch.cos(length) + step * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
    result = result.reshape(vectors.shape[1:])
    return result if base is None else result + base


def karcher(tensors: Sequence[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The equal-weight Karcher mean of the tensors' directions, scaled by the mean of their norms.

    Directions of norm <= tol take no part in the mean (their norms still count in the scale). Starting from the
    normalised mean of the unit vectors u_i, each step moves along the mean of the log maps
    θ_i / sin θ_i · (u_i - cos θ_i · m) (θ_i the angle from m to u_i; 0 when below tol), for at most max_iter
    steps or until the step is shorter than tol.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [x.norm() for x in tensors]
    directions = [x / n for x, n in zip(tensors, norms) if n > tol]
    if not directions:
        return torch.zeros_like(tensors[0])
    alpha = 1 / len(directions)
    mean = sum(alpha * u for u in directions)
    mean_norm = mean.norm()
    mean = directions[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for u in directions:
            cos = torch.dot(mean.reshape(-1), u.reshape(-1)).clamp(-1, 1)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            step += alpha * (theta / torch.sin(theta)) * (u - cos * mean)
        length = step.norm()
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        mean_norm = mean.norm()
        if mean_norm > tol:
            mean = mean / mean_norm
    return sum(norms) / len(tensors) * mean
