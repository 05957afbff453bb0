"""`shoal merge` of a recipe file of several documents: each merged in order, an intermediate merge reused on a rerun
when it was made from the same document and its files are intact."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shoal.checkpoint.digest import file_digest, files_digest
from shoal.checkpoint.reader import resolve_model
from shoal.checkpoint.reference import parse_reference
from shoal.checkpoint.writer import check_not_current, check_replaceable
from shoal.errors import ShoalError
from shoal.folder_lock import folder_lock
from shoal.merge import engine
from shoal.recipe_documents import Document, with_folders

RECORD = ".shoal-merged-from.json"
"""Written into an intermediate merge's folder once it is complete: what it was merged from, and its files' digests."""
FORMAT = 3
"""The version of how an intermediate is keyed: bump it when the same document would merge differently."""


def merge_documents(
    documents: Sequence[Document],
    out_dir: Path,
    intermediate_dir: Path,
    *,
    recipe_text: str | None,
    notice: Callable[[str], None],
    on_tensor: Callable[[str, int, int], None] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    copy_tokenizer: bool = True,
) -> Path:
    """Merge documents (load_documents' order: the output last) into out_dir, each other one into
    intermediate_dir/NAME, where a later run reuses it while it is intact and its document unchanged (notice says
    which were reused, and why one is merged again). recipe_text: what out_dir's recipe.yaml holds (None: the
    output's recipe, the folders of the merges it reads in place of their names); on_tensor(name, done, total) as
    run_merge's, with the document's name (the output's folder name for the output)."""
    *inputs, output = documents
    if inputs:
        _check_folders(out_dir, intermediate_dir, overwrite)
    for document in documents:  # before any document is merged
        engine.check_not_an_input(out_dir, document.recipe)
    if inputs and overwrite:
        check_replaceable(out_dir)
    folders: dict[str, Path] = {}
    digests: dict[str, str] = {}

    def merge(document: Document, folder: Path, text: str | None, replace: bool) -> Path:
        label = document.name or out_dir.name
        try:
            return engine.run_merge(
                with_folders(document.recipe, folders), folder, recipe_text=text, device=device, overwrite=replace,
                max_shard_bytes=max_shard_bytes, copy_tokenizer=copy_tokenizer,
                on_tensor=(lambda done, total: on_tensor(label, done, total)) if on_tensor else None,
            )
        except ShoalError as exc:
            if not inputs:
                raise
            raise ShoalError(f"{document}: {exc}") from None

    for document in inputs:
        assert document.name is not None  # only the output may be unnamed
        folder = (intermediate_dir / document.name).resolve()
        key = _key(document, digests, copy_tokenizer)
        files, why = _reusable(folder, key)
        if files is not None:
            notice(f"reused {document.name}: {folder} was merged from the same document and parents and is intact")
        else:
            made_here = (folder / RECORD).is_file()
            if why is not None and not made_here:
                if not overwrite:
                    raise ShoalError(f"{document}: {why}; shoal replaces only the intermediate merges it made: move "
                                     "it away, or pass --overwrite to replace it")
                check_replaceable(folder, f"{document}: its intermediate folder")
            if why is not None:
                notice(f"merging {document.name} again: {why}")
            if made_here:
                with folder_lock(folder):  # checked under the lock: another process may be writing it
                    if (folder / RECORD).is_file() and not (folder / "config.json").is_file():
                        # shoal's own, of no use without its config, and no model to replace
                        check_not_current(folder, f"{document}: its intermediate folder {folder}",
                                          "merging it again")
                        shutil.rmtree(folder)
            merge(document, folder, None, replace=True)
            files = _write_record(folder, key)
        folders[document.name] = folder
        digests[document.name] = _digest(files)
    return merge(output, out_dir, recipe_text, replace=overwrite)


def _check_folders(out_dir: Path, intermediate_dir: Path, overwrite: bool) -> None:
    """Refuse, before any merge, an output folder that the final rename would refuse, or one that holds the
    intermediate merges (the rename would remove them)."""
    out, intermediate = out_dir.resolve(), intermediate_dir.resolve()
    if intermediate.is_relative_to(out):
        raise ShoalError(f"--intermediate-dir {intermediate_dir} is inside OUT_DIR {out_dir}, which is replaced "
                         "whole; give a folder outside it")
    if out.is_relative_to(intermediate):
        raise ShoalError(f"OUT_DIR {out_dir} is inside --intermediate-dir {intermediate_dir}, where the intermediate "
                         "merges are written; give a folder outside it")
    if out.exists() and not overwrite:
        raise ShoalError(f"{out} already exists; pass --overwrite to replace it")


def _key(document: Document, digests: Mapping[str, str], copy_tokenizer: bool) -> str:
    """What an intermediate is merged from: its document as written, the contents of the merges it reads and of the
    models it reads (every file of each one's folder: a Hub file by its blob's name, free; a local one by its
    bytes, read once per process), and whether tokenizer files are copied (where the files are does not count: a
    moved folder is reused)."""
    models = {}
    for _, ref in document.recipe.model_places():
        if parse_reference(ref).model.path not in document.reads and ref not in models:
            folder = resolve_model(ref)
            models[ref] = files_digest(folder, [p.name for p in folder.iterdir() if p.is_file()])
    made_of = {"format": FORMAT, "recipe": document.recipe.model_dump(mode="json"), "copy_tokenizer": copy_tokenizer,
               "reads": {name: digests[name] for name in document.reads}, "models": models}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """The content digest of every file of a model folder, by name."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}


def _digest(files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(files), sort_keys=True).encode()).hexdigest()


def _reusable(folder: Path, key: str) -> tuple[dict[str, str] | None, str | None]:
    """The files' digests of the intact merge of key in folder; else None, and why the folder there cannot be
    reused (None when there is no folder)."""
    if not folder.is_dir():
        return None, None
    try:
        record = json.loads((folder / RECORD).read_text())
        made_from, files = record["merged_from"], record["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except FileNotFoundError:
        return None, (f"{folder} holds no record of what it was merged from (a merge that did not finish, or not "
                      "shoal's)")
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"{folder / RECORD} is damaged ({exc})"
    if made_from != key:
        return None, f"{folder} was merged from another version of its document or of a merge it reads"
    for name, digest in files.items():
        if not (folder / name).is_file():
            return None, f"{folder / name} is missing"
        if file_digest(folder / name) != digest:
            return None, f"{folder / name} has changed since it was merged"
    return files, None


def _write_record(folder: Path, key: str) -> dict[str, str]:
    """Record, atomically, what the merge just written into folder was made from; return its files' digests."""
    files = _files(folder)
    tmp = folder / f"{RECORD}.tmp"
    tmp.write_text(json.dumps({"merged_from": key, "files": files}, indent=2) + "\n")
    tmp.replace(folder / RECORD)
    return files
