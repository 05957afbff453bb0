"""Where a tensor sits in a transformer: its layer index, or embeddings before / head after the layers.

Learnt from tensor names (``...layers.N.``, ``...h.N.``, ``...blocks.N.``), so Llama, Mistral, Qwen2,
GPT-2, Gemma and similar families work without a per-model table.
"""

from __future__ import annotations

import re
from typing import Literal

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings)")

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


def layer_names(names: list[str], index: int) -> list[str]:
    """Names of the tensors of one layer, in the order given."""
    return [n for n in names if layer_index(n) == index]
