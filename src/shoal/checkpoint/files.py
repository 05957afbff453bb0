"""The small files of a model folder besides the weights: config, tokenizer, processor, recipe and model card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
"""What a vision-language model's processor reads besides the tokenizer."""


def write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(source: Path, folder: Path, *, processor: bool = False) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in source, and the processor's files when
    processor; return their names."""
    copied = []
    for name in dict.fromkeys(TOKENIZER_FILES + (PROCESSOR_FILES if processor else ())):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return copied


def write_model_card(
    folder: Path,
    *,
    method: str,
    parents: Sequence[str],
    base: str | None,
    recipe_file: str,
    remake: str | None = None,
    vision: str | None = None,
) -> None:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, shoal]",
        "---",
        "# Merged model",
        "",
        f"Made by shoal with the `{method}` merge method.",
        "",
    ]
    if base:
        lines += [f"Base model: `{base}`", ""]
    lines += ["Parents:", ""] + [f"- `{p}`" for p in parents if p != base]
    if vision:
        lines += ["", f"A vision-language model: its language model is the merge; the vision tower, projector and "
                  f"processor are `{vision}`'s, unchanged."]
    lines += ["", remake or f"The recipe is in `{recipe_file}`; `shoal merge {recipe_file} OUT` remakes this model.", ""]
    (folder / "README.md").write_text("\n".join(lines))
