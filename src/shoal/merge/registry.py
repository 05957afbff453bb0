"""The merge methods shoal knows, by name: their parameters, defaults, inputs, and how each is called."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from shoal.errors import ShoalError
from shoal.merge import draws, fused, methods, norms, spherical
from shoal.merge.norms import Norm

REQUIRED: Any = object()


@dataclass
class MergeCall:
    """One tensor's inputs: the base (if the method uses one), the other inputs, and resolved parameters.

    Inputs come in the recipe's dtype; methods compute in compute_dtype (float32, or float64 for float64 inputs).
    """

    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]
    work_dtype: torch.dtype
    seeds: list[int] = field(default_factory=list)
    """Each input's seed for a random method's draws (merge.draws), made from the recipe's seed and the tensor."""
    compute_dtype: torch.dtype = torch.float32
    scratch: torch.Tensor | None = None
    """A compute_dtype buffer of the inputs' shape that a method may write its result into."""
    deltas: list[torch.Tensor] | None = None
    """Task vectors tensor_i - base in compute_dtype, when already formed (the resident merger keeps them)."""
    ranks: list[torch.Tensor] | None = None
    """Each task vector's magnitude ranks, when precomputed: methods.magnitude_ranks for TIES (its trim is then a
    lookup), methods.magnitude_places for DELLA."""
    norms: list[Norm | None] | None = None
    """Each task vector's |τ|_1 for the L1 rescale, where known (merge.norms); a None is filled in when found: the
    resident merger keeps them between trials, as they depend on the task vector alone, and for DARE at a density on
    the draws' grid with them a table of |τ · keep|_1 under the draws' seed (norms.Drawn), so that a search's later
    trials read it."""
    fused: bool = False
    """A task-vector method's pieces are merged in one compiled pass (merge.fused), not in eager steps, when the
    compute dtype is float32 (`compiled`)."""

    @property
    def rank_dtype(self) -> torch.dtype:
        """Precision in which magnitudes are ranked and signs elected: the recipe's dtype, so that TIES and
        breadcrumbs keep the same entries as mergekit, which forms task vectors in that dtype."""
        return self.work_dtype

    @property
    def compiled(self) -> bool:
        """Whether the task vectors' rescale and merge take merge.fused's compiled passes (not after a compile
        failed in this process: the eager steps are the faster way to the same values then)."""
        first = self.base if self.base is not None else self.tensors[0]
        return self.fused and self.compute_dtype == torch.float32 and fused.enabled(first.device)

    def upcast(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base = self.base.to(self.compute_dtype) if self.base is not None else None
        return base, [t.to(self.compute_dtype) for t in self.tensors]


Pieces = Callable[[slice | None], torch.Tensor]
"""A tensor's merged values (compute dtype), whole (None) or of a piece of its flattened entries."""


BasePolicy = Literal["required", "optional", "ignored", "included"]
"""What the recipe's base_model is to a method (mergekit's input contracts): required, or optional (either way the
base, named apart from the other inputs); ignored (unless listed as a model); or included: one more input, added
to the models when they do not list it (mergekit's rule for methods that ignore the base, as karcher)."""

Sparsify = Literal["magnitude", "random", "outliers", "magprune"] | None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[[MergeCall], torch.Tensor]
    per_model: Mapping[str, Any]
    shared: Mapping[str, Any]
    base: BasePolicy
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    sparsify: Sparsify = None
    task_vectors: bool = False
    """The method works on task vectors tensor_i - base (MergeCall.deltas may supply them)."""
    elementwise: bool = False
    """Each output element depends only on the inputs' same element, so the merge may run chunk by chunk."""
    pieces: Callable[[MergeCall], Pieces] | None = None
    """The merge as a preparation over the whole tensor (a task vector's mask and rescale; nuslerp's angle), then any
    piece of it merged alone: a large tensor is merged and written a chunk at a time (merge is pieces(call)(None))."""

    @property
    def parameters(self) -> set[str]:
        return set(self.per_model) | set(self.shared)

    def kind(self, name: str) -> Kind:
        """What a value of parameter `name` must be: a switch (its default is a bool), else a finite number in
        the range RANGES gives (any number if none)."""
        default = {**self.per_model, **self.shared}[name]
        return "bool" if isinstance(default, bool) else "number"


Kind = Literal["bool", "number"]

RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "density": (lambda v: 0 < v <= 1, "(0, 1]"),
    "gamma": (lambda v: 0 <= v < 1, "[0, 1)"),
    "select_topk": (lambda v: 0 < v <= 1, "(0, 1]"),
    "max_iter": (lambda v: v >= 0 and float(v).is_integer(), "{0, 1, 2, ...}"),
    "t": (lambda v: 0 <= v <= 1, "[0, 1]"),
}
"""Parameters whose numbers have a meaning only in a range: the test, and the range as errors state it."""


def _drawable(tensor: torch.Tensor) -> torch.Tensor:
    """tensor, when a random drop step can draw for each of its entries (merge.draws: at most 2^32 of them)."""
    if tensor.numel() > draws.LIMIT:
        raise ShoalError(f"{tensor.numel():,} entries: a random drop step (DARE, DELLA) draws for at most 2^32 "
                         "entries of a tensor; use a method without one (ties, task_arithmetic)")
    return tensor


def _task_vector(call: MergeCall, i: int, sparsify: Sparsify) -> methods.TaskVector:
    """Task vector i of a call, with its drop step (mask and rescale) decided; formed where it is used."""
    assert call.base is not None
    if call.deltas is not None:
        vector = methods.TaskVector(call.deltas[i], compute=call.compute_dtype)
    else:
        vector = methods.TaskVector(call.tensors[i], call.base, call.compute_dtype)
    params = call.per_model[i]
    below = drawn = None
    if sparsify == "magnitude" and call.ranks is not None:  # the stored ranks, compared a piece at a time
        below = methods.rank_limit(call.ranks[i], params["density"])
        if below is None:  # all kept: a rescale would be by 1
            return vector
        mask = call.ranks[i]
    elif sparsify == "magnitude" and methods.cuts(vector.tensor, call.rank_dtype, call.compiled):
        magnitudes_of = fused.piece_magnitudes if call.compiled else methods.piece_magnitudes
        mask = methods.magnitude_cut(vector, params["density"], call.rank_dtype, magnitudes_of,
                                     methods.chunk_size(vector.tensor, call.compiled))
        if mask is None:  # all kept: a rescale would be by 1
            return vector
    elif sparsify == "magnitude":
        mask = methods.magnitude_mask(vector.whole_in(call.rank_dtype), params["density"])
    elif sparsify == "random":
        if params["density"] >= 1:  # all kept: a rescale would be by 1
            return vector
        drawn = methods.RandomDraws(_drawable(vector.tensor).shape, vector.tensor.device, params["density"],
                                    call.seeds[i])
        mask = drawn.keep(None) if methods.holds_draws(vector.tensor.device.type == "cpu", call.compiled) else drawn
    elif sparsify == "outliers":
        mask = methods.outlier_mask(vector.whole_in(call.rank_dtype), params["density"], params["gamma"])
    elif sparsify == "magprune":
        fractions = methods.fractions_of(call.ranks[i]) if call.ranks is not None else \
            methods.magnitude_fractions(vector.whole_in(call.rank_dtype))
        mask = methods.magprune_mask(_drawable(fractions), params["density"], params["epsilon"], call.seeds[i])
    else:
        return vector
    vector = replace(vector, mask=mask, below=below)
    if not call.shared["rescale"]:
        return vector
    norms_of, piece_entries = (fused.piece_norms, fused.NORMS_PIECE) if call.compiled else (methods.piece_norms, None)
    if call.norms is None:
        return methods.rescaled(vector, norms_of, piece_entries=piece_entries)[0]
    vector, call.norms[i] = methods.rescaled(vector, norms_of, call.norms[i], piece_entries, _table(call, drawn))
    return vector


def _table(call: MergeCall, drawn: methods.RandomDraws | None) -> methods.Tabulated | None:
    """Where a search's rescale of a task vector reads |τ · keep|_1 from a table of its draws (norms.Drawn): DARE's
    mask (drawn) at a density on the draws' grid, of at least norms.TABLE_MIN entries."""
    if drawn is None or draws.grid_step(drawn.density) is None or drawn.shape.numel() < norms.TABLE_MIN:
        return None
    bins_of = fused.piece_bins if call.compiled else methods.piece_bins
    return methods.Tabulated(drawn, bins_of, methods.bins_piece(drawn.device.type == "cpu", call.compiled))


def _task_vector_pieces(sparsify: Sparsify, consensus: bool) -> Callable[[MergeCall], Pieces]:
    """Task-vector merging as a preparation (each task vector's mask and rescale, which need the whole tensor) and
    then the merge of any piece of the tensor."""
    def prepare(call: MergeCall) -> Pieces:
        vectors = [_task_vector(call, i, sparsify) for i in range(len(call.per_model))]
        settings = dict(
            consensus=consensus, normalize=call.shared["normalize"], lam=call.shared["lambda"],
            elect_dtype=call.rank_dtype,
        )
        weights = [p["weight"] for p in call.per_model]
        if call.compiled:
            return fused.combiner(call.base, vectors, weights, **settings)
        return lambda piece: methods.combine_task_vectors(call.base, vectors, weights, piece=piece, **settings)

    return prepare


def _task_vector_method(name: str, sparsify: Sparsify, consensus: bool, *, normalize: bool, rescale: bool) -> MergeMethod:
    per_model: dict[str, Any] = {"weight": REQUIRED}
    if sparsify:
        per_model["density"] = 1.0
    if sparsify == "outliers":
        per_model["gamma"] = 0.01
    if sparsify == "magprune":
        per_model["epsilon"] = 0.15
    # int8_mask is mergekit's memory option; accepted so its recipes load, and without effect here
    shared = {"normalize": normalize, "lambda": 1.0, "int8_mask": False, "rescale": rescale}
    pieces = _task_vector_pieces(sparsify, consensus)
    return MergeMethod(
        name=name,
        merge=lambda call: pieces(call)(None),
        pieces=pieces,
        per_model=per_model,
        shared=shared,
        base="required",
        random=sparsify in ("random", "magprune"),
        sparsify=sparsify,
        task_vectors=True,
    )


def _sce(call: MergeCall) -> torch.Tensor:
    assert call.base is not None
    base = call.base.to(call.compute_dtype)
    deltas = call.deltas if call.deltas is not None else [t - base for t in call.tensors]
    return methods.sce(base, deltas, call.shared["select_topk"], rank_dtype=call.rank_dtype)


def _ram(call: MergeCall) -> torch.Tensor:
    assert call.base is not None
    base = call.base.to(call.compute_dtype)
    deltas = call.deltas if call.deltas is not None else [t - base for t in call.tensors]
    return methods.ram(base, deltas, **call.shared, rank_dtype=call.rank_dtype)


def _nearswap(call: MergeCall) -> torch.Tensor:
    base, (other,) = call.upcast()
    assert base is not None
    return methods.nearswap(call.shared["t"], base, other)


def _arcee_fusion(call: MergeCall) -> torch.Tensor:
    base, (other,) = call.upcast()
    assert base is not None
    return methods.arcee_fusion(base, other, rank_dtype=call.rank_dtype)


def _linear(call: MergeCall) -> torch.Tensor:
    weights = [p["weight"] for p in call.per_model]
    return methods.linear(
        call.tensors, weights, normalize=call.shared["normalize"], dtype=call.compute_dtype, out=call.scratch
    )


def _slerp(call: MergeCall) -> torch.Tensor:
    base, tensors = call.upcast()
    assert base is not None
    return methods.slerp(call.shared["t"], base, tensors[0])


def _nuslerp(call: MergeCall) -> Pieces:
    """Of whole tensors (the default), the angle found first and then any piece of the result; vector by vector,
    the whole result, of which a piece is a slice."""
    w0, w1 = (p["weight"] for p in call.per_model)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    if call.shared["nuslerp_flatten"]:
        v0, v1 = call.tensors
        return spherical.nuslerp_pieces(t, v0, v1, base=call.base, dtype=call.compute_dtype)
    base, (v0, v1) = call.upcast()
    options = {"flatten": False, "row_wise": call.shared["nuslerp_row_wise"]}
    whole = spherical.nuslerp(t, v0, v1, **options) if base is None else \
        spherical.nuslerp(t, v0 - base, v1 - base, **options).add_(base)
    return lambda piece: whole if piece is None else whole.reshape(-1)[piece]


def _multislerp(call: MergeCall) -> torch.Tensor:
    base, tensors = call.upcast()
    weights = [p["weight"] for p in call.per_model]
    return spherical.multislerp(
        tensors, weights, base, normalize_weights=call.shared["normalize_weights"], eps=call.shared["eps"]
    )


def _karcher(call: MergeCall) -> torch.Tensor:
    _, tensors = call.upcast()
    return spherical.karcher(tensors, max_iter=int(call.shared["max_iter"]), tol=call.shared["tol"])


def _model_stock(call: MergeCall) -> torch.Tensor:
    base, tensors = call.upcast()
    assert base is not None
    return methods.model_stock(base, tensors, filter_wise=call.shared["filter_wise"])


def _passthrough(call: MergeCall) -> torch.Tensor:
    scale = call.per_model[0]["scale"]
    tensor = call.tensors[0].to(call.compute_dtype)
    return tensor if scale is None else tensor * scale


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("linear", _linear, {"weight": REQUIRED}, {"normalize": True}, base="ignored", elementwise=True),
        _task_vector_method("task_arithmetic", None, False, normalize=False, rescale=False),
        _task_vector_method("ties", "magnitude", True, normalize=True, rescale=False),
        _task_vector_method("dare_ties", "random", True, normalize=False, rescale=True),
        _task_vector_method("dare_linear", "random", False, normalize=False, rescale=True),
        _task_vector_method("breadcrumbs", "outliers", False, normalize=False, rescale=False),
        _task_vector_method("breadcrumbs_ties", "outliers", True, normalize=False, rescale=False),
        _task_vector_method("della", "magprune", True, normalize=True, rescale=True),
        _task_vector_method("della_linear", "magprune", False, normalize=False, rescale=True),
        MergeMethod(
            "sce", _sce, {}, {"select_topk": 1.0, "int8_mask": False}, base="required", task_vectors=True
        ),
        MergeMethod("ram", _ram, {}, {"epsilon": 1e-5}, base="required", task_vectors=True),
        MergeMethod(
            "ramplus_tl", _ram, {}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, base="required", task_vectors=True
        ),
        MergeMethod("nearswap", _nearswap, {}, {"t": REQUIRED}, base="required", max_inputs=1),
        MergeMethod("arcee_fusion", _arcee_fusion, {}, {}, base="required", max_inputs=1),
        MergeMethod("slerp", _slerp, {}, {"t": REQUIRED}, base="required", min_inputs=1, max_inputs=1),
        MergeMethod(
            "nuslerp", lambda call: _nuslerp(call)(None), {"weight": REQUIRED},
            {"nuslerp_flatten": True, "nuslerp_row_wise": False}, base="optional", min_inputs=2, max_inputs=2,
            pieces=_nuslerp,
        ),
        MergeMethod(
            "multislerp", _multislerp, {"weight": REQUIRED}, {"normalize_weights": True, "eps": 1e-8}, base="optional"
        ),
        MergeMethod("karcher", _karcher, {}, {"max_iter": 10, "tol": 1e-5}, base="included"),
        MergeMethod("model_stock", _model_stock, {}, {"filter_wise": False}, base="required", min_inputs=2),
        MergeMethod("passthrough", _passthrough, {"scale": None}, {}, base="ignored", max_inputs=1),
    ]
}

PARAMETER_NAMES: frozenset[str] = frozenset().union(*(m.parameters for m in METHODS.values()))
"""Every parameter some method takes: a recipe's other names are typos, not parameters of another method."""
