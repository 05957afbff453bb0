"""The merges of a recipe file of `---`-separated documents (mergekit-multi's format), in an order that runs each
after the documents whose outputs it reads."""

from __future__ import annotations

from collections.abc import Mapping
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from shoal import yamlfile
from shoal.checkpoint.reference import parse_reference
from shoal.errors import ShoalError
from shoal.recipe import Recipe, parse_recipe, validate_recipe


@dataclass(frozen=True)
class Document:
    """One merge of a recipe file."""

    index: int
    """Its place in the file, from 1."""
    line: int
    name: str | None
    """What other documents call its output (mergekit-multi's `name:`); None for a file's one unnamed document."""
    recipe: Recipe
    """The recipe as written: the outputs of other documents are named by their names."""
    reads: tuple[str, ...]
    """The names of the documents whose outputs it merges."""

    def __str__(self) -> str:
        return f"document {self.index}" + (f" ({self.name!r})" if self.name is not None else "")


def load_documents(path: str | Path) -> list[Document]:
    """A recipe file's merges in the order to run them: each after the documents it reads, the output's last.

    The output is the one document without `name:`, else the one named document that no other reads. A file of one
    document without `name:` is that document, read as `load_recipe` reads it.
    """
    path = Path(path)
    if not path.is_file():
        raise ShoalError(f"recipe {path} not found")
    source = str(path)
    text = yamlfile.read_text(path)
    parsed = yamlfile.parse_documents(text, source)
    named = bool(parsed) and isinstance(parsed[0][0], dict) and "name" in parsed[0][0]
    if len(parsed) <= 1 and not named:
        recipe = parse_recipe(text, source)
        _reads(recipe, parsed[0][1], set(), source, None)  # every model a folder or a Hub id
        return [Document(1, 1, None, recipe, ())]
    names = _names(parsed, source)
    documents = []
    for index, ((data, node), name) in enumerate(zip(parsed, names), start=1):
        recipe = validate_recipe({k: v for k, v in data.items() if k != "name"}, node, source)
        if name is not None and "seed" not in data:
            recipe = recipe.model_copy(update={"seed": stage_seed(recipe.seed, name)})
        reads = _reads(recipe, node, {n for n in names if n is not None}, source, f"document {index}")
        documents.append(Document(index, node.start_mark.line + 1, name, recipe, reads))
    ordered = _merge_order(documents, source)
    output = _output(documents, source)
    return [d for d in ordered if d is not output] + [output]


def stage_seed(seed: int, name: str) -> int:
    """The seed of a named document's random drops (DARE, DELLA) when it sets none: the file's seed mixed with the
    name, so that a merge of a merge draws other masks than the merge it reads (as mergekit-multi's, drawn in
    sequence from one generator, do)."""
    return zlib.crc32(f"{seed}/{name}".encode())


def with_seed(documents: list[Document], seed: int) -> list[Document]:
    """The documents with every seed set from seed (`shoal merge --seed`): the output's is seed, a named
    document's stage_seed(seed, name)."""
    return [replace(d, recipe=d.recipe.model_copy(update={"seed": seed if d.name is None else stage_seed(seed, d.name)}))
            for d in documents]


def as_text(documents: list[Document]) -> str:
    """The documents as one recipe file (each named, with its seed), in merge order."""
    dumped = [({"name": d.name} if d.name is not None else {}) | d.recipe.model_dump(exclude_none=True)
              for d in documents]
    return yaml.safe_dump_all(dumped, sort_keys=False)


def with_folders(recipe: Recipe, folders: Mapping[str, Path]) -> Recipe:
    """The recipe with every model string that names a document (by its name, with or without `+ADAPTER`) naming
    that document's output folder instead."""
    data = recipe.model_dump(exclude_none=True)
    changed = False
    for loc, ref in recipe.model_places():
        reference = parse_reference(ref)
        if reference.model.path in folders:
            adapter = f"+{reference.lora}" if reference.lora is not None else ""
            _put(data, loc, f"{folders[reference.model.path]}{adapter}")
            changed = True
    return Recipe.model_validate(data) if changed else recipe


def _put(data: Any, loc: tuple[str | int, ...], value: str) -> None:
    for key in loc[:-1]:
        data = data[key]
    data[loc[-1]] = value


def _names(parsed: list[tuple[Any, yaml.Node]], source: str) -> list[str | None]:
    """Each document's `name:` (None for the one allowed without); every document must be a mapping."""
    names: list[str | None] = []
    first: dict[str | None, int] = {}
    for index, (data, node) in enumerate(parsed, start=1):
        where = f"{source}:{node.start_mark.line + 1}: document {index}"
        if not isinstance(data, dict):
            what = "is empty" if data is None else "is not a YAML mapping"
            raise ShoalError(f"{where} {what}; each document between `---` lines is a recipe (a mapping with "
                             "name, merge_method and models or slices)")
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or name in ("", ".", "..") or "/" in name):
            raise ShoalError(f"{source}:{yamlfile.line_of(node, ('name',))}: document {index}: name {name!r}: give "
                             "a folder name (text without '/'), which the intermediate merge is written under")
        if name in first:
            earlier = first[name]
            line = parsed[earlier - 1][1].start_mark.line + 1
            if name is None:
                raise ShoalError(f"{where} has no name, and neither has document {earlier} (line {line}); only "
                                 "the output may go without `name:` (mergekit-multi's rule): name every other "
                                 "document, so that others can read its merge by that name")
            raise ShoalError(f"{source}:{yamlfile.line_of(node, ('name',))}: document {index} is named {name!r}, as "
                             f"document {earlier} (line {line}) is; give each document its own name")
        first[name] = index
        names.append(name)
    return names


def _reads(recipe: Recipe, node: yaml.Node, names: set[str], source: str, document: str | None) -> tuple[str, ...]:
    """The documents recipe reads (document: its label in a file of several, None for a file of one); a model
    string that is neither a document's name, a folder nor a Hub id is refused, with its line (a misspelt name
    would otherwise be looked for on the Hub)."""
    reads = []
    for loc, ref in recipe.model_places():
        model = parse_reference(ref).model
        where = f"{source}:{yamlfile.line_of(node, loc)}" + (f": {document}" if document else "")
        if model.path in names:
            if model.revision is not None:
                raise ShoalError(f"{where}: {ref!r}: {model.path} is a document of this file, whose merge has no "
                                 f"revisions; drop @{model.revision}")
            reads.append(model.path)
        elif not model.is_hub_id and not Path(model.path).expanduser().exists():
            if document is None:
                relative = "" if Path(model.path).expanduser().is_absolute() else f", looked for from {Path.cwd()}"
                raise ShoalError(f"{where}: model {ref!r} not found: no such folder{relative}, and not a Hub id "
                                 "(org/name)")
            known = ", ".join(sorted(names)) or "none"
            raise ShoalError(f"{where}: model {ref!r} names no document of this file (their names: {known}), no "
                             "folder and no Hub id (org/name)")
    return tuple(dict.fromkeys(reads))


def _merge_order(documents: list[Document], source: str) -> list[Document]:
    """The documents in file order, except that each comes after those it reads; a cycle is refused."""
    by_name = {d.name: d for d in documents if d.name is not None}
    done: set[str | None] = set()
    order: list[Document] = []
    while len(order) < len(documents):
        ready = next((d for d in documents if d.name not in done and d not in order
                      and all(r in done for r in d.reads)), None)
        if ready is None:
            raise ShoalError(_cycle([d for d in documents if d not in order], by_name, source))
        order.append(ready)
        done.add(ready.name)
    return order


def _cycle(waiting: list[Document], by_name: dict[str | None, Document], source: str) -> str:
    """The message naming one cycle among documents that each wait for another of them."""
    path = [waiting[0]]
    while True:
        following = by_name[next(r for r in path[-1].reads if by_name[r] in waiting)]
        if following in path:
            path = path[path.index(following):] + [following]
            break
        path.append(following)
    chain = " reads ".join(f"{d} (line {d.line})" for d in path[:-1]) + f" reads {path[-1]}"
    return (f"{source}:{path[0].line}: documents read each other's merges in a cycle: {chain}; a merge cannot be "
            "made from its own output: make one of them read a model instead")


def _output(documents: list[Document], source: str) -> Document:
    """The document whose merge is the file's output: the unnamed one, else the only one that no other reads."""
    unnamed = [d for d in documents if d.name is None]
    if unnamed:
        return unnamed[0]
    read = {r for d in documents for r in d.reads}
    unread = [d for d in documents if d.name not in read]
    if len(unread) > 1:
        listed = ", ".join(f"{d} (line {d.line})" for d in unread)
        raise ShoalError(f"{source}: {listed} are read by no other document, so which is the output is unclear; "
                         "leave `name:` out of the output's document (as mergekit-multi has it)")
    return unread[0]
