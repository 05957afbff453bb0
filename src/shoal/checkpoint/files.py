"""The small files of a model folder besides the weights: config, tokenizer and processor."""

from __future__ import annotations

import json
import shutil
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



def write_chat_template(folder: Path, template: str) -> None:
    """Make template the chat template of the tokenizer in folder: written into its tokenizer_config.json, and a
    chat_template.jinja (which transformers would read instead) removed."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config["chat_template"] = template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
