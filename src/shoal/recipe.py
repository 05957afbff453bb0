"""Merge recipes in mergekit's YAML format: parsing with line-numbered errors, and parameter resolution."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal import yamlfile
from shoal.checkpoint.reference import parse_reference
from shoal.errors import ShoalError, ShoalWarning
from shoal.merge import chat_template
from shoal.merge.registry import METHODS, PARAMETER_NAMES, RANGES, REQUIRED, MergeMethod

Scalar = Union[bool, int, float, str]
Value = Union[Scalar, list[Scalar]]


class Conditional(BaseModel):
    """A value that applies to tensors whose name contains filter (mergekit's conditional parameter)."""

    model_config = ConfigDict(extra="forbid")
    value: Value
    filter: str | None = None


Setting = Union[Value, Conditional, list[Conditional]]
Parameters = dict[str, Setting]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None
    """Accepted as mergekit 0.1.5 accepts it, which reads it nowhere: it changes nothing (a warning says so)."""


class Module(BaseModel):
    """One entry of a recipe's `modules:` (mergekit's OutputModuleDefinition): the models or slices that one part of
    the model (e.g. a VLM's text_decoder or vision_tower) is merged from, and parameters that rank between a
    slice's and the recipe's."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "Module":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of models or slices (as mergekit requires of a module)")
        return self


class ModelToken(BaseModel):
    """A token's row taken from one model's own row of another token (by text or id)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> "ModelToken":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class ZeroToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    """Where one output token's row comes from for a parent that lacks the token (every parent with force)."""

    model_config = ConfigDict(extra="forbid")
    source: ModelToken | ZeroToken | str | None = None
    """A parent (its row of this token), a model_token, zero; None: mergekit's default, allowed only while no
    parent needs it."""
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's `tokenizer:` section."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
"""The dtypes a recipe may name, as mergekit names them."""


def known_dtype(name: str | None) -> str | None:
    """name, where it is one of DTYPES (a field validator's check: the error gets the file and line)."""
    if name is not None and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return name


class Recipe(BaseModel):
    """A mergekit-format recipe. `seed` (shoal's addition, ignored by mergekit) fixes every random draw."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    """Instead of models or slices: per module of the architecture (shoal.layout.module_names), its own models or
    slices and parameters; one merge_method and base_model for all."""
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    """union, base or a model: the output's vocabulary, every parent's embedding and head rows aligned to it."""
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    """auto, a built-in template's name (shoal.merge.chat_template.BUILT_IN) or Jinja text."""
    seed: int = 0

    _known_dtypes = field_validator("dtype", "out_dtype")(known_dtype)

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    @property
    def vocabulary(self) -> TokenizerSection | None:
        """The tokenizer settings, whichever way given (`tokenizer_source: X` is `tokenizer: {source: X}`); None:
        the parents' rows are merged as they are."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerSection(source=self.tokenizer_source) if self.tokenizer_source is not None else None

    def inputs(self) -> list[tuple[tuple[str, ...], list[ModelEntry] | None, list[Slice] | None]]:
        """Where the recipe lists its inputs, with its models or slices: the recipe itself at key path (), or each
        module at ("modules", NAME)."""
        if self.modules is not None:
            return [(("modules", name), m.models, m.slices) for name, m in self.modules.items()]
        return [((), self.models, self.slices)]

    def model_places(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every model string of the recipe with its place (a key path): base_model, models, slices (the recipe's or
        its modules'), and the tokenizer's source and tokens' sources where they name a model (not union or base)."""
        places: list[tuple[tuple[str | int, ...], object]] = [(("base_model",), self.base_model)]
        for at, models, slices in self.inputs():
            places += [((*at, "models", i, "model"), entry.model) for i, entry in enumerate(models or [])]
            for i, piece in enumerate(slices or []):
                places.append(((*at, "slices", i, "base_model"), piece.base_model))
                places += [((*at, "slices", i, "sources", j, "model"), src.model)
                           for j, src in enumerate(piece.sources)]
        if self.tokenizer_source not in ("union", "base"):
            places.append((("tokenizer_source",), self.tokenizer_source))
        if self.tokenizer is not None:
            if self.tokenizer.source not in ("union", "base"):
                places.append((("tokenizer", "source"), self.tokenizer.source))
            for token, setting in (self.tokenizer.tokens or {}).items():
                if isinstance(setting.source, ModelToken):
                    places.append((("tokenizer", "tokens", token, "source", "model"), setting.source.model))
                else:
                    places.append((("tokenizer", "tokens", token, "source"), setting.source))
        return [(loc, ref) for loc, ref in places if isinstance(ref, str)]

    def parents(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        refs = [self.base_model] if self.base_model else []
        for _, models, slices in self.inputs():
            refs.extend(entry.model for entry in models or [])
            for piece in slices or []:
                refs.extend(s.model for s in piece.sources)
                if piece.base_model:
                    refs.append(piece.base_model)
        return list(dict.fromkeys(refs))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate a recipe; every problem is a ShoalError naming the file and line."""
    return validate_recipe(*yamlfile.parse(text, source), source)


def validate_recipe(data: Any, node: yaml.Node | None, source: str) -> Recipe:
    """Validate one parsed YAML document as a recipe; every problem is a ShoalError naming the file and line."""
    recipe = yamlfile.validate(
        Recipe, data, node, source,
        "a recipe is a YAML mapping with at least merge_method and models, slices or modules"
    )
    _check(recipe, node, source)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ShoalError(f"recipe {path} not found")
    return parse_recipe(yamlfile.read_text(path), str(path))


FLOAT32_MAX = 3.4028234663852886e38
"""Merges compute in float32 (at least): a parameter beyond this cannot even be converted."""


def _values(setting: Setting) -> list[Scalar]:
    """Every value a setting holds, through filters and gradients."""
    if isinstance(setting, Conditional):
        return _values(setting.value)
    if isinstance(setting, list):
        return [v for item in setting for v in _values(item)]
    return [setting]


def _value_error(method: MergeMethod, name: str, setting: Setting) -> str | None:
    """What is wrong with a parameter's values for method (a wrong type, a number that is not finite or out of
    its range), or None."""
    values = _values(setting)
    if method.kind(name) == "bool":
        bad = next((v for v in values if not isinstance(v, bool)), None)
        return None if bad is None else f"{name} must be true or false, got {bad!r}"
    bad = next((v for v in values if isinstance(v, (bool, str))), None)
    if bad is not None:
        return f"{name} must be a number, got {bad!r}"
    shown = values[0] if len(values) == 1 else values
    if any(not math.isfinite(v) or abs(v) > FLOAT32_MAX for v in values):
        return f"{name} must be a finite number (|x| <= 3.4e38), got {shown}"
    check, text = RANGES.get(name, (lambda v: True, ""))
    if any(not check(float(v)) for v in values):
        return f"{name} must be in {text}, got {shown}"
    return None


def _check_references(recipe: Recipe, node: yaml.Node, source: str) -> None:
    """Every model string is of mergekit's form MODEL[@REVISION][+ADAPTER[@REVISION]]."""
    for loc, ref in recipe.model_places():
        try:
            parse_reference(ref)
        except ShoalError as exc:
            raise ShoalError(f"{source}:{yamlfile.line_of(node, loc)}: {exc}") from None


def _check(recipe: Recipe, node: yaml.Node, source: str) -> None:
    if recipe.merge_method not in METHODS:
        known = ", ".join(sorted(METHODS))
        where = f"{source}:{yamlfile.line_of(node, ('merge_method',))}"
        raise ShoalError(f"{where}: unknown merge_method {recipe.merge_method!r} (known: {known})")
    if [bool(recipe.models), bool(recipe.slices), bool(recipe.modules)].count(True) != 1:
        raise ShoalError(f"{source}: give exactly one of `models`, `slices` or `modules` (a non-empty list or "
                         "mapping)")
    if recipe.tokenizer_source is not None and recipe.tokenizer is not None:
        where = f"{source}:{yamlfile.line_of(node, ('tokenizer',))}"
        raise ShoalError(f"{where}: give tokenizer_source or a tokenizer section, not both")
    if recipe.chat_template is not None:
        problem = chat_template.problem(recipe.chat_template)
        if problem:
            raise ShoalError(f"{source}:{yamlfile.line_of(node, ('chat_template',))}: chat_template: {problem}")
    _check_references(recipe, node, source)
    method = recipe.method
    slices_have_bases = all(slices and all(s.base_model for s in slices) for _, _, slices in recipe.inputs())
    if method.base == "required" and not recipe.base_model and not slices_have_bases:
        raise ShoalError(f"{source}: merge_method {method.name} needs base_model")
    groups: list[tuple[tuple[Any, ...], Parameters | None]] = [(("parameters",), recipe.parameters)]
    groups += [(("modules", name, "parameters"), m.parameters) for name, m in (recipe.modules or {}).items()]
    for at, models, slices in recipe.inputs():
        for i, entry in enumerate(models or []):
            groups.append(((*at, "models", i, "parameters"), entry.parameters))
        for i, piece in enumerate(slices or []):
            groups.append(((*at, "slices", i, "parameters"), piece.parameters))
            for j, src in enumerate(piece.sources):
                groups.append(((*at, "slices", i, "sources", j, "parameters"), src.parameters))
            if piece.residual_weight is not None:
                where = f"{source}:{yamlfile.line_of(node, (*at, 'slices', i, 'residual_weight'))}"
                warnings.warn(f"{where}: residual_weight changes nothing: mergekit 0.1.5 accepts it but reads it "
                              "nowhere; ignored, so the output is the same without it", ShoalWarning, stacklevel=3)
    for loc, params in groups:
        for name, setting in (params or {}).items():
            where = f"{source}:{yamlfile.line_of(node, loc + (name,))}"
            if name not in method.parameters:
                known = ", ".join(sorted(method.parameters)) or "none"
                if name not in PARAMETER_NAMES:
                    raise ShoalError(f"{where}: unknown parameter {name!r} for {method.name} (known: {known}); no "
                                     "merge method takes it")
                warnings.warn(f"{where}: {method.name} does not use parameter {name!r} (it takes: {known}); "
                              "ignored, as mergekit ignores it", ShoalWarning, stacklevel=3)
                continue
            problem = _value_error(method, name, setting)
            if problem:
                raise ShoalError(f"{where}: {problem}")


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor: filters pick by substring, gradient lists interpolate at t in [0, 1]."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(s, Conditional) for s in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, tensor_name, t)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    return setting


def resolve(
    name: str, sources: list[Parameters | None], tensor_name: str, t: float, default: Any
) -> Any:
    """The first value found for parameter `name`, from the most specific source to the least, else default."""
    for params in sources:
        if params and name in params:
            value = evaluate(params[name], tensor_name, t)
            if value is not None:
                return value
    if default is REQUIRED:
        raise ShoalError(f"parameter {name!r} is required but not set for tensor {tensor_name}")
    return default
