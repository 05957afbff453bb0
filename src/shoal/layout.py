"""Where a tensor sits in a transformer: its layer, the embeddings before or the head after the layers, or outside
the language model altogether (a vision-language model's vision tower and projector).

Layers are learnt from tensor names (``...layers.N.``, ``...h.N.``, ``...blocks.N.``), so Llama, Mistral, Qwen2,
GPT-2, Gemma and similar families work without a per-model table. A vision-language model (VLM) keeps its
language model under a prefix that depends on its family and on the transformers version that saved it; `Names`
maps those names to *canonical* ones, the names a text-only LLM of the same architecture gives the same tensors
(``language_model.model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3.mlp.up_proj.weight``), and back; and,
for a recipe's ``modules:``, the names of a VLM's other modules (vision tower, projector) under mergekit's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from shoal.errors import ShoalError

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings)")
_POST_VISION = re.compile(r"(^|\.)post_layernorm\.")
_VOCABULARY = re.compile(r"(^|\.)(embed_tokens|embed_in|tok_embeddings|wte|word_embeddings|lm_head|embed_out)\.weight$")

Part = Literal["pre", "layer", "post"]


def layer_index(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match["index"]) if match else None


def with_layer(name: str, index: int) -> str:
    """The same tensor name in layer `index`."""
    match = _LAYER.match(name)
    if not match:
        raise ValueError(f"{name} is not a layer tensor")
    return f"{match['prefix']}.{index}.{match['rest']}"


def part(name: str, language_model: bool = True) -> Part:
    """Whether a tensor is in a layer, before the layers or after them. In a language model the embeddings are
    before and the rest after; in a vision tower or projector (language_model False) everything is before except a
    final norm (CLIP's and SigLIP's post_layernorm)."""
    if layer_index(name) is not None:
        return "layer"
    if not language_model:
        return "post" if _POST_VISION.search(name) else "pre"
    return "pre" if _PRE.search(name) else "post"


def is_vocabulary(name: str) -> bool:
    """Whether a (canonical) tensor has a row per token: the token embeddings or the LM head."""
    return layer_index(name) is None and bool(_VOCABULARY.search(name))


def layer_names(names: list[str], index: int) -> list[str]:
    """Names of the tensors of one layer, in the order given."""
    return [n for n in names if layer_index(n) == index]


# A layout is a list of (own prefix, canonical prefix) renames; a name under none of them is not the language
# model's. The first rename's prefix + "layers." must occur in a checkpoint for the layout to be its.
Layout = tuple[tuple[str, str], ...]
_LIVE = "model."
"""Where live models of transformers >= 4.52 keep a VLM's tensors outside the language model (checkpoints: at the
top)."""
_LLAVA: tuple[tuple[Layout, str], ...] = (
    ((("model.language_model.", "model."), ("lm_head.", "lm_head.")), _LIVE),
    ((("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")), ""),  # llava-hf checkpoints
)
_QWEN2_VL: tuple[tuple[Layout, str], ...] = (
    ((("model.language_model.", "model."), ("lm_head.", "lm_head.")), _LIVE),
    ((("model.", "model."), ("lm_head.", "lm_head.")), ""),  # checkpoints: vision under visual.*
)

TEXT_DECODER = "text_decoder"
"""mergekit's name for a VLM's language model, in a recipe's `modules:`."""
DEFAULT_MODULE = "default"
"""mergekit's name for the one module of a text-only LLM."""


def is_language_model(module: str) -> bool:
    """Whether a module name is the language model's (a VLM's text_decoder or a text-only LLM's default): a
    text-only parent of a VLM merge stands for the VLM's language model."""
    return module in (TEXT_DECODER, DEFAULT_MODULE)


Parts = tuple[tuple[str, tuple[str, ...]], ...]
"""A VLM's modules outside the language model, by mergekit's names: each with the checkpoint-name prefixes of its
tensors; a tensor belongs to the module with the longest prefix of its name."""
_LLAVA_PARTS: Parts = (("vision_tower", ("vision_tower.",)),
                       ("multi_modal_projector", ("multi_modal_projector.", "image_newline")))
_QWEN2_VL_PARTS: Parts = (("vision_tower", ("visual.",)), ("multi_modal_projector", ("visual.merger.",)))


@dataclass(frozen=True)
class Family:
    """A vision-language family shoal can merge: its layouts, newest first (each: the language model's renames and
    the prefix of the other tensors), its modules outside the language model, and its language model's type."""

    layouts: tuple[tuple[Layout, str], ...]
    parts: Parts
    text_model_type: str | None = None
    """The model_type of a text-only LLM of the same architecture; None: the text config's own model_type."""


FAMILIES: dict[str, Family] = {
    "llava": Family(_LLAVA, _LLAVA_PARTS),
    "llava_next": Family(_LLAVA, _LLAVA_PARTS),
    "qwen2_vl": Family(_QWEN2_VL, _QWEN2_VL_PARTS, "qwen2"),
    "qwen2_5_vl": Family(_QWEN2_VL, _QWEN2_VL_PARTS, "qwen2"),
}
"""VLM families by config.json model_type; each is tested on a tiny random model (tests/test_vlm_merge.py). Module
names are mergekit's: its qwen2_vl and qwen2_5_vl definitions' own; mergekit 0.1.5 defines no LLaVA, whose modules
take the names of its LLaVA-style definitions (mistral3, gemma3vl). LLaVA-NeXT's image_newline joins the projector."""


def is_multimodal(config: dict[str, Any]) -> bool:
    """Whether config.json describes a model with a language model inside (a text_config or a vision_config)."""
    return isinstance(config.get("text_config"), dict) or isinstance(config.get("vision_config"), dict)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a VLM's text_config (older Qwen2-VL configs keep it at the top), else config."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def set_dtype(config: dict[str, Any], name: str) -> None:
    """Record the weights' dtype (torch's name: float32, bfloat16...) in config under the key it has (torch_dtype,
    or dtype as newer transformers write it), and in a VLM's text_config where that has one."""
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
    text = text_config(config)
    for key in ("torch_dtype", "dtype"):
        if text is not config and key in text:
            text[key] = name


@dataclass(frozen=True)
class Names:
    """How one checkpoint (or live model) names its language model's tensors, against the canonical names.

    family is None for a text-only LLM, whose names are canonical already."""

    family: str | None
    renames: Layout = (("", ""),)
    outer: str = ""
    """The prefix this checkpoint gives the tensors outside the language model (_LIVE or none)."""
    others: tuple[str, ...] = ()
    """Canonical prefixes that belong to another module (a Names of one module, see of_module)."""

    def canonical(self, name: str) -> str | None:
        """The canonical name of one of this checkpoint's tensors; None for a tensor outside the language model
        (outside this module, for a Names of one module)."""
        for own, canon in self.renames:
            if name.startswith(own):
                name = canon + name[len(own):]
                return None if name.startswith(self.others) else name
        return None

    @property
    def text_module(self) -> str:
        """mergekit's name for the language model: text_decoder in a VLM, default in a text-only LLM."""
        return DEFAULT_MODULE if self.family is None else TEXT_DECODER

    @property
    def modules(self) -> list[str]:
        """mergekit's names for this model's modules: a text-only LLM's default, or a VLM's text_decoder and the
        rest."""
        parts = FAMILIES[self.family].parts if self.family is not None else ()
        return [self.text_module] + [name for name, _ in parts]

    def of_module(self, module: str) -> Names:
        """The names of one of this model's modules (a name in `modules`): canonical names are a checkpoint's (a
        transformers-saved file's), for the tensors outside the language model."""
        if is_language_model(module):
            return self
        if self.family is None or module not in self.modules:
            raise ValueError(f"{module!r} is not one of the modules {self.modules}")
        own = dict(FAMILIES[self.family].parts)[module]
        others = tuple(other for name, prefixes in FAMILIES[self.family].parts if name != module
                       for other in prefixes if other.startswith(own))  # visual.merger. is not the vision tower's
        return Names(self.family, tuple((self.outer + p, p) for p in own), self.outer, others)

    def module_of(self, name: str) -> str | None:
        """The module one of this checkpoint's tensors belongs to (None: none shoal knows)."""
        return next((m for m in self.modules if self.of_module(m).canonical(name) is not None), None)

    def own(self, canonical: str) -> str:
        """This checkpoint's name for a canonical language-model name."""
        for own, canon in self.renames:
            if canonical.startswith(canon):
                return own + canonical[len(canon):]
        raise ValueError(f"{canonical} is not a language-model tensor name")


def language_model(config: dict[str, Any], names: list[str], where: str = "the model") -> Names:
    """Where the language model of a checkpoint with this config.json and these tensor names sits.

    A multimodal model of a family not in FAMILIES is refused: its tensors might be matched wrongly."""
    if not is_multimodal(config):
        return Names(None)
    kind = str(config.get("model_type", "?"))
    arch = (config.get("architectures") or [kind])[0]
    if kind not in FAMILIES:
        raise ShoalError(
            f"{where} is a multimodal model ({arch}, model_type {kind!r}) of a family shoal cannot merge "
            f"(known: {', '.join(FAMILIES)})"
        )
    for renames, outer in FAMILIES[kind].layouts:
        if any(n.startswith(renames[0][0] + "layers.") for n in names):
            return Names(kind, renames, outer)
    expected = " or ".join(f"{renames[0][0]}layers.N." for renames, _ in FAMILIES[kind].layouts)
    raise ShoalError(f"{where} is a {kind} model but has no language-model layers (expected tensors named {expected})")


def text_model_type(config: dict[str, Any]) -> str:
    """The model_type of the (language) model, as a text-only LLM of the same architecture has it."""
    if not is_multimodal(config):
        return str(config.get("model_type", "?"))
    family = FAMILIES.get(str(config.get("model_type")))
    if family and family.text_model_type:
        return family.text_model_type
    return str(text_config(config).get("model_type", "llama"))  # transformers' default text_config for LLaVA
