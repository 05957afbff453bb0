"""Genomes: named genes on the unit cube; the parameter-space genome <-> a mergekit recipe with per-layer weights
and densities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import FloatDistribution

from shoal.search.spec import SearchSpec

ATTENTION, MLP = "attn", "mlp"
"""Substrings that pick a layer's attention and MLP tensors (Llama, Mistral, Qwen2, GPT-2 names); norms go with
attention."""


@dataclass(frozen=True)
class Gene:
    name: str
    parent: str
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


class Genome(GeneSpace):
    """The PS genome: one gene per (parent, parameter, group) of layers."""

    def __init__(self, spec: SearchSpec, num_layers: int, outer_names: list[str]) -> None:
        self.spec = spec
        self.params = spec.params
        self.num_layers = num_layers
        self.outer_names = outer_names
        self.groups = self._groups()
        self.genes = [
            Gene(f"{parent}.{param}.{group.label}", parent, param, group.label, *spec.bound(param))
            for parent in spec.parents
            for param in self.params
            for group in self.groups
        ]

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

    def _per_layer(self, values: dict[str, float], parent: str, param: str, part: str | None) -> list[float]:
        row = [0.0] * self.num_layers
        for group in self.groups:
            if group.layers and group.part == part:
                for layer in group.layers:
                    row[layer] = values[f"{parent}.{param}.{group.label}"]
        return row

    def _setting(self, values: dict[str, float], parent: str, param: str) -> Any:
        """One parent's parameter as a mergekit setting: a number, a per-layer gradient, or filtered entries."""
        gradient = lambda row: row[0] if len(set(row)) == 1 else row
        entries: list[dict[str, Any]] = []
        if self.spec.genome.embeddings == "search":
            outer = values[f"{parent}.{param}.embeddings"]
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

    def recipe(self, values: dict[str, float], seed: int) -> dict[str, Any]:
        """The mergekit recipe (as a YAML-ready dict) of a genome; seed fixes DARE's random drops."""
        spec = self.spec
        recipe: dict[str, Any] = {"merge_method": spec.method}
        if spec.method != "linear":
            recipe["base_model"] = spec.base
        recipe["models"] = [
            {"model": path, "parameters": {p: self._setting(values, parent, p) for p in self.params}}
            for parent, path in spec.parents.items()
        ]
        if spec.dtype:
            recipe["dtype"] = spec.dtype
        recipe["seed"] = seed
        return recipe

    def table(self, values: dict[str, float]) -> dict[str, Any]:
        """The genome as heatmap rows: {"layers": {row: {parent: per-layer values}}, "embeddings": {row: {parent: v}}
        or None}."""
        parts = [ATTENTION, MLP] if self.spec.genome.split_attention_mlp else [None]
        layers = {
            (param if part is None else f"{param} ({part})"): {
                parent: self._per_layer(values, parent, param, part) for parent in self.spec.parents
            }
            for param in self.params
            for part in parts
        }
        embeddings = None
        if self.spec.genome.embeddings == "search":
            embeddings = {
                param: {parent: values[f"{parent}.{param}.embeddings"] for parent in self.spec.parents}
                for param in self.params
            }
        return {"layers": layers, "embeddings": embeddings}
