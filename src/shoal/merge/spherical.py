"""Merge formulas that work on the sphere, as pure tensor functions: tensors and numbers in, one tensor out.

- NuSLERP (mergekit's): spherical interpolation of two tensors, either whole or vector by vector along one dim.
- Multi-SLERP (Goddard 2024): barycentric interpolation of any number of tensors, in the tangent space at their
  weighted mean direction, mapped back to the sphere and scaled by their weighted mean norm.
- Karcher mean (Grove & Karcher 1973): the point of the unit sphere nearest, in arc length, to all the tensors'
  directions, found by Riemannian gradient steps, scaled by their mean norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shoal.errors import ShoalError
from shoal.merge.methods import chunk_size, chunks

Tensor = torch.Tensor


def nuslerp(
    t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True, row_wise: bool = False, eps: float = 1e-8
) -> Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), with the norms interpolated as the vectors are.

    flatten: each tensor is one vector (nuslerp_flat, in the inputs' common dtype). Otherwise each vector runs
    along the last dim (a matrix's rows), or along dim 0 with row_wise (its columns), each pair interpolated on its
    own. A pair at cos² within eps² of 1 (parallel or opposite) is interpolated linearly.
    """
    if flatten or v0.dim() == 0:  # a scalar is a vector of one
        return nuslerp_flat(t, v0, v1, dtype=torch.promote_types(v0.dtype, v1.dtype), eps=eps)
    a, b = (v0.transpose(0, -1), v1.transpose(0, -1)) if row_wise else (v0, v1)
    norms = a.norm(dim=-1, keepdim=True).clamp(min=1e-7) * b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    c0, c1 = _arc(t, (torch.einsum("...d,...d->...", a, b).unsqueeze(-1) / norms).clamp(-1, 1), eps)
    result = torch.mul(a, c0).addcmul_(b, c1)
    return result.transpose(0, -1) if row_wise else result


def _arc(t: float, cos: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The arc's two coefficients for pairs of vectors at cosine cos (any shape), or 1 - t and t where a pair is
    parallel or opposite, so that the arc and its linear fallback are the same product over the data."""
    parallel = 1 - cos.square() <= eps**2
    theta = torch.acos(torch.where(parallel, 0.0, cos))
    sin_theta = torch.where(parallel, 1.0, torch.sin(theta))
    c0 = torch.where(parallel, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(parallel, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def nuslerp_flat(
    t: float, v0: Tensor, v1: Tensor, base: Tensor | None = None, *, dtype: torch.dtype, eps: float = 1e-8
) -> Tensor:
    """base + nuslerp of the whole tensors v0 - base and v1 - base (without base, of v0 and v1), from the inputs in
    their own dtype, computed in `dtype`: nuslerp_pieces' whole tensor."""
    return nuslerp_pieces(t, v0, v1, base, dtype=dtype, eps=eps)(None)


def nuslerp_pieces(
    t: float, v0: Tensor, v1: Tensor, base: Tensor | None = None, *, dtype: torch.dtype, eps: float = 1e-8
) -> Callable[[slice | None], Tensor]:
    """nuslerp_flat as its angle, found first, and then any piece of the flattened result (None: the whole
    tensor, in its shape), computed in `dtype` from the inputs in their own dtype.

    The angle takes one pass a chunk at a time (methods.chunk_size): each chunk of both task vectors is formed and
    their dot product and squared norms summed (in float64, across chunks). A piece forms its chunk of them again
    and mixes it with the arc's two coefficients. Neither holds a temporary of the tensors' size: the task vectors
    are never held whole, each input is read twice, and a caller that writes the pieces out (engine.merge_into) holds
    no whole result either. Each entry's value depends on that entry and the angle alone, so any pieces give the
    whole tensor's bits."""
    n = v0.numel()
    size = chunk_size(v0)
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    flat_base = None if base is None else base.reshape(-1)

    def vectors(piece: slice) -> tuple[Tensor, Tensor, Tensor | None]:
        """The chunk of both task vectors in dtype, and of the base (None without one)."""
        a, b = flat0[piece].to(dtype), flat1[piece].to(dtype)
        if flat_base is None:
            return a, b, None
        offset = flat_base[piece].to(dtype)
        return a - offset, b - offset, offset

    sums = torch.zeros(3, dtype=torch.float64, device=v0.device)  # a·b, |a|², |b|²
    wide = torch.promote_types(dtype, torch.float32)  # a 16-bit chunk's dot products would overflow past norm 256
    for piece in chunks(n, size):
        a, b, _ = vectors(piece)
        a, b = a.to(wide), b.to(wide)
        sums += torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)]).double()
    norms = sums[1].sqrt().clamp(min=1e-7) * sums[2].sqrt().clamp(min=1e-7)
    c0, c1 = (c.item() for c in _arc(t, (sums[0] / norms).clamp(-1, 1), eps))

    def mixed(piece: slice, out: Tensor | None = None) -> Tensor:
        a, b, offset = vectors(piece)
        part = torch.mul(a, c0, out=out).add_(b, alpha=c1)
        return part if offset is None else part.add_(offset)

    def values_of(piece: slice | None) -> Tensor:
        if piece is not None:
            return mixed(piece)
        result = torch.empty(n, dtype=dtype, device=v0.device)
        for part in chunks(n, size):
            mixed(part, result[part])
        return result.reshape(v0.shape)

    return values_of


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
