"""Genomes: named genes on the unit cube; the parameter-space genome <-> a mergekit recipe with per-layer merge
parameters (weights, densities, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import FloatDistribution

from shoal.merge import draws
from shoal.merge.registry import METHODS
from shoal.search.spec import SHARED_GENES, SearchSpec

ATTENTION, MLP = "attn", "mlp"
"""Substrings that pick a layer's attention and MLP tensors (Llama, Mistral, Qwen2, GPT-2 names); norms go with
attention."""


@dataclass(frozen=True)
class Gene:
    name: str
    parent: str | None
    """None for a gene all parents share (a recipe-wide parameter)."""
    param: str
    group: str
    low: float
    high: float


@dataclass(frozen=True)
class Group:
    label: str
    layers: tuple[int, ...]
    """Layers the group covers; empty for the tensors outside the layers."""
    part: str | None = None
    """ATTENTION or MLP when the genome splits them."""


class GeneSpace:
    """Named genes; a point x of the unit cube maps linearly onto each gene's bounds."""

    genes: list[Gene]

    def __len__(self) -> int:
        return len(self.genes)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    def values(self, x: Sequence[float]) -> dict[str, float]:
        """Gene name -> value in its bounds, for x in [0, 1]^n."""
        return {
            g.name: float(min(g.high, max(g.low, g.low + float(xi) * (g.high - g.low)))) for g, xi in zip(self.genes, x)
        }

    def distributions(self) -> dict[str, FloatDistribution]:
        """Each gene's range, as an Optuna study records its parameters."""
        return {g.name: FloatDistribution(g.low, g.high) for g in self.genes}

    def start(self) -> np.ndarray:
        """Where the search starts, on the unit cube (the middle unless a genome knows better)."""
        return np.full(len(self.genes), 0.5)


KEEP, KEPT_FROM = "keep", 0.5
"""A parent's keep gene (genome.choose_parents), and the value from which the parent is in the merge."""

ALL_PARENTS = "all parents"
"""How the genome's table names the row of a gene all parents share."""


def _gene_name(parent: str | None, param: str, group: str) -> str:
    return f"{param}.{group}" if parent is None else f"{parent}.{param}.{group}"


class Genome(GeneSpace):
    """The PS genome: one gene per (parent, parameter, group) of layers, or per (parameter, group) for a parameter
    all parents share (SHARED_GENES)."""

    def __init__(self, spec: SearchSpec, num_layers: int, outer_names: list[str]) -> None:
        self.spec = spec
        self.params = spec.params
        self.num_layers = num_layers
        self.outer_names = outer_names
        self.groups = self._groups()
        self.per_parent = [p for p in self.params if p not in SHARED_GENES]
        self.shared = [p for p in self.params if p in SHARED_GENES]
        owned = [(parent, param) for parent in spec.parents for param in self.per_parent]
        self.genes = [
            Gene(_gene_name(parent, param, group.label), parent, param, group.label, *spec.bound(param))
            for parent, param in owned + [(None, param) for param in self.shared]
            for group in self.groups
        ]
        if spec.genome.choose_parents:
            self.genes += [Gene(f"{parent}.{KEEP}", parent, KEEP, "parent", 0.0, 1.0) for parent in spec.parents]

    def _groups(self) -> list[Group]:
        n = self.num_layers
        size = self.spec.genome.layers_per_group or n
        chunks = [tuple(range(a, min(a + size, n))) for a in range(0, n, size)]
        label = lambda c: f"layer{c[0]}" if len(c) == 1 else f"layers{c[0]}-{c[-1]}"
        if self.spec.genome.split_attention_mlp:
            groups = [Group(f"{label(c)}.{part}", c, part) for c in chunks for part in (ATTENTION, MLP)]
        else:
            groups = [Group(label(c), c) for c in chunks]
        if self.spec.genome.embeddings == "search":
            groups.append(Group("embeddings", ()))
        return groups

    def _per_layer(self, values: dict[str, float], parent: str | None, param: str, part: str | None) -> list[float]:
        row = [0.0] * self.num_layers
        for group in self.groups:
            if group.layers and group.part == part:
                for layer in group.layers:
                    row[layer] = values[_gene_name(parent, param, group.label)]
        return row

    def _setting(self, values: dict[str, float], parent: str | None, param: str) -> Any:
        """One parameter (of one parent, or shared) as a mergekit setting: a number, a per-layer gradient, or
        filtered entries."""
        gradient = lambda row: row[0] if len(set(row)) == 1 else row
        entries: list[dict[str, Any]] = []
        if self.spec.genome.embeddings == "search":
            outer = values[_gene_name(parent, param, "embeddings")]
            entries += [{"filter": name, "value": outer} for name in self.outer_names]
        elif param == "weight":
            entries += [{"filter": name, "value": 0.0} for name in self.outer_names]  # the base's own tensors
        if self.spec.genome.split_attention_mlp:
            attention = gradient(self._per_layer(values, parent, param, ATTENTION))
            entries += [{"filter": ATTENTION, "value": attention}]
            entries += [{"filter": MLP, "value": gradient(self._per_layer(values, parent, param, MLP))}]
            layers = attention
        else:
            layers = gradient(self._per_layer(values, parent, param, None))
        return entries + [{"value": layers}] if entries else layers

    def kept(self, values: dict[str, float]) -> list[str]:
        """The parents in the merge: all, or with genome.choose_parents those whose keep gene is at least KEPT_FROM
        (at least the one with the highest keep gene, the first of equals)."""
        parents = list(self.spec.parents)
        if not self.spec.genome.choose_parents:
            return parents
        keep = {parent: values[f"{parent}.{KEEP}"] for parent in parents}
        return [p for p in parents if keep[p] >= KEPT_FROM] or [max(parents, key=keep.__getitem__)]

    def _recipe_values(self, values: dict[str, float]) -> dict[str, float]:
        """Gene values as the recipe's: an epsilon gene is the fraction of the room its density leaves,
        epsilon = gene · min(density, 1 - density) (so density ± epsilon stays inside (0, 1)); a parent left out
        by its keep gene has weight 0; DARE's densities are multiples of 2^-10 (merge.draws.on_grid: the resident
        merger reads the rescale's norms of any of them from a table)."""
        out = dict(values)
        kept = self.kept(values)
        gridded = METHODS[self.spec.method].sparsify == "random"
        for g in self.genes:
            if g.param == "density" and gridded:
                out[g.name] = draws.on_grid(values[g.name])
            elif g.param == "epsilon":
                density = values[_gene_name(g.parent, "density", g.group)]
                out[g.name] = values[g.name] * min(density, 1 - density)
            elif g.param == "weight" and g.parent not in kept:
                out[g.name] = 0.0
        return out

    def recipe(self, values: dict[str, float], seed: int) -> dict[str, Any]:
        """The mergekit recipe (as a YAML-ready dict) of a genome; seed fixes the random drops (DARE, DELLA)."""
        spec = self.spec
        values = self._recipe_values(values)
        recipe: dict[str, Any] = {"merge_method": spec.method}
        if spec.method != "linear":
            recipe["base_model"] = spec.base
        settings = lambda parent: {p: self._setting(values, parent, p) for p in self.per_parent}
        recipe["models"] = [
            {"model": path} | ({"parameters": settings(parent)} if self.per_parent else {})
            for parent, path in spec.parents.items()
        ]
        if self.shared:
            recipe["parameters"] = {p: self._setting(values, None, p) for p in self.shared}
        if spec.dtype:
            recipe["dtype"] = spec.dtype
        if spec.tokenizer_ref:
            recipe["tokenizer_source"] = spec.tokenizer_ref
        recipe["seed"] = seed
        return recipe

    def _owners(self, param: str) -> list[tuple[str, str | None]]:
        """The table's row names of a parameter, with the parent whose genes fill each."""
        if param in self.shared:
            return [(ALL_PARENTS, None)]
        return [(parent, parent) for parent in self.spec.parents]

    def table(self, values: dict[str, float]) -> dict[str, Any]:
        """The recipe's values as heatmap rows: {"layers": {row: {parent: per-layer values}}, "embeddings": {row:
        {parent: v}} or None}; a shared parameter's row is under ALL_PARENTS."""
        values = self._recipe_values(values)
        parts = [ATTENTION, MLP] if self.spec.genome.split_attention_mlp else [None]
        layers = {
            (param if part is None else f"{param} ({part})"): {
                row: self._per_layer(values, parent, param, part) for row, parent in self._owners(param)
            }
            for param in self.params
            for part in parts
        }
        embeddings = None
        if self.spec.genome.embeddings == "search":
            embeddings = {
                param: {row: values[_gene_name(parent, param, "embeddings")] for row, parent in self._owners(param)}
                for param in self.params
            }
        return {"layers": layers, "embeddings": embeddings}
