"""The resident merger: parents read once, each new recipe over them merged into one live model, in place.

Everything that does not depend on a recipe's numbers is done once: inputs are read and rounded to the
recipe's dtype, task vectors (parent - base) are formed, and for TIES (DELLA) their magnitude ranks are sorted,
so a trial's trim is a comparison (its keep-probabilities a multiply-add). Each tensor then goes through the
same formula as `shoal merge` (`engine.merged_values`), so a recipe gives the same weights either way, bit for bit.

With a vision-language parent the live model is that VLM (its vision tower and projector as loaded, never
rewritten); the plan's tensor names are the VLM checkpoint's, mapped to the live model's by `layout.Names`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal import layout
from shoal.checkpoint.reader import Checkpoint
from shoal.errors import ShoalError
from shoal.evaluate.runner import load_model
from shoal.merge import methods
from shoal.merge.engine import Scratch, aligned, merged_values, open_parents, output_tokenizer
from shoal.merge.plan import MergePlan, TensorJob, build_plan
from shoal.merge.vocab import Vocabulary
from shoal.recipe import Recipe


@dataclass
class _Inputs:
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    deltas: list[torch.Tensor] | None
    ranks: list[torch.Tensor] | None


class ResidentMerger:
    """Holds the parents' tensors and `slots` copies of the model; `apply(recipe, slot)` writes the recipe's
    merge into one of them (two slots let the next candidate be merged while this one is scored).

    Every recipe applied must read the same parents with the same method and tokenizer settings as the one it was
    built from. With tokenizer settings the model's embeddings and head are resized to the output vocabulary and
    `tokenizer` is the output's, as `shoal merge` would write them.
    """

    def __init__(self, recipe: Recipe, device: str = "cpu", slots: int = 1) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ShoalError(f"--device {device}: no CUDA GPU is available here")
        self.device = device
        self.method = recipe.method
        self.parents: dict[str, Checkpoint] = open_parents(recipe)
        self._vocabulary = recipe.vocabulary
        self._built = output_tokenizer(recipe, self.parents)
        plan = build_plan(recipe, self.parents, self._vocab)
        self._inputs = {job.spec.name: self._read(job) for job in plan.jobs if not job.verbatim}
        self.models: list[PreTrainedModel] = []
        for _ in range(slots):
            model, self.tokenizer = self._load_model(plan)
            self.models.append(model)
        self._targets = [self._parameters(model, plan) for model in self.models]
        self._scratch = [Scratch() for _ in self.models]

    @property
    def _vocab(self) -> Vocabulary | None:
        return self._built.vocab if self._built else None

    @property
    def model(self) -> PreTrainedModel:
        """The model of slot 0."""
        return self.models[0]

    def _read(self, job: TensorJob) -> _Inputs:
        read = lambda tin: self.parents[tin.parent].tensor(tin.name, self.device).to(job.work_dtype)
        base, tensors = aligned(job, read(job.base) if job.base else None, [read(tin) for tin in job.inputs])
        deltas = ranks = None
        if self.method.task_vectors and base is not None and base.is_floating_point():
            compute = torch.float64 if job.work_dtype == torch.float64 else torch.float32
            wide = base.to(compute)
            deltas = [t - wide for t in tensors]
            if self.method.sparsify == "magnitude":
                ranks = [methods.magnitude_ranks(d.to(job.work_dtype)) for d in deltas]
            elif self.method.sparsify == "magprune":
                ranks = [methods.magnitude_fractions(d.to(job.work_dtype)) for d in deltas]
        return _Inputs(base, tensors, deltas, ranks)

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
            for job in plan.jobs:
                if job.verbatim:  # a VLM's own tensors, loaded with the model
                    continue
                inputs = self._inputs[job.spec.name]
                merged = merged_values(
                    job, recipe.merge_method, inputs.base, inputs.tensors, self._scratch[slot],
                    deltas=inputs.deltas, ranks=inputs.ranks,
                )
                self._targets[slot][job.spec.name].copy_(merged)
