"""Where a tensor sits in a transformer: its layer, the embeddings before or the head after the layers, or outside
the language model altogether (a vision-language model's vision tower and projector).

Layers are learnt from tensor names (``...layers.N.``, ``...h.N.``, ``...blocks.N.``), so Llama, Mistral, Qwen2,
GPT-2, Gemma and similar families work without a per-model table. A vision-language model (VLM) keeps its
language model under a prefix that depends on its family and on the transformers version that saved it; `Names`
maps those names to *canonical* ones, the names a text-only LLM of the same architecture gives the same tensors
(``language_model.model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3.mlp.up_proj.weight``), and back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from shoal.errors import ShoalError

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings)")
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


def part(name: str) -> Part:
    if layer_index(name) is not None:
        return "layer"
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
_LLAVA: tuple[Layout, ...] = (
    (("model.language_model.", "model."), ("lm_head.", "lm_head.")),  # live models of transformers >= 4.52
    (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),  # llava-hf checkpoints
)
_QWEN2_VL: tuple[Layout, ...] = (
    (("model.language_model.", "model."), ("lm_head.", "lm_head.")),  # live models of transformers >= 4.52
    (("model.", "model."), ("lm_head.", "lm_head.")),  # checkpoints: vision under visual.*
)


@dataclass(frozen=True)
class Family:
    """A vision-language family shoal can merge: its layouts, newest first, and its language model's type."""

    layouts: tuple[Layout, ...]
    text_model_type: str | None = None
    """The model_type of a text-only LLM of the same architecture; None: the text config's own model_type."""


FAMILIES: dict[str, Family] = {
    "llava": Family(_LLAVA),
    "llava_next": Family(_LLAVA),
    "qwen2_vl": Family(_QWEN2_VL, "qwen2"),
    "qwen2_5_vl": Family(_QWEN2_VL, "qwen2"),
}
"""VLM families by config.json model_type; each is tested on a tiny random model (tests/test_vlm_merge.py)."""


def is_multimodal(config: dict[str, Any]) -> bool:
    """Whether config.json describes a model with a language model inside (a text_config or a vision_config)."""
    return isinstance(config.get("text_config"), dict) or isinstance(config.get("vision_config"), dict)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a VLM's text_config (older Qwen2-VL configs keep it at the top), else config."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


@dataclass(frozen=True)
class Names:
    """How one checkpoint (or live model) names its language model's tensors, against the canonical names.

    family is None for a text-only LLM, whose names are canonical already."""

    family: str | None
    renames: Layout = (("", ""),)

    def canonical(self, name: str) -> str | None:
        """The canonical name of one of this checkpoint's tensors; None for a tensor outside the language model."""
        for own, canon in self.renames:
            if name.startswith(own):
                return canon + name[len(own):]
        return None

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
    for renames in FAMILIES[kind].layouts:
        if any(n.startswith(renames[0][0] + "layers.") for n in names):
            return Names(kind, renames)
    expected = " or ".join(f"{layout[0][0]}layers.N." for layout in FAMILIES[kind].layouts)
    raise ShoalError(f"{where} is a {kind} model but has no language-model layers (expected tensors named {expected})")


def text_model_type(config: dict[str, Any]) -> str:
    """The model_type of the (language) model, as a text-only LLM of the same architecture has it."""
    if not is_multimodal(config):
        return str(config.get("model_type", "?"))
    family = FAMILIES.get(str(config.get("model_type")))
    if family and family.text_model_type:
        return family.text_model_type
    return str(text_config(config).get("model_type", "llama"))  # transformers' default text_config for LLaVA
