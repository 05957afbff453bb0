"""Search spaces: what a point of the genome builds (a live model to score) and exports (a model folder).

The trial loop and the fitness know only this interface: a genome, `build` into a live model slot, `export`
to disk, and `describe` for the summary. Parameter space merges weights (the resident merger); data-flow space
rewires a path through the parents' layers (the path model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal import layout
from shoal.checkpoint.reader import open_checkpoint
from shoal.devices import cpu_linear_slowdown
from shoal.errors import ShoalError
from shoal.flow.export import check_exportable, export_path
from shoal.flow.model import PathModel
from shoal.flow.path import Layout
from shoal.merge.engine import run_merge
from shoal.merge.memory import check_fits, describe_need
from shoal.merge.resident import ResidentMerger, plan_resident
from shoal.recipe import Recipe
from shoal.search.genome import GeneSpace, Genome
from shoal.search.path_genome import PathGenome
from shoal.search.spec import SearchSpec


class Space(Protocol):
    genome: GeneSpace
    tokenizer: PreTrainedTokenizerBase
    slots: int
    """Live models that can hold candidates at once (2 lets the next be built while one is scored)."""

    def build(self, values: dict[str, float], seed: int, slot: int = 0) -> PreTrainedModel: ...

    def export(self, values: dict[str, float], seed: int, out_dir: Path) -> None: ...

    def describe(self, values: dict[str, float], seed: int) -> dict[str, Any]: ...


def ps_genome(spec: SearchSpec) -> Genome:
    base = open_checkpoint(spec.base)
    if base.num_layers is None:
        raise ShoalError(f"{spec.base}: config.json does not say how many layers the model has")
    return Genome(spec, base.num_layers, [name for name in base.lm_names if layout.part(name) != "layer"])


def flow_genome(spec: SearchSpec) -> PathGenome:
    counts = []
    for name, path in spec.flow_parents.items():
        n = open_checkpoint(path).num_layers
        if n is None:
            raise ShoalError(f"parent {name}: config.json does not say how many layers the model has")
        counts.append(n)
    layout = Layout(tuple(spec.flow_parents), tuple(counts), spec.dfs.repeats)
    return PathGenome(layout, spec.dfs.scaling, spec.dfs.scale_bounds)


def genome_of(spec: SearchSpec) -> GeneSpace:
    """The search's genome, from the parents' headers only (no weights are read)."""
    if spec.space == "ps":
        return ps_genome(spec)
    if spec.space == "dfs":
        return flow_genome(spec)
    raise ShoalError(f"space {spec.space!r} is run in stages (see search.run.evolve), not as one space")


def check_worker_memory(spec: SearchSpec, report: Callable[[str], None]) -> None:
    """Tell report a parameter-space search's memory plan line for each of its workers (one live model each, no
    merge-ahead), from the parents' headers; then refuse it when it exceeds the plan's explicit limit (each worker
    also checks its own device's free memory as it loads)."""
    genome = ps_genome(spec)
    recipe = Recipe.model_validate(genome.recipe(genome.values(genome.start()), spec.seed))
    need = plan_resident(recipe, spec.device, 1, spec.memory).need
    report(f"each worker's {describe_need(need, spec.memory, spec.device, 1)}")
    if spec.memory.limit is not None:
        check_fits(need, spec.memory, spec.device, 1)


class ParameterSpace:
    """Per-layer merge weights and densities; candidates are merged into resident models in place.

    report is told the memory plan's line (its bytes) before anything loads."""

    def __init__(self, spec: SearchSpec, report: Callable[[str], None] | None = None) -> None:
        self.genome = ps_genome(spec)
        self.slots = 2 if spec.overlap else 1
        self.device = spec.device
        self.merger = ResidentMerger(self._recipe(self.genome.values(self.genome.start()), spec.seed), spec.device,
                                     slots=self.slots, memory=spec.memory, report=report)
        self.tokenizer = self.merger.tokenizer

    def _recipe(self, values: dict[str, float], seed: int) -> Recipe:
        return Recipe.model_validate(self.genome.recipe(values, seed))

    def build(self, values: dict[str, float], seed: int, slot: int = 0) -> PreTrainedModel:
        self.merger.apply(self._recipe(values, seed), slot)
        return self.merger.models[slot]

    def export(self, values: dict[str, float], seed: int, out_dir: Path) -> None:
        recipe = self.genome.recipe(values, seed)
        text = yaml.safe_dump(recipe, sort_keys=False)
        run_merge(Recipe.model_validate(recipe), out_dir, recipe_text=text, device=self.device, overwrite=True)

    def describe(self, values: dict[str, float], seed: int) -> dict[str, Any]:
        kept = {"kept": self.genome.kept(values)} if self.genome.spec.genome.choose_parents else {}
        return {"recipe": self.genome.recipe(values, seed), **self.genome.table(values), **kept}


class FlowSpace:
    """A path through T = M x repeats slots of the parents' layers, with seam scales; rewired, never copied."""

    def __init__(self, spec: SearchSpec) -> None:
        self.parents = spec.flow_parents
        check_exportable(self.parents)  # now, not after the search
        self.genome = flow_genome(spec)
        self.layout = self.genome.layout
        self.flow = PathModel(self.parents, spec.device)
        assert self.flow.tokenizer is not None and self.flow.layer_counts == self.layout.layers
        self.tokenizer = self.flow.tokenizer
        self.slots = 1

    def build(self, values: dict[str, float], seed: int, slot: int = 0) -> PreTrainedModel:
        return self.flow.set_path(self.genome.path(values))

    def export(self, values: dict[str, float], seed: int, out_dir: Path) -> None:
        export_path(self.genome.path(values), self.parents, out_dir, overwrite=True)

    def describe(self, values: dict[str, float], seed: int) -> dict[str, Any]:
        path = [{"parent": s.parent, "layer": s.layer, "scale": s.scale} for s in self.genome.path(values)]
        return {"path": path, "parents_order": list(self.parents), "slots": self.layout.t}


def make_space(spec: SearchSpec, report: Callable[[str], None] | None = None) -> Space:
    """The spec's space; report is told a parameter space's memory plan line before anything loads."""
    genome_of(spec)  # refuses a hybrid spec
    return ParameterSpace(spec, report) if spec.space == "ps" else FlowSpace(spec)


SLOW_DTYPE = 2.0
"""How many times slower than float32 a 16-bit dtype's linear layer must run on the CPU before a search says so."""


def slow_dtype_notice(space: Space, device: str) -> str | None:
    """A line when a parameter space's live models are bfloat16 or float16 on a CPU that runs that dtype's linear
    layers at least SLOW_DTYPE times slower than float32 (timed now, devices.cpu_linear_slowdown), naming the
    search file's remedy; else None. The data-flow space runs its parents in their own dtype and has no remedy."""
    if not isinstance(space, ParameterSpace) or device != "cpu":
        return None
    dtype = space.merger.model.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    slowdown = cpu_linear_slowdown(dtype)
    if slowdown < SLOW_DTYPE:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"the live models are {name}, and a {name} linear layer took {slowdown:.1f}x as long as a float32 one on "
            f"this CPU: a search with dtype: float32 may score faster here, at twice the live models' memory")
