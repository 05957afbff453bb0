"""The chat template a recipe's `chat_template` names: `auto`, a built-in template's name, or Jinja text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

BUILT_IN = ("alpaca", "chatml", "exaone", "llama3", "mistral")
"""The templates mergekit 0.1.5 ships, by name; shoal's own Jinja for the same formats, in chat_templates/.

chatml and mistral render exactly as mergekit's. The others give each format as its authors write it, without
whitespace that mergekit's files leave in: llama3 has no newline after each <|eot_id|>, exaone no indentation
and blank lines, and alpaca puts a blank line before the `### Response:` of the generation prompt."""


def built_in(name: str) -> str:
    return (Path(__file__).with_name("chat_templates") / f"{name}.jinja").read_text()


def problem(value: str) -> str | None:
    """What is wrong with a recipe's chat_template, or None: as mergekit, a value that is neither auto nor a
    built-in name must look like Jinja (hold a `{` and be 20 characters or more)."""
    if value == "auto" or value in BUILT_IN or ("{" in value and len(value) >= 20):
        return None
    return f"{value!r} is neither auto, a built-in template ({', '.join(BUILT_IN)}) nor a Jinja template"


def resolve(value: str, parents_templates: Sequence[str | None]) -> str | None:
    """The template text. `auto` is the template most of the parents have (the first of the tied, in recipe
    order; whitespace at the ends ignored, as mergekit), None when no parent has one."""
    if value == "auto":
        found = [t.strip() for t in parents_templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return built_in(value) if value in BUILT_IN else value
