"""Load a model folder as a live transformers model of its own kind: a causal LM, or a vision-language model."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal import layout
from shoal.errors import ShoalError


def is_vlm_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and layout.is_multimodal(json.loads(config.read_text()))


def load_live(path: str | Path, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (a VLM by its image-text-to-text class) and its tokenizer, in the dtype the folder stores.

    A VLM answers text-only prompts through its language model, so text tasks score it as they score an LLM."""
    if not is_vlm_folder(path):
        from shoal.evaluate.runner import load_model

        return load_model(path, device)
    from transformers import AutoModelForImageTextToText

    from shoal.evaluate.runner import load_tokenizer

    try:
        model = AutoModelForImageTextToText.from_pretrained(Path(path), dtype="auto").to(device)
    except (OSError, ValueError) as exc:
        raise ShoalError(f"{path}: cannot load the vision-language model ({exc})") from exc
    return model, load_tokenizer(path)
