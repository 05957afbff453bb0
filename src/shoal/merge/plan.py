"""Turn a recipe and its opened parents into one checked job per output tensor, before any data is read.

Parents are matched by their language models' canonical tensor names (`layout.Names`), so a vision-language
parent merges with text-only LLMs of its language model's architecture; the output then takes the VLM's names,
config and tensors outside the language model (vision tower, projector), those copied unchanged, unless the
recipe gives each module (mergekit's `modules:`) its own models or slices. A `models:` recipe that reads VLMs only
merges every module from those models, as mergekit 0.1.5 reads it.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from shoal import layout
from shoal.checkpoint.reader import Checkpoint
from shoal.checkpoint.writer import DTYPE_TAGS, TensorSpec
from shoal.errors import ShoalError
from shoal.merge.vocab import RowAlignment, Vocabulary, missing_source
from shoal.recipe import DTYPES, ModelEntry, Module, Parameters, Recipe, Slice, SliceSource, resolve

DTYPE_OF_TAG = {tag: dtype for dtype, tag in DTYPE_TAGS.items()}  # safetensors tag -> torch dtype


@dataclass(frozen=True)
class TensorInput:
    parent: str
    name: str


@dataclass
class TensorJob:
    """Everything needed to produce one output tensor."""

    spec: TensorSpec
    work_dtype: torch.dtype
    """The recipe's `dtype` (else the parents'): inputs are rounded to it before the float32 arithmetic, as in mergekit."""
    inputs: list[TensorInput]
    base: TensorInput | None
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]
    seeds: list[int]
    verbatim: bool = False
    """Copied from inputs[0] unchanged (cast to spec.dtype only): a VLM's tensors outside the language model."""
    rows: RowAlignment | None = None
    """For embeddings and head under a recipe's tokenizer settings: how the inputs' rows (base first) move onto
    the output vocabulary before the merge (None where they are its rows already)."""


@dataclass
class MergePlan:
    jobs: list[TensorJob]
    config: dict[str, Any]
    reference: str
    """The parent whose config, tensor names and tokenizer the output takes: the VLM when a parent is one."""
    copied_from: str | None = None
    """The VLM whose tensors outside the language model the output copies unchanged (None: there are none, or
    every module is merged)."""


def parse_dtype(name: str | None, what: str = "dtype") -> torch.dtype | None:
    """The dtype a recipe (or an option, `what`) names, as mergekit names them; None if not given."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ShoalError(f"unknown {what} {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class _Part:
    """What one module of the output is merged from: the models or slices of a plain recipe (its one module, the
    language model) or of one entry of its `modules:`."""

    module: str
    """mergekit's name: text_decoder (a VLM's language model), default (a text-only LLM), vision_tower, ..."""
    slices: list[Slice]
    parameters: Parameters | None
    """The module's parameters, between a slice's and the recipe's (None for a plain recipe)."""
    whole: bool
    """Merged from whole models (`models:`), not slices."""
    where: str
    """How errors name it: "" for a plain recipe, else "modules.NAME: "."""
    refs: tuple[str, ...] = ()
    """The models a module of a `modules:` recipe reads (see _module_refs); unused for a plain recipe."""


def _depth(ck: Checkpoint, module: str, ref: str) -> int:
    """How many layers one module of a parent has: the language model's from its config, a vision tower's from its
    tensor names (0: a projector)."""
    if layout.is_language_model(module):
        if ck.num_layers is None:
            raise ShoalError(f"{ref}: config.json does not say how many layers the model has")
        return ck.num_layers
    indices = [layout.layer_index(n) for n in ck.module_names(module)]
    return 1 + max((i for i in indices if i is not None), default=-1)


def _as_slices(recipe: Recipe, models: list[ModelEntry] | None, slices: list[Slice] | None,
               parents: dict[str, Checkpoint], module: str) -> list[Slice]:
    """A module's inputs as slices: its own, or one slice over the whole depth of each model (and of the base,
    for a method that merges it like the others)."""
    if slices:
        return slices
    assert models is not None
    text = layout.is_language_model(module)
    uses_base = recipe.method.base != "ignored"  # a base the method ignores (linear) says nothing of the depth
    reference = (recipe.base_model if text and uses_base else None) or models[0].model
    n = _depth(parents[reference], module, reference)
    models = list(models)
    if recipe.method.base == "included" and recipe.base_model and all(m.model != recipe.base_model for m in models):
        models.append(ModelEntry(model=recipe.base_model))
    # model_construct: a projector has no layers, a range (0, 0) that a recipe may not write
    sources = [SliceSource.model_construct(model=m.model, layer_range=(0, n), parameters=m.parameters) for m in models]
    return [Slice(sources=sources)]


def _parts(recipe: Recipe, parents: dict[str, Checkpoint]) -> list[_Part]:
    """The recipe's modules, each with the slices it is merged from; a plain recipe is one module, the language
    model. A `modules:` recipe must name every module of the parents' architecture, and no other; a module outside
    the language model merges VLMs only."""
    vlm = next((ck.lm for ck in parents.values() if ck.is_vlm), None)
    names = vlm or layout.Names(None)
    if recipe.modules is None:
        slices = _as_slices(recipe, recipe.models, recipe.slices, parents, names.text_module)
        return [_Part(names.text_module, slices, None, bool(recipe.models), "")]
    what = f"a {vlm.family} model" if vlm else "a text-only model"
    known = ", ".join(names.modules)
    unknown = [m for m in recipe.modules if m not in names.modules]
    if unknown:
        raise ShoalError(f"modules: {unknown[0]!r} is not a module of {what} (its modules: {known})")
    missing = [m for m in names.modules if m not in recipe.modules]
    if missing:
        raise ShoalError(
            f"modules: the recipe leaves out {', '.join(missing)} of {what} (its modules: {known}); mergekit 0.1.5 "
            "would write the merge without those tensors, a model that does not load: give every module its models "
            "or slices (a models: recipe with a text LLM among its models merges the language model and keeps the rest "
            "of the VLM; one of VLMs only merges every module)"
        )
    parts = []
    for module in names.modules:
        entry = recipe.modules[module]
        where = f"modules.{module}: "
        refs = tuple(_module_refs(recipe, entry))
        if module != names.text_module:
            for ref in refs:
                if not parents[ref].is_vlm:
                    base = " (the recipe's base_model, every module's base unless a slice gives its own)" \
                        if ref == recipe.base_model else ""
                    raise ShoalError(f"{where}{ref}{base} is a text-only model ({parents[ref].architecture}), which "
                                     f"has no {module}; this module merges {vlm.family} models only")
        slices = _as_slices(recipe, entry.models, entry.slices, parents, module)
        parts.append(_Part(module, slices, entry.parameters, bool(entry.models), where, refs))
    return parts


def _module_refs(recipe: Recipe, entry: Module) -> list[str]:
    """The models one module of a recipe reads: its models or slices' sources, and the base if the method uses one."""
    refs = [e.model for e in entry.models or []] + [s.model for piece in entry.slices or [] for s in piece.sources]
    if recipe.method.base != "ignored":
        refs += [piece.base_model or recipe.base_model for piece in entry.slices] if entry.slices else \
            [recipe.base_model]
    return [ref for ref in dict.fromkeys(refs) if ref is not None]


def _check_architectures(parents: dict[str, Checkpoint]) -> None:
    vlms = {ref: ck for ref, ck in parents.items() if ck.is_vlm}  # refuses a VLM family shoal does not know
    archs = {ref: ck.architecture for ref, ck in parents.items() if ref not in vlms}
    if len(set(archs.values())) > 1:
        listed = ", ".join(f"{ref} is {arch}" for ref, arch in archs.items())
        raise ShoalError(f"parents have different architectures: {listed}")
    if not vlms:
        return
    families = {ref: ck.architecture for ref, ck in vlms.items()}
    if len(set(families.values())) > 1:
        listed = ", ".join(f"{ref} is {arch}" for ref, arch in families.items())
        raise ShoalError(f"vision-language parents of different families: {listed}")
    kinds = {ref: layout.text_model_type(ck.config) for ref, ck in parents.items()}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(
            f"{ref} is {'a VLM whose language model is ' if ref in vlms else ''}{kind}" for ref, kind in kinds.items()
        )
        raise ShoalError(f"parents have different language-model architectures: {listed}")


def _check_sizes(parents: dict[str, Checkpoint], whole_models: bool) -> None:
    """The language models agree in width, and in depth when whole models are merged (not slices)."""
    keys = [("hidden_size", "n_embd")] + ([("num_hidden_layers", "n_layer")] if whole_models else [])
    for names in keys:
        sizes = {}
        for ref, ck in parents.items():
            size = next((ck.text_config[k] for k in names if k in ck.text_config), None)
            if size is not None:
                sizes[ref] = size
        first, first_size = next(iter(sizes.items()), (None, None))
        for ref, size in sizes.items():
            if size != first_size:
                what = "layer count (num_hidden_layers)" if names[0] == "num_hidden_layers" else names[0]
                raise ShoalError(
                    f"the parents' language models differ in {what}: {first} has {first_size}, {ref} has {size}"
                )


def _check_same_tensors(parents: dict[str, Checkpoint], reference: str, module: str, where: str = "") -> None:
    """The parents have the same tensors in one module (the language model of a plain recipe)."""
    ref_names = set(parents[reference].module_names(module))
    for ref, ck in parents.items():
        names = set(ck.module_names(module))
        missing = sorted(ref_names - names)
        extra = sorted(names - ref_names)
        if missing:
            raise ShoalError(f"{where}tensor {ck.lm.of_module(module).own(missing[0])} is missing in parent {ref} "
                             f"(present in {reference})")
        if extra:
            raise ShoalError(f"{where}tensor {parents[reference].lm.of_module(module).own(extra[0])} is missing in "
                             f"parent {reference} (present in {ref})")


def _output_parent(recipe: Recipe, parents: dict[str, Checkpoint], first_ref: str) -> str:
    """The parent the output is a copy of, outside the merged tensors: the base if it is a VLM, else the first
    VLM, else first_ref."""
    vlms = [ref for ref in recipe.parents() if parents[ref].is_vlm]
    if not vlms:
        return first_ref
    return recipe.base_model if recipe.base_model in vlms else vlms[0]


def _seed(seed: int, name: str, i: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{i}".encode())


def _job(
    recipe: Recipe,
    parents: dict[str, Checkpoint],
    part: _Part,
    piece: Slice,
    out_name: str,
    src_names: list[str],
    t: float,
    out_dtype: torch.dtype | None,
    work_dtype: torch.dtype | None,
    out_names: layout.Names,
    vocab: Vocabulary | None,
) -> TensorJob:
    """The job of one tensor of a module (the language model of a plain recipe); out_name and src_names are
    canonical names (filters, gradients and DARE seeds see those), turned into each parent's own names and the
    output's."""
    own = lambda ref, name: parents[ref].lm.of_module(part.module).own(name)
    method = recipe.method
    base_ref = piece.base_model or recipe.base_model
    entries = list(zip(piece.sources, src_names))
    base: TensorInput | None = None
    if method.base == "required" or (method.base == "optional" and base_ref is not None):
        assert base_ref is not None
        base_name = next((n for s, n in entries if s.model == base_ref), src_names[0])
        base = TensorInput(base_ref, own(base_ref, base_name))
        entries = [(s, n) for s, n in entries if s.model != base_ref]
    if not method.min_inputs <= len(entries) <= (method.max_inputs or len(entries)):
        most = method.max_inputs if method.max_inputs is not None else "any"
        raise ShoalError(
            f"{part.where}{method.name} takes {method.min_inputs} to {most} models besides the base, got {len(entries)}"
        )
    inputs = [TensorInput(s.model, own(s.model, n)) for s, n in entries]
    for tin in inputs + ([base] if base else []):
        if tin.name not in parents[tin.parent].tensors:
            raise ShoalError(f"tensor {tin.name} is missing in parent {tin.parent}")
    shapes = [(tin.parent, parents[tin.parent].shape(tin.name)) for tin in ([base] if base else []) + inputs]
    rows = None
    out_shape = tuple(shapes[0][1])
    if vocab is not None and layout.is_vocabulary(out_name):
        rows = _row_alignment(out_name, shapes, vocab, base_ref)
        out_shape = (vocab.size, *out_shape[1:])
        shapes = [(ref, shape[1:]) for ref, shape in shapes]
    for ref, shape in shapes[1:]:
        if shape != shapes[0][1]:
            vlm = any(ck.is_vlm for ck in parents.values())  # whose tokenizer a recipe cannot change
            if layout.is_vocabulary(out_name) and shape[1:] == shapes[0][1][1:] and not vlm:
                raise ShoalError(
                    f"the parents' vocabularies differ: {out_name} has {shapes[0][1][0]} rows in {shapes[0][0]} but "
                    f"{shape[0]} in {ref}; set tokenizer_source (union, base or a model; in a search file: union, "
                    "base or a parent's name) to align their rows to one tokenizer"
                )
            raise ShoalError(
                f"tensor {out_name} has shape {tuple(shapes[0][1])} in {shapes[0][0]} but {tuple(shape)} in {ref}"
            )
    first = base or inputs[0]
    src_dtype = DTYPE_OF_TAG[parents[first.parent].dtype(first.name)]
    floating = src_dtype.is_floating_point
    dtype = out_dtype if out_dtype is not None and floating else src_dtype
    sources_of = lambda src: [src.parameters, piece.parameters, part.parameters, recipe.parameters]
    per_model: list[dict[str, Any]] = [
        {p: resolve(p, sources_of(s), out_name, t, d) for p, d in method.per_model.items()} for s, _ in entries
    ]
    shared_sources: list[Parameters | None] = [piece.parameters, part.parameters, recipe.parameters]
    shared = {p: resolve(p, shared_sources, out_name, t, d) for p, d in method.shared.items()}
    for params in per_model:
        if "density" in params and not 0 < params["density"] <= 1:
            raise ShoalError(f"density for tensor {out_name} is {params['density']}, outside (0, 1]")
        if method.sparsify == "magprune" and params["density"] < 1:
            density, epsilon = params["density"], params["epsilon"]
            if not (density - epsilon > 0 and density + epsilon < 1):
                raise ShoalError(
                    f"epsilon for tensor {out_name} is {epsilon} with density {density}: {method.name} keeps entries "
                    f"with probabilities from density - epsilon to density + epsilon, which must lie in (0, 1)"
                )
    if method.name == "linear" and floating and shared["normalize"] and sum(p["weight"] for p in per_model) == 0:
        raise ShoalError(f"weights for tensor {out_name} sum to 0 with normalize: true, and linear divides by their "
                         "sum; give other weights, or normalize: false")
    return TensorJob(
        spec=TensorSpec(out_names.own(out_name), out_shape, dtype),
        work_dtype=work_dtype if work_dtype is not None and floating else src_dtype,
        inputs=inputs,
        base=base,
        per_model=per_model,
        shared=shared,
        seeds=[_seed(recipe.seed, out_name, i) for i in range(len(inputs))],
        rows=rows,
    )


def _row_alignment(
    out_name: str, shapes: list[tuple[str, tuple[int, ...]]], vocab: Vocabulary, base_ref: str | None
) -> RowAlignment | None:
    """How one vocabulary tensor's inputs (parent, shape; the base's first) align to the output vocabulary."""
    refs = tuple(ref for ref, _ in shapes)
    lengths = [shape[0] for _, shape in shapes]
    if vocab.is_identity(refs, lengths):
        return None
    how = RowAlignment(vocab, refs, base_ref if base_ref in refs else None)
    for token, source in vocab.sources.items():
        if source is not None and source.parent is not None and source.parent not in refs:
            raise ShoalError(f"tokenizer.tokens[{vocab.names[token]!r}] takes its row from {source.parent}, which "
                             f"is not an input of {out_name}")
    unset = missing_source(how, lengths)
    if unset is not None:
        raise ShoalError(
            f"tokenizer.tokens[{vocab.names[unset[0]]!r}] has no source, but {unset[1]} needs one for its {out_name} "
            "row (it lacks the token, or force is set); give source: a parent, {kind: model_token, ...} or "
            "{kind: zero}"
        )
    return how


def _copy_job(ref: str, parent: Checkpoint, name: str, out_dtype: torch.dtype | None) -> TensorJob:
    src_dtype = DTYPE_OF_TAG[parent.dtype(name)]
    dtype = out_dtype if out_dtype is not None and src_dtype.is_floating_point else src_dtype
    return TensorJob(
        spec=TensorSpec(name, tuple(parent.shape(name)), dtype), work_dtype=src_dtype, inputs=[TensorInput(ref, name)],
        base=None, per_model=[], shared={}, seeds=[], verbatim=True,
    )


def output_config(
    reference: Checkpoint, layer_sources: list[int], dtype: torch.dtype | None, vocab_size: int | None = None
) -> dict[str, Any]:
    """The reference's config.json with the layer count (of a VLM's text_config), vocabulary size and dtype of the
    output."""
    config = copy.deepcopy(reference.config)
    text = layout.text_config(config)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    n_in = reference.num_layers
    if n_in is not None and len(layer_sources) != n_in:
        for key, value in list(text.items()):
            if isinstance(value, list) and len(value) == n_in:
                text[key] = [value[i] for i in layer_sources]
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in text:
                text[key] = len(layer_sources)
    if dtype is not None:
        layout.set_dtype(config, str(dtype).removeprefix("torch."))
    return config


def build_plan(recipe: Recipe, parents: dict[str, Checkpoint], vocab: Vocabulary | None = None) -> MergePlan:
    """Every output tensor's job, in file order (embeddings, layers, head, then a VLM's tensors outside the
    language model: copied, or merged module by module by a `modules:` recipe), checked for names and shapes; with
    vocab (the output tokenizer's, when the recipe names one) the embeddings and head have its rows."""
    work_dtype = parse_dtype(recipe.dtype)
    out_dtype = parse_dtype(recipe.out_dtype) or work_dtype
    _check_architectures(parents)
    recipe = _every_module(recipe, parents)
    parts = _parts(recipe, parents)
    text = parts[0]
    first_ref = recipe.base_model if text.whole and recipe.base_model else text.slices[0].sources[0].model
    out_ref = _output_parent(recipe, parents, first_ref)
    reference = parents[out_ref]
    text_parents = {ref: parents[ref] for ref in dict.fromkeys([out_ref, *text.refs])}
    _check_sizes(text_parents if recipe.modules else parents, whole_models=text.whole)
    if recipe.modules is not None:
        stray = next((n for n in reference.names if reference.lm.module_of(n) is None), None)
        if stray is not None:
            raise ShoalError(f"tensor {stray} of {out_ref} is in none of the modules shoal knows for its architecture "
                             f"({', '.join(reference.lm.modules)}), so merging module by module cannot place it")
    jobs: list[TensorJob] = []
    layer_sources: list[int] = []
    for part in parts:
        if part.whole and recipe.modules is None:
            _check_same_tensors(parents, first_ref, part.module)
        elif part.whole:
            group = {ref: parents[ref] for ref in part.refs}
            first = recipe.base_model if recipe.base_model in group else part.slices[0].sources[0].model
            _check_same_tensors(group, first, part.module, part.where)
        if part is not text:
            _check_depth(part, reference, out_ref)
        module_jobs, sources = _module_jobs(recipe, parents, part, out_ref, out_dtype, work_dtype,
                                            vocab if part is text else None)
        if part is text:
            layer_sources = sources
        else:
            _check_fits(part, module_jobs, reference, out_ref)
        jobs += module_jobs
    copied = recipe.modules is None and bool(reference.extra_names)
    if copied:
        jobs += [_copy_job(out_ref, reference, name, out_dtype) for name in reference.extra_names]
    config = output_config(reference, layer_sources, out_dtype, vocab.size if vocab else None)
    return MergePlan(jobs=jobs, config=config, reference=out_ref, copied_from=out_ref if copied else None)


def _every_module(recipe: Recipe, parents: dict[str, Checkpoint]) -> Recipe:
    """A `models:` recipe whose models (and base, if its method uses one) are all VLMs, as the `modules:` recipe that
    merges each module of theirs from those models (mergekit 0.1.5 reads it so); any other recipe as it is. With a
    text-only LLM among the models, only the language model can be merged, and the rest is a VLM's, unchanged."""
    if recipe.modules is not None or not recipe.models:
        return recipe
    refs = [entry.model for entry in recipe.models]
    if recipe.method.base != "ignored" and recipe.base_model:
        refs.append(recipe.base_model)
    vlms = [parents[ref] for ref in dict.fromkeys(refs) if parents[ref].is_vlm]
    if len(vlms) < len(dict.fromkeys(refs)) or len(vlms[0].lm.modules) < 2:
        return recipe
    first = vlms[0]
    for other in vlms[1:]:
        differ = next((n for n in first.extra_names if n in other.names and first.shape(n) != other.shape(n)), None)
        if differ is not None:
            raise ShoalError(
                f"{first.path.name} and {other.path.name} are VLMs of other vision shapes ({differ}: "
                f"{tuple(first.shape(differ))} and {tuple(other.shape(differ))}); a models: recipe of VLMs only merges "
                "every module, as mergekit does. To merge their language models and keep one VLM's vision parts, give "
                "a modules: recipe whose vision_tower and multi_modal_projector are slices of that VLM alone (with it "
                "as their base_model if the method uses one)")
    modules = {module: Module(models=recipe.models) for module in first.lm.modules}
    return recipe.model_copy(update={"models": None, "modules": modules})


def _module_jobs(
    recipe: Recipe,
    parents: dict[str, Checkpoint],
    part: _Part,
    out_ref: str,
    out_dtype: torch.dtype | None,
    work_dtype: torch.dtype | None,
    vocab: Vocabulary | None,
) -> tuple[list[TensorJob], list[int]]:
    """The jobs of one module's tensors (those before its layers, the layers slice by slice, those after), and the
    source layer of each output layer."""
    out_names = parents[out_ref].lm.of_module(part.module)
    language_model = layout.is_language_model(part.module)
    jobs: list[TensorJob] = []

    def job(piece: Slice, out: str, src: list[str], t: float) -> TensorJob:
        return _job(recipe, parents, part, piece, out, src, t, out_dtype, work_dtype, out_names, vocab)

    def outer(piece: Slice, wanted: str) -> None:
        for name in parents[piece.sources[0].model].module_names(part.module):
            if layout.part(name, language_model) == wanted:
                jobs.append(job(piece, name, [name] * len(piece.sources), 0.0))

    outer(part.slices[0], "pre")
    out_layer = 0
    layer_sources: list[int] = []
    for piece in part.slices:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in piece.sources}
        if len(lengths) != 1:
            raise ShoalError(f"{part.where}all sources of a slice must span the same number of layers")
        length = lengths.pop()
        for src in piece.sources:
            ck = parents[src.model]
            n = ck.num_layers if language_model else _depth(ck, part.module, src.model)
            if n is not None and src.layer_range[1] > n:
                raise ShoalError(f"{part.where}layer_range {list(src.layer_range)} is beyond the {n} layers of "
                                 f"{src.model}" + ("" if language_model else f"'s {part.module}"))
        names = parents[piece.sources[0].model].module_names(part.module)
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            first = piece.sources[0].layer_range[0] + offset
            for name in layout.layer_names(names, first):
                src_names = [layout.with_layer(name, s.layer_range[0] + offset) for s in piece.sources]
                jobs.append(job(piece, layout.with_layer(name, out_layer), src_names, t))
            layer_sources.append(first)
            out_layer += 1
    outer(part.slices[-1], "post")
    return jobs, layer_sources


def _check_depth(part: _Part, reference: Checkpoint, ref: str) -> None:
    """A module outside the language model keeps the depth it has in reference, whose config the output takes."""
    depth = _depth(reference, part.module, ref)
    layers = sum(piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0] for piece in part.slices)
    if layers != depth:
        made = f"{layers} layer" + ("" if layers == 1 else "s")
        raise ShoalError(f"{part.where}the slices make {made}, but the output takes {ref}'s config, whose "
                         f"{part.module} has {depth}; shoal keeps a {part.module}'s depth (its config would change)")


def _check_fits(part: _Part, jobs: list[TensorJob], reference: Checkpoint, ref: str) -> None:
    """A merged module outside the language model fits the output's config, which is reference's: the same tensors
    and shapes (shoal changes no vision config)."""
    wanted = {name: reference.shape(name) for name in reference.names if reference.lm.module_of(name) == part.module}
    made = {job.spec.name: job.spec.shape for job in jobs}
    for name in sorted(wanted.keys() ^ made.keys()):
        where = "the merge lacks it" if name in wanted else f"{ref} lacks it"
        raise ShoalError(f"{part.where}tensor {name}: {where}, and the output takes {ref}'s config and tensor names")
    for name, shape in made.items():
        if tuple(shape) != tuple(wanted[name]):
            raise ShoalError(f"{part.where}tensor {name} merges to shape {tuple(shape)}, but {ref}, whose config the "
                             f"output takes, has {tuple(wanted[name])}")


def input_bytes(job: TensorJob, parents: dict[str, Checkpoint]) -> int:
    """The bytes of a job's inputs as read from the parents' files (from their headers)."""
    return sum(math.prod(parents[tin.parent].shape(tin.name))
               * DTYPE_OF_TAG[parents[tin.parent].dtype(tin.name)].itemsize
               for tin in ([job.base] if job.base else []) + list(job.inputs))
