"""`shoal merge`: stream a recipe's output tensors, one at a time, from lazily read parents into a new folder."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from shoal.checkpoint import card, files
from shoal.checkpoint.reader import Checkpoint, open_checkpoint
from shoal.checkpoint.reference import parse_reference
from shoal.checkpoint.writer import ModelFolderWriter, atomic_output_dir
from shoal.devices import check_device
from shoal.errors import ShoalError
from shoal.merge import chat_template, fused, methods
from shoal.merge.norms import Norm
from shoal.merge.plan import MergePlan, TensorJob, build_plan, input_bytes
from shoal.merge.registry import METHODS, MergeCall
from shoal.merge.tokenizer import OutputTokenizer, build_output_tokenizer, chat_templates, check_shared_vocabulary
from shoal.merge.vocab import align_rows
from shoal.recipe import Recipe

Loaded = tuple[torch.Tensor | None, list[torch.Tensor]]
RECIPE_FILE = "recipe.yaml"


def _compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A sum is finite only when every entry is, and not when one is NaN or inf or
    when it overflows, so only a sum that is not finite needs the min and max (one pass, no mask tensor; NaN
    propagates into both). The sum takes 0.05 ns an entry of a float32 chunk on one thread, the min and max 0.19
    (benchmarks/write_path.py)."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    low, high = torch.aminmax(tensor)
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


def _call(
    job: TensorJob,
    method_name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    scratch: Scratch | None,
    deltas: list[torch.Tensor] | None,
    ranks: list[torch.Tensor] | None,
    fused: bool = False,
    norms: list[Norm | None] | None = None,
) -> MergeCall:
    """The method's call for one tensor's floating-point inputs, rounded to the recipe's dtype; a random method's
    seeds for this tensor."""
    raw = [t.to(job.work_dtype) for t in ([base] if base is not None else []) + tensors]
    call = MergeCall(
        base=raw[0] if base is not None else None,
        tensors=raw[1:] if base is not None else raw,
        per_model=job.per_model,
        shared=job.shared,
        work_dtype=job.work_dtype,
        seeds=list(job.seeds) if METHODS[method_name].random else [],
        compute_dtype=_compute_dtype(raw),
        deltas=deltas,
        ranks=ranks,
        norms=norms,
        fused=fused,
    )
    if scratch is not None and METHODS[method_name].elementwise:  # the one kind that writes its result there
        call.scratch = scratch.take(raw[0].shape, call.compute_dtype, raw[0].device)
    return call


@contextmanager
def _naming(job: TensorJob, method_name: str) -> Iterator[None]:
    """A method's ShoalError, said with the tensor and method it was raised for."""
    try:
        yield
    except ShoalError as error:
        raise ShoalError(f"tensor {job.spec.name} ({method_name}): {error}") from None


def _checked(values: torch.Tensor, job: TensorJob, method_name: str) -> torch.Tensor:
    if not _finite(values):
        raise ShoalError(
            f"the merge produced NaN or inf in tensor {job.spec.name} ({method_name}); "
            "check the weights (e.g. weights summing to 0 with normalize: true)"
        )
    return values


def merged_values(
    job: TensorJob,
    method_name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    scratch: Scratch | None = None,
    *,
    deltas: list[torch.Tensor] | None = None,
    ranks: list[torch.Tensor] | None = None,
    norms: list[Norm | None] | None = None,
) -> torch.Tensor:
    """Apply the method to one tensor's inputs (rounded to the recipe's dtype, computed in float32): the result
    in the compute dtype, possibly the scratch buffer. deltas and ranks, when given, are the task vectors and
    their magnitude ranks already formed from these inputs (the resident merger keeps them between trials), and
    norms their L1 norms where known (MergeCall.norms: filled in where found); with deltas, a task-vector method
    needs no tensors (an empty list)."""
    first = base if base is not None else tensors[0]
    if not first.is_floating_point():
        return first
    call = _call(job, method_name, base, tensors, scratch, deltas, ranks, norms=norms)
    with _naming(job, method_name):
        result = METHODS[method_name].merge(call)
    return _checked(result, job, method_name)


def merge_into(
    job: TensorJob,
    method_name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    out: torch.Tensor,
    scratch: Scratch | None = None,
    *,
    deltas: list[torch.Tensor] | None = None,
    ranks: list[torch.Tensor] | None = None,
    norms: list[Norm | None] | None = None,
    fused: bool = False,
) -> None:
    """Write merged_values, rounded to the output's dtype, into out (contiguous, of the job's shape; it may be
    wider than the output's dtype, as a live model's parameter may be), with the same values bit for bit. A large
    tensor of an elementwise method (linear) is merged a chunk at a time (methods.chunk_size); of a method with
    pieces (task arithmetic, TIES, DARE, DELLA, breadcrumbs; nuslerp), what needs the whole tensor is found first
    (masks and rescales; the angle), then it is merged and written a chunk at a time, so no compute-dtype copy of
    it is made whole: with fused, each chunk of a task-vector method (of methods.COMPILED_CHUNK entries) in one
    compiled pass (merge.fused; the same values)."""
    method = METHODS[method_name]
    first = base if base is not None else (tensors[0] if tensors else deltas[0])
    chunked = first.is_floating_point() and methods.in_chunks(first)
    flat_out = out.view(-1)
    if chunked and method.pieces is not None:
        call = _call(job, method_name, base, tensors, None, deltas, ranks, fused, norms)
        with _naming(job, method_name):
            values_of = method.pieces(call)
        for piece in methods.chunks(flat_out.numel(), methods.chunk_size(first, call.compiled)):
            _write(_checked(values_of(piece), job, method_name), job, flat_out[piece])
        return
    if not (chunked and method.elementwise):
        _write(merged_values(job, method_name, base, tensors, scratch, deltas=deltas, ranks=ranks, norms=norms),
               job, out)
        return
    flat_base = base.reshape(-1) if base is not None else None
    flat_tensors = [t.reshape(-1) for t in tensors]
    flat_deltas = None if deltas is None else [d.reshape(-1) for d in deltas]
    for piece in methods.chunks(flat_out.numel(), methods.chunk_size(first)):
        values = merged_values(
            job, method_name, None if flat_base is None else flat_base[piece], [t[piece] for t in flat_tensors],
            scratch, deltas=None if flat_deltas is None else [d[piece] for d in flat_deltas],
        )
        _write(values, job, flat_out[piece])


def _write(values: torch.Tensor, job: TensorJob, out: torch.Tensor) -> None:
    """out.copy_(_rounded(values, job)), in one conversion where it gives the same values: when the job's work
    dtype is the output's and out's (no rounded copy made first: 0.13 ns an entry against 0.26, write_path.py)."""
    out.copy_(values if job.work_dtype == job.spec.dtype == out.dtype else _rounded(values, job))


def _rounded(values: torch.Tensor, job: TensorJob) -> torch.Tensor:
    """Merged values as written: rounded to the recipe's dtype first, then cast to the output's (mergekit's order:
    a merge in bfloat16 written as float32 holds bfloat16 values)."""
    if values.is_floating_point() and job.work_dtype.is_floating_point:
        values = values.to(job.work_dtype)
    return values.to(job.spec.dtype)


def merge_tensor(
    job: TensorJob,
    method_name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    scratch: Scratch | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """merged_values as a new tensor in the output dtype (never the scratch buffer itself); a verbatim job's
    input unchanged. fused: as merge_into's."""
    if job.verbatim:
        return tensors[0].to(job.spec.dtype)
    out = torch.empty(tuple(job.spec.shape), dtype=job.spec.dtype, device=(base if base is not None else tensors[0]).device)
    merge_into(job, method_name, base, tensors, out, scratch, fused=fused)
    return out


def fused_pays(plan: MergePlan, method_name: str, device: str, merges: int = 1) -> bool:
    """Whether `merges` merges of plan compile their chunks' pass (merge.fused.worth): by the entries each merges
    in chunks with a task-vector method's pieces, in float32 (a float64 merge takes the eager steps)."""
    method = METHODS[method_name]
    if not method.task_vectors or method.pieces is None:  # the compiled pass is the task vectors' combination
        return False
    size = methods.chunk_entries(torch.device(device).type == "cpu")
    sizes = (math.prod(job.spec.shape) for job in plan.jobs if not job.verbatim and job.work_dtype != torch.float64)
    entries = sum(n for n in sizes if n > size)
    return fused.worth(entries, device, merges)


def aligned(job: TensorJob, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> Loaded:
    """A vocabulary job's inputs rounded to its work dtype, their rows moved onto the output vocabulary (see
    merge.vocab); any other job's as they are."""
    if job.rows is None:
        return base, tensors
    raw = align_rows([t.to(job.work_dtype) for t in ([base] if base is not None else []) + tensors], job.rows)
    return (raw[0], raw[1:]) if base is not None else (None, raw)


def _load(job: TensorJob, parents: dict[str, Checkpoint], device: str) -> Loaded:
    base = parents[job.base.parent].tensor(job.base.name, device) if job.base else None
    return aligned(job, base, [parents[i.parent].tensor(i.name, device) for i in job.inputs])


def prefetched(jobs: list[TensorJob], parents: dict[str, Checkpoint], device: str, ahead_limit: int | None = None
               ) -> Iterator[tuple[TensorJob, Loaded]]:
    """Yield each job with its inputs, reading the next job's tensors while the current one is merged (with
    ahead_limit, only when they are at most that many bytes: a larger job's are read once the current one is done,
    after this generator has let go of the current one's, so a caller that drops its own references before asking
    for the next never holds two large jobs' inputs at once)."""
    def ahead(i: int) -> bool:
        return ahead_limit is None or input_bytes(jobs[i], parents) <= ahead_limit

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Loaded] | None = pool.submit(_load, jobs[0], parents, device) if jobs else None
        for i, job in enumerate(jobs):
            loaded = pending.result() if pending is not None else _load(job, parents, device)
            pending = pool.submit(_load, jobs[i + 1], parents, device) if i + 1 < len(jobs) and ahead(i + 1) \
                else None
            yield job, loaded
            del loaded


def check_not_an_input(out_dir: Path, recipe: Recipe) -> None:
    """Refuse an output folder that is, or holds, a local folder the recipe reads (a parent, a LoRA adapter or the
    model it applies to, a tokenizer's source): with --overwrite the merge would replace it."""
    out = out_dir.resolve()
    for _, ref in recipe.model_places():
        reference = parse_reference(ref)
        for place in (reference.model, reference.lora):
            folder = None if place is None else Path(place.path).expanduser()
            if folder is not None and folder.exists() and folder.resolve().is_relative_to(out):
                raise ShoalError(f"OUT_DIR {out_dir} is or holds {folder}, which the recipe reads: write the merge "
                                 "elsewhere")


def open_parents(recipe: Recipe) -> dict[str, Checkpoint]:
    return {ref: open_checkpoint(ref) for ref in recipe.parents()}


def output_tokenizer(recipe: Recipe, parents: dict[str, Checkpoint]) -> OutputTokenizer | None:
    """The tokenizer the recipe's tokenizer settings build, with the vocabulary the embeddings and head are aligned
    to; None with a vision-language parent (whose own tokenizer the output keeps), or without settings, where the
    parents must share one vocabulary (check_shared_vocabulary)."""
    if any(ck.is_vlm for ck in parents.values()):
        return None
    if recipe.vocabulary is None:
        check_shared_vocabulary(parents)
        return None
    return build_output_tokenizer(recipe, parents)


def check_tokenizer_settings(recipe: Recipe, parents: dict[str, Checkpoint], reference: str) -> None:
    """Refuse tokenizer settings the output cannot take (a vision-language output keeps its own tokenizer), as
    `shoal merge` would, for a caller that merges in memory and writes nothing yet."""
    if parents[reference].is_vlm:
        _tokenizer_folder(recipe, parents, reference)
        _chat_template(recipe, parents, reference, writes_tokenizer=True)


def _tokenizer_folder(recipe: Recipe, parents: dict[str, Checkpoint], reference: str) -> Path:
    """The folder the output's tokenizer files are copied from when no tokenizer is built: a VLM output's is the
    VLM's own (its processor needs the image tokens), whatever the base; else tokenizer_source, by default the
    base."""
    settings = recipe.vocabulary
    ref = settings.source if settings else None
    if parents[reference].is_vlm:
        if recipe.tokenizer is not None or ref not in (None, "base", reference):
            given = "a tokenizer section" if recipe.tokenizer is not None else f"tokenizer_source: {ref}"
            raise ShoalError(
                f"{given}, but the output is the vision-language model {reference}, whose processor "
                f"needs its own tokenizer; leave tokenizer_source out or set it to {reference}"
            )
        return parents[reference].path
    if ref in (None, "base"):
        ref = recipe.base_model or reference
    return parents[ref].path if ref in parents else open_checkpoint(ref).path


def _chat_template(recipe: Recipe, parents: dict[str, Checkpoint], reference: str, writes_tokenizer: bool
                   ) -> str | None:
    """The chat template to write into the output's tokenizer (None: keep its own)."""
    if recipe.chat_template is None:
        return None
    if parents[reference].is_vlm:
        raise ShoalError(f"chat_template: the output is the vision-language model {reference}, whose processor "
                         "keeps its own chat template; leave chat_template out")
    if not writes_tokenizer:
        raise ShoalError("chat_template is set but no tokenizer is written; drop --no-copy-tokenizer or set "
                         "tokenizer_source")
    templates = chat_templates({ref: parents[ref] for ref in recipe.parents()}) if recipe.chat_template == "auto" \
        else []
    return chat_template.resolve(recipe.chat_template, templates)


def _write_tokenizer(folder: Path, built: OutputTokenizer | None, source: Path | None, template: str | None,
                     processor: bool) -> None:
    if built is not None and built.copy_from is None:
        built.tokenizer.save_pretrained(str(folder))
    elif built is not None or source is not None:
        files.copy_tokenizer(built.copy_from if built is not None else source, folder, processor=processor)
    if template is not None:
        files.write_chat_template(folder, template)


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
    With tokenizer settings the output's tokenizer is built (merge.tokenizer) and the embeddings and head have a
    row per token of it; chat_template is written into its tokenizer_config.json.
    """
    check_device(device)
    if max_shard_bytes < 1:
        raise ShoalError(f"shard size {max_shard_bytes} bytes: give a positive size")
    check_not_an_input(Path(out_dir), recipe)
    parents = open_parents(recipe)
    built = output_tokenizer(recipe, parents)
    plan: MergePlan = build_plan(recipe, parents, built.vocab if built else None)
    wants_tokenizer = copy_tokenizer or recipe.vocabulary is not None
    tokenizer_dir = _tokenizer_folder(recipe, parents, plan.reference) if wants_tokenizer and not built else None
    template = _chat_template(recipe, parents, plan.reference, wants_tokenizer)
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ModelFolderWriter(tmp, [job.spec for job in plan.jobs], max_shard_bytes)
        if on_tensor:
            on_tensor(0, len(plan.jobs))
        # three stages overlap: reading the next tensor, merging this one, writing the previous one
        try:
            scratch = Scratch()
            compiled = fused_pays(plan, recipe.merge_method, device)
            with ThreadPoolExecutor(max_workers=1) as write_pool:
                written: Future[None] | None = None
                for done, (job, (base, tensors)) in enumerate(prefetched(plan.jobs, parents, device), start=1):
                    merged = merge_tensor(job, recipe.merge_method, base, tensors, scratch, compiled)
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
        _write_tokenizer(tmp, built, tokenizer_dir, template, processor=parents[plan.reference].is_vlm)
        text = recipe_text or yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False)
        (tmp / RECIPE_FILE).write_text(text)
        card.write_model_card(
            tmp, name=out_dir.name, method=recipe.merge_method, parents=recipe.parents(), base=recipe.base_model,
            recipe_file=RECIPE_FILE, recipe_text=text,
            vision=plan.reference if parents[plan.reference].is_vlm else None, vision_merged=plan.copied_from is None,
        )
    return out_dir
