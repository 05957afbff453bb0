"""The resident merger: parents read once, each new recipe over them merged into one live model, in place.

Everything that does not depend on a recipe's numbers is done once, as far as the memory plan
(`merge.memory.MemoryPlan`) keeps it: inputs are read (in their own dtype, or the recipe's where that is
narrower), task vectors (parent - base) are formed, and for TIES (DELLA) their magnitude ranks are sorted, so a
trial's trim is a comparison (its keep-probabilities a multiply-add). What the plan does not keep is formed or read
again each trial. Each tensor then goes through the same formula as `shoal merge` (`engine.merged_values`), so a
recipe gives the same weights either way and under every plan, bit for bit.

With a vision-language parent the live model is that VLM: its vision tower and projector as loaded and never
rewritten when a text LLM is among the parents, merged like the rest when every parent is a VLM (the plan says
which); the plan's tensor names are the VLM checkpoint's, mapped to the live model's by `layout.Names` (and a
tensor outside the language model by its name under transformers' prefix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal import layout
from shoal.checkpoint.reader import Checkpoint
from shoal.errors import ShoalError
from shoal.evaluate.runner import load_model
from shoal.merge import fused, methods
from shoal.merge.engine import (
    Scratch, aligned, check_tokenizer_settings, fused_pays, merge_into, open_parents, output_tokenizer, prefetched,
)
from shoal.merge.tokenizer import OutputTokenizer
from shoal.merge.memory import (
    READ_AHEAD_LIMIT, MemoryNeed, MemoryPlan, check_fits, describe_need, memory_need, storage_dtype, tensor_sizes,
)
from shoal.merge.norms import Norm
from shoal.merge.plan import DTYPE_OF_TAG, MergePlan, TensorInput, TensorJob, build_plan
from shoal.merge.vocab import Vocabulary
from shoal.recipe import Recipe


@dataclass
class _Inputs:
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    """Empty when the task vectors are kept instead."""
    deltas: list[torch.Tensor] | None
    ranks: list[torch.Tensor] | None

    def map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> _Inputs:
        """The same inputs, each tensor changed (moved, pinned)."""
        listed = lambda ts: None if ts is None else [change(t) for t in ts]
        return _Inputs(None if self.base is None else change(self.base), [change(t) for t in self.tensors],
                       listed(self.deltas), listed(self.ranks))


@dataclass
class ResidentPlan:
    """What a resident merger of a recipe holds, known from the parents' headers before any tensor is read."""

    parents: dict[str, Checkpoint]
    built: OutputTokenizer | None
    plan: MergePlan
    need: MemoryNeed
    compiled: bool
    """Whether its merges take merge.fused's compiled pass (a search's merges at this size repay the compiler)."""


def plan_resident(recipe: Recipe, device: str, slots: int, memory: MemoryPlan) -> ResidentPlan:
    """The parents, output tokenizer, merge plan and memory need of a resident merger of recipe (the recipe and its
    tokenizer settings checked as `shoal merge` checks them); no tensor is read."""
    parents = open_parents(recipe)
    built = output_tokenizer(recipe, parents)
    plan = build_plan(recipe, parents, built.vocab if built else None)
    check_tokenizer_settings(recipe, parents, plan.reference)
    compiled = fused_pays(plan, recipe.merge_method, device, fused.SEARCH_MERGES)
    need = memory_need(tensor_sizes(plan, parents, recipe.method), memory, slots=slots, on_cpu=device == "cpu",
                       compiled=compiled)
    return ResidentPlan(parents, built, plan, need, compiled)


class ResidentMerger:
    """Holds the parents' tensors and `slots` copies of the model; `apply(recipe, slot)` writes the recipe's
    merge into one of them (two slots let the next candidate be merged while this one is scored).

    Every recipe applied must read the same parents with the same method and tokenizer settings as the one it was
    built from. With tokenizer settings the model's embeddings and head are resized to the output vocabulary and
    `tokenizer` is the output's, as `shoal merge` would write them. The memory `plan`'s bytes are told to `report`
    (one line) and checked against its limit before any tensor is read.
    """

    def __init__(self, recipe: Recipe, device: str = "cpu", slots: int = 1, memory: MemoryPlan | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ShoalError(f"--device {device}: no CUDA GPU is available here")
        self.device = device
        self.method = recipe.method
        self.memory = memory or MemoryPlan()
        planned = plan_resident(recipe, device, slots, self.memory)
        self.parents, self._built, self.need = planned.parents, planned.built, planned.need
        plan = planned.plan
        self._fused = planned.compiled
        self._vocabulary = recipe.vocabulary
        if report is not None:
            report(describe_need(self.need, self.memory, device, slots) + (
                "; merged a chunk at a time in one compiled pass (compiled at the first merge; SHOAL_FUSED=0: in "
                "eager steps)" if self._fused else ""))
        check_fits(self.need, self.memory, device, slots)
        self._kept_on = "cpu" if self.memory.inputs == "host" else device
        self._inputs = {} if self.memory.inputs == "stream" else \
            {job.spec.name: self._read(job) for job in plan.jobs if not job.verbatim}
        self.models: list[PreTrainedModel] = []
        for _ in range(slots):
            model, self.tokenizer = self._load_model(plan)
            self.models.append(model)
        self._targets = [self._parameters(model, plan) for model in self.models]
        self._scratch = [Scratch() for _ in self.models]
        # each task vector's |τ|_1 for the L1 rescale (merge.norms), found at its first merge: by its tensor, the
        # dtype it is merged in, its base, all of the job's inputs (aligned rows depend on them) and its parent (8
        # bytes a block of 2^16 entries); for DARE with it a table of |τ · keep|_1 under the search's draws
        # (norms.Drawn: 16 kB for each distinct k of its blocks, on the host; about 6 MB for three 0.55B parents)
        self._norms: dict[tuple, Norm | None] = {}

    @property
    def _vocab(self) -> Vocabulary | None:
        return self._built.vocab if self._built else None

    @property
    def model(self) -> PreTrainedModel:
        """The model of slot 0."""
        return self.models[0]

    def _read(self, job: TensorJob) -> _Inputs:
        """A job's inputs as the plan keeps them: formed on the device, then kept there or in (pinned) host memory."""
        def read(tin: TensorInput) -> torch.Tensor:
            own = DTYPE_OF_TAG[self.parents[tin.parent].dtype(tin.name)]
            return self.parents[tin.parent].tensor(tin.name, self.device).to(storage_dtype(own, job.work_dtype))

        base, tensors = aligned(job, read(job.base) if job.base else None, [read(tin) for tin in job.inputs])
        deltas = ranks = None
        sorts = self.memory.ranks == "stored" and self.method.sparsify in ("magnitude", "magprune")
        if self.method.task_vectors and base is not None and base.is_floating_point() and \
                (sorts or self.memory.keep == "deltas"):
            compute = torch.float64 if job.work_dtype == torch.float64 else torch.float32
            wide = base.to(job.work_dtype).to(compute)
            formed = [t.to(job.work_dtype) - wide for t in tensors]
            if sorts:
                rank = methods.magnitude_ranks if self.method.sparsify == "magnitude" else methods.magnitude_places
                ranks = [rank(d.to(job.work_dtype)) for d in formed]
            if self.memory.keep == "deltas":
                deltas, tensors = formed, []
        kept = _Inputs(base, tensors, deltas, ranks)
        if self._kept_on == self.device:
            return kept
        pinned = self.device.startswith("cuda")
        return kept.map(lambda t: t.cpu().pin_memory() if pinned else t.cpu())

    def _load_model(self, plan: MergePlan) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model, tokenizer = load_model(self.parents[plan.reference].path, self.device)
        if self._built is not None:  # the output's vocabulary: its tokenizer, and as many embedding rows
            model.resize_token_embeddings(self._built.vocab.size, mean_resizing=False)
            tokenizer = self._built.tokenizer
        dtypes = {job.spec.dtype for job in plan.jobs if job.spec.dtype.is_floating_point}
        if len(dtypes) == 1:
            model = model.to(dtypes.pop())
        model.eval()
        return model, tokenizer

    def _parameters(self, model: PreTrainedModel, plan: MergePlan) -> dict[str, torch.Tensor]:
        """The live tensor of each merged job, by the job's (checkpoint) name."""
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        saved = self.parents[plan.reference].lm
        live = layout.language_model(model.config.to_dict(), list(state), f"the model built from {plan.reference}")
        targets = {}
        for job in plan.jobs:
            if job.verbatim:
                continue
            canonical = saved.canonical(job.spec.name)
            name = job.spec.name if job.spec.name in state or canonical is None else live.own(canonical)
            if name not in state:  # a tensor outside the language model, which transformers may load under a prefix
                # (a LLaVA checkpoint's vision_tower.* is the live model's model.vision_tower.*)
                under = [key for key in state if key.endswith(f".{name}")]
                name = under[0] if len(under) == 1 else name
            if name not in state:
                raise ShoalError(f"the model built from {plan.reference} has no parameter {name}")
            targets[job.spec.name] = state[name]
        return targets

    def apply(self, recipe: Recipe, slot: int = 0) -> None:
        """Merge `recipe` into the parameters of model `slot` (raises ShoalError on NaN/inf, like `shoal merge`).

        Calls for different slots may run in different threads at once; calls for one slot may not."""
        if recipe.merge_method != self.method.name or set(recipe.parents()) != set(self.parents):
            raise ShoalError("the resident merger holds other parents or another method than this recipe's")
        if recipe.vocabulary != self._vocabulary:
            raise ShoalError("the resident merger holds another tokenizer (tokenizer_source, tokenizer) than this "
                             "recipe's")
        plan = build_plan(recipe, self.parents, self._vocab)
        with torch.no_grad():
            for job, inputs in self._job_inputs([job for job in plan.jobs if not job.verbatim]):
                keys = [(job.spec.name, job.work_dtype, job.base, tuple(job.inputs), tin) for tin in job.inputs]
                norms = [self._norms.get(key) for key in keys]
                # rounded to the output's dtype first: a live model kept wider than the merge writes (a VLM whose
                # vision tower is float32 and language model bfloat16 stays float32) holds what `shoal merge` writes
                merge_into(job, recipe.merge_method, inputs.base, inputs.tensors, self._targets[slot][job.spec.name],
                           self._scratch[slot], deltas=inputs.deltas, ranks=inputs.ranks, norms=norms,
                           fused=self._fused)
                self._norms.update(zip(keys, norms))
                del inputs

    def _job_inputs(self, jobs: list[TensorJob]) -> Iterator[tuple[TensorJob, _Inputs]]:
        """Each job with its inputs on the device: as kept, moved from the host, or read from the parent files.
        (A VLM's own tensors, verbatim jobs, are loaded with the model and never rewritten.)"""
        if self.memory.inputs == "stream":
            for job, (base, tensors) in prefetched(jobs, self.parents, self.device, READ_AHEAD_LIMIT):
                yield job, _Inputs(base, tensors, None, None)
                del base, tensors  # let go before the next job's inputs are read (memory.READ_AHEAD_LIMIT)
            return
        for job in jobs:
            kept = self._inputs[job.spec.name]
            yield job, kept if self._kept_on == self.device else kept.map(
                lambda t: t.to(self.device, non_blocking=True))
