"""YAML documents read together with the line of every value, so that errors can point at it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shoal.errors import ShoalError


MAX_DEPTH = 50
"""Deepest nesting of mappings and lists a recipe or search file may have (theirs is under 10)."""


def read_text(path: Path) -> str:
    """A YAML file's text; a file that is not UTF-8 is a ShoalError naming the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ShoalError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                         "save the file as UTF-8") from None


@contextmanager
def _readable(source: str) -> Iterator[None]:
    """Turn malformed YAML into a ShoalError naming the file and line, and absurd nesting into one naming the file."""
    try:
        yield
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ShoalError(f"{where}: malformed YAML ({getattr(exc, 'problem', None) or exc})") from exc
    except RecursionError:
        raise ShoalError(f"{source}: nested too deeply (more than {MAX_DEPTH} levels)") from None


def parse(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree; malformed YAML is a ShoalError naming the file and line."""
    with _readable(source):
        node = yaml.compose(text)
        _check_tree(node, source)
        return yaml.safe_load(text), node


def parse_documents(text: str, source: str) -> list[tuple[Any, yaml.Node]]:
    """Every document of a `---`-separated stream, as (data, node tree), their lines counted from the file's
    start; malformed YAML is a ShoalError naming the file and line."""
    with _readable(source):
        nodes = list(yaml.compose_all(text))
        for node in nodes:
            _check_tree(node, source)
        return list(zip(yaml.safe_load_all(text), nodes))


def _check_tree(node: yaml.Node | None, source: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH (iteratively, so the check itself cannot recurse too deep), or
    with a key twice in one mapping (YAML loaders keep the last silently; which one was meant is not known)."""
    stack = [(node, 1)] if node is not None else []
    while stack:
        current, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ShoalError(f"{source}:{current.start_mark.line + 1}: nested too deeply (more than {MAX_DEPTH} "
                             "levels of mappings and lists)")
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)
        elif isinstance(current, yaml.MappingNode):
            _check_keys(current, source)
            stack.extend((child, depth + 1) for pair in current.value for child in pair)


def _check_keys(mapping: yaml.MappingNode, source: str) -> None:
    seen: dict[str, int] = {}
    for key, _ in mapping.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":  # a merge key may repeat
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise ShoalError(f"{source}:{line}: {key.value!r} is given twice in one mapping (first on line "
                             f"{seen[key.value]}; YAML would keep this one silently); keep one")
        seen[key.value] = line


Model = TypeVar("Model", bound=BaseModel)


def _is_union_tag(part: Any) -> bool:
    """pydantic names a union's branch in error locations (`Conditional`, `list[...]`); they are not YAML keys."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def validated(model: type[Model], text: str, source: str, what: str) -> tuple[Model, yaml.Node | None]:
    """Parse YAML text into `model`; any problem is a ShoalError `source:line: key.path: message`.

    what: how the document is described when it is not a mapping at all (e.g. "a recipe is a YAML mapping ...").
    """
    data, node = parse(text, source)
    return validate(model, data, node, source, what), node


def validate(model: type[Model], data: Any, node: yaml.Node | None, source: str, what: str) -> Model:
    """A parsed document's data as `model`; any problem is a ShoalError `source:line: key.path: message`."""
    if not isinstance(data, dict):
        raise ShoalError(f"{source}: {what}")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ShoalError(f"{source}: nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        message = message_of(model, err, loc)
        named = _named_key(message, data) if not loc else None
        if named:  # a check across keys whose message starts with the key it is about: that key's line
            raise ShoalError(f"{source}:{line_of(node, named)}: {message}") from exc
        path = ".".join(str(p) for p in loc) or "document"
        line = line_of(node, loc, of_key=err["type"] == "extra_forbidden")
        raise ShoalError(f"{source}:{line}: {path}: {message}") from exc


def _named_key(message: str, data: dict[str, Any]) -> tuple[str, ...] | None:
    """The key path a message starts with (`dfs.parents: ...`), if its first key is in the document."""
    head, colon, _ = message.partition(": ")
    parts = tuple(head.split("."))
    return parts if colon and parts[0] in data and all(p.isidentifier() for p in parts) else None


def message_of(model: type[BaseModel], err: Any, loc: tuple[Any, ...]) -> str:
    """What a pydantic error of validating `model` says, as shoal prints it: without pydantic's "Value error, "; an
    unknown key with the keys its mapping takes (loc: the error's location, union tags left out)."""
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        return f"not a known key{f' (known: {known})' if known else ''}"
    return str(err["msg"]).removeprefix("Value error, ")


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The keys the mapping at loc takes, where loc leads through nested models' fields and lists of them (None where
    it does not)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):  # an item of a list of models: the list's field already named the model
            continue
        field = current.model_fields.get(part) if current is not None else None
        annotation = field.annotation if field is not None else None
        current = next((a for a in (annotation, *getattr(annotation, "__args__", ()))
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return None
    return ", ".join(field.alias or name for name, field in current.model_fields.items())


def line_of(node: yaml.Node | None, loc: tuple[Any, ...], *, of_key: bool = False) -> int | None:
    """The line of the value at loc (e.g. a pydantic error location), or of its deepest existing parent; of_key: of
    loc's last key instead (an unknown key, whose value may start on a later line)."""
    line = node.start_mark.line + 1 if node is not None else None
    for depth, key in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            if of_key and depth == len(loc) - 1:
                return match[0][0].start_mark.line + 1
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            continue
        line = node.start_mark.line + 1
    return line
