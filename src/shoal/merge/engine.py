"""`shoal merge`: stream a recipe's output tensors, one at a time, from lazily read parents into a new folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from shoal.checkpoint import card, files
from shoal.checkpoint.reader import Checkpoint, open_checkpoint
from shoal.checkpoint.writer import ModelFolderWriter, atomic_output_dir
from shoal.devices import check_device
from shoal.errors import ShoalError
from shoal.merge.plan import MergePlan, TensorJob, build_plan
from shoal.merge.registry import METHODS, MergeCall
from shoal.recipe import Recipe

Loaded = tuple[torch.Tensor | None, list[torch.Tensor]]
RECIPE_FILE = "recipe.yaml"


def _compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _finite(tensor: torch.Tensor) -> bool:
    low, high = torch.aminmax(tensor)  # one pass, no mask tensor; NaN propagates into both
    return bool(torch.isfinite(low) & torch.isfinite(high))


class Scratch:
    """One growing buffer per (dtype, device), lent out as a tensor of any shape: merging tensor after tensor
    reuses memory instead of allocating (and page-faulting in) a fresh result for each."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape.numel()
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def merged_values(
    job: TensorJob,
    method_name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    scratch: Scratch | None = None,
    *,
    deltas: list[torch.Tensor] | None = None,
    ranks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply the method to one tensor's inputs (rounded to the recipe's dtype, computed in float32): the result
    in the compute dtype, possibly the scratch buffer. deltas and ranks, when given, are the task vectors and
    their magnitude ranks already formed from these inputs (the resident merger keeps them between trials); with
    deltas, a task-vector method needs no tensors (an empty list)."""
    method = METHODS[method_name]
    raw = ([base] if base is not None else []) + tensors
    if not raw[0].is_floating_point():
        return raw[0]
    raw = [t.to(job.work_dtype) for t in raw]
    generators = []
    if method.random:
        generators = [torch.Generator(device=raw[0].device).manual_seed(s) for s in job.seeds]
    call = MergeCall(
        base=raw[0] if base is not None else None,
        tensors=raw[1:] if base is not None else raw,
        per_model=job.per_model,
        shared=job.shared,
        work_dtype=job.work_dtype,
        generators=generators,
        compute_dtype=_compute_dtype(raw),
        deltas=deltas,
        ranks=ranks,
    )
    if scratch is not None:
        call.scratch = scratch.take(raw[0].shape, call.compute_dtype, raw[0].device)
    try:
        result = method.merge(call)
    except ShoalError as error:
        raise ShoalError(f"tensor {job.spec.name} ({method_name}): {error}") from None
    if not _finite(result):
        raise ShoalError(
            f"the merge produced NaN or inf in tensor {job.spec.name} ({method_name}); "
            "check the weights (e.g. weights summing to 0 with normalize: true)"
        )
    return result


def merge_tensor(
    job: TensorJob,
    method_name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """merged_values as a new tensor in the output dtype (never the scratch buffer itself); a verbatim job's
    input unchanged."""
    if job.verbatim:
        return tensors[0].to(job.spec.dtype)
    return merged_values(job, method_name, base, tensors, scratch).to(job.spec.dtype, copy=True)


def _load(job: TensorJob, parents: dict[str, Checkpoint], device: str) -> Loaded:
    base = parents[job.base.parent].tensor(job.base.name, device) if job.base else None
    return base, [parents[i.parent].tensor(i.name, device) for i in job.inputs]


def prefetched(jobs: list[TensorJob], parents: dict[str, Checkpoint], device: str) -> Iterator[tuple[TensorJob, Loaded]]:
    """Yield each job with its inputs, reading the next job's tensors while the current one is merged."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Loaded] | None = pool.submit(_load, jobs[0], parents, device) if jobs else None
        for i, job in enumerate(jobs):
            assert pending is not None
            loaded = pending.result()
            pending = pool.submit(_load, jobs[i + 1], parents, device) if i + 1 < len(jobs) else None
            yield job, loaded


def open_parents(recipe: Recipe) -> dict[str, Checkpoint]:
    return {ref: open_checkpoint(ref) for ref in recipe.parents()}


def _tokenizer_source(recipe: Recipe, parents: dict[str, Checkpoint], reference: str) -> Path:
    """The folder the output's tokenizer comes from: a VLM output's is the VLM's own (its processor needs the
    image tokens), whatever the base; else tokenizer_source, by default the base."""
    ref = recipe.tokenizer_source
    if ref == "union":
        raise ShoalError("tokenizer_source: union is not supported; use base or a model path")
    if parents[reference].is_vlm:
        if ref not in (None, "base", reference):
            raise ShoalError(
                f"tokenizer_source: {ref}, but the output is the vision-language model {reference}, whose processor "
                f"needs its own tokenizer; leave tokenizer_source out or set it to {reference}"
            )
        return parents[reference].path
    if ref in (None, "base"):
        ref = recipe.base_model or reference
    return parents[ref].path if ref in parents else open_checkpoint(ref).path


def run_merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    recipe_text: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    copy_tokenizer: bool = True,
    on_tensor: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge `recipe` into out_dir: a loadable HF folder that appears only when complete.

    Everything that can be checked without reading tensor data (parents, names, shapes, parameters) is
    checked first; on_tensor(0, total) is called once that passed, then after each tensor. Without copy_tokenizer,
    no tokenizer or processor files are written unless the recipe names a tokenizer_source (mergekit's rule).
    """
    check_device(device)
    if max_shard_bytes < 1:
        raise ShoalError(f"shard size {max_shard_bytes} bytes: give a positive size")
    parents = open_parents(recipe)
    plan: MergePlan = build_plan(recipe, parents)
    wants_tokenizer = copy_tokenizer or recipe.tokenizer_source is not None
    tokenizer_dir = _tokenizer_source(recipe, parents, plan.reference) if wants_tokenizer else None
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ModelFolderWriter(tmp, [job.spec for job in plan.jobs], max_shard_bytes)
        if on_tensor:
            on_tensor(0, len(plan.jobs))
        # three stages overlap: reading the next tensor, merging this one, writing the previous one
        try:
            scratch = Scratch()
            with ThreadPoolExecutor(max_workers=1) as write_pool:
                written: Future[None] | None = None
                for done, (job, (base, tensors)) in enumerate(prefetched(plan.jobs, parents, device), start=1):
                    merged = merge_tensor(job, recipe.merge_method, base, tensors, scratch)
                    if written is not None:
                        written.result()
                    written = write_pool.submit(writer.write, job.spec.name, merged)
                    if on_tensor:
                        on_tensor(done, len(plan.jobs))
                if written is not None:
                    written.result()
        except BaseException:
            writer.abort()
            raise
        writer.close()
        files.write_config(tmp, plan.config)
        if tokenizer_dir is not None:
            files.copy_tokenizer(tokenizer_dir, tmp, processor=parents[plan.reference].is_vlm)
        text = recipe_text or yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False)
        (tmp / RECIPE_FILE).write_text(text)
        card.write_model_card(
            tmp, name=out_dir.name, method=recipe.merge_method, parents=recipe.parents(), base=recipe.base_model,
            recipe_file=RECIPE_FILE, recipe_text=text,
            vision=plan.reference if parents[plan.reference].is_vlm else None,
        )
    return out_dir
