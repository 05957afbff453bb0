"""YAML documents read together with the line of every value, so that errors can point at it."""

from __future__ import annotations

from typing import Any

import yaml

from shoal.errors import ShoalError


def parse(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree; malformed YAML is a ShoalError naming the file and line."""
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ShoalError(f"{where}: malformed YAML ({getattr(exc, 'problem', None) or exc})") from exc


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line of the value at loc (e.g. a pydantic error location), or of its deepest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            continue
        line = node.start_mark.line + 1
    return line
