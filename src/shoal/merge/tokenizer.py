"""The output's tokenizer when a recipe names one (`tokenizer_source` or a `tokenizer:` section), built from the
parents' tokenizers as mergekit 0.1.5 builds it, with the Vocabulary that aligns every parent's rows to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from shoal import layout
from shoal.checkpoint.reader import Checkpoint, resolve_model
from shoal.errors import ShoalError
from shoal.merge.vocab import TokenSource, Vocabulary
from shoal.recipe import ModelToken, Recipe, TokenizerSection, ZeroToken

if TYPE_CHECKING:  # transformers takes most of a second to import: only a recipe with tokenizer settings needs it
    from transformers import PreTrainedTokenizerBase


def _auto_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@dataclass
class OutputTokenizer:
    tokenizer: PreTrainedTokenizerBase
    vocab: Vocabulary
    copy_from: Path | None
    """A folder whose tokenizer files are the output's as they are; None: the output's are `tokenizer` saved."""


def load_tokenizer(path: Path, what: str) -> PreTrainedTokenizerBase:
    try:
        return _auto_tokenizer(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ShoalError(f"{what}: no tokenizer could be loaded from {path} ({first}); tokenizer_source needs "
                         "every parent's tokenizer to find its rows of each token") from None


def chat_templates(parents: dict[str, Checkpoint]) -> list[str | None]:
    """Each parent's chat template (its default one where it has several), None where it has none or no
    tokenizer loads, in recipe order."""
    found: list[str | None] = []
    for parent in parents.values():
        try:
            template = _auto_tokenizer(parent.path).chat_template
        except (OSError, ValueError, TypeError, KeyError):
            template = None
        found.append(template.get("default") if isinstance(template, dict) else template)
    return found


def vocabulary_rows(parent: Checkpoint) -> int:
    """The number of token rows of a parent's embeddings (its vocabulary size as its weights see it)."""
    for name in parent.lm_names:
        if layout.is_vocabulary(name):
            return parent.shape(parent.lm.own(name))[0]
    raise ShoalError(f"{parent.path}: no token embedding tensor (embed_tokens, wte, ...) to align to a tokenizer")


def check_shared_vocabulary(parents: dict[str, Checkpoint]) -> None:
    """Refuse parents whose embeddings have as many rows but whose tokenizers (tokenizer.json, where a parent has
    one) give some token another id: merged row by row, their embeddings would mix different tokens. (Parents
    whose rows differ in number are refused by the merge plan, with their counts.)"""
    vocabs = {name: Tokenizer.from_file(str(ck.path / "tokenizer.json")).get_vocab(with_added_tokens=True)
              for name, ck in parents.items() if (ck.path / "tokenizer.json").is_file()}
    if len(vocabs) < 2 or len({vocabulary_rows(parents[name]) for name in vocabs}) > 1:
        return
    (first, ids), *others = vocabs.items()
    for name, other in others:
        if other != ids:
            differ = sorted(t for t in ids.keys() | other.keys() if ids.get(t) != other.get(t))
            token = min(differ, key=lambda t: min(i for i in (ids.get(t), other.get(t)) if i is not None))
            shown = lambda vocab: "absent" if vocab.get(token) is None else f"id {vocab[token]}"  # noqa: E731
            raise ShoalError(
                f"the parents' vocabularies differ though their embeddings have as many rows: token {token!r} is "
                f"{shown(ids)} in {first} but {shown(other)} in {name} ({len(differ)} tokens differ); set "
                "tokenizer_source (union, base or a model; in a search file: union, base or a parent's name) to "
                "align their rows by token"
            )


def _union(base: Path, tokenizers: dict[str, PreTrainedTokenizerBase], rows: dict[str, int]
           ) -> PreTrainedTokenizerBase:
    """The base's tokenizer plus every token a parent has within its rows: its plain tokens first, then its added
    (special) tokens with their settings (the first parent's where two differ), each group in recipe order and by
    id. mergekit adds the plain ones in hash order; this order is the same every run."""
    out = _auto_tokenizer(base)
    known = set(out.get_vocab())
    plain: list[str] = []
    added = {}
    for ref, tok in tokenizers.items():
        specials = {info.content: info for i, info in tok.added_tokens_decoder.items() if i < rows[ref]}
        for text, i in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if i < rows[ref] and text not in specials and text not in known:
                plain.append(text)
                known.add(text)
        for text, info in specials.items():
            added.setdefault(text, info)
    plain = [t for t in plain if t not in added]
    out.add_tokens(plain)
    out.add_tokens(list(added.values()))
    return out


def _source(
    setting_source: ModelToken | ZeroToken | str | None,
    token: str,
    token_id: int,
    positions: dict[str, torch.Tensor],
    tokenizers: dict[str, PreTrainedTokenizerBase],
    rows: dict[str, int],
) -> TokenSource | None:
    """Where a `tokenizer.tokens` entry takes its row from (None: it names no source)."""
    where = f"tokenizer.tokens[{token!r}].source"
    if setting_source is None:
        return None
    if isinstance(setting_source, ZeroToken):
        return TokenSource(None)
    model = setting_source.model if isinstance(setting_source, ModelToken) else setting_source
    if model not in tokenizers:
        raise ShoalError(f"{where} names {model}, which is not a parent of the recipe (parents: "
                         f"{', '.join(tokenizers)})")
    if isinstance(setting_source, str):
        row = int(positions[model][token_id])
        if not 0 <= row < rows[model]:
            raise ShoalError(f"{where} is {model}, which has no row for {token!r}; name a token it has with "
                             "{kind: model_token, model: ..., token: ...}")
        return TokenSource(model, row)
    if setting_source.token is not None:
        found = tokenizers[model].get_vocab().get(setting_source.token)
        if found is None:
            raise ShoalError(f"{where}: {model} has no token {setting_source.token!r}")
        row = found
    else:
        assert setting_source.token_id is not None
        row = setting_source.token_id
    if row >= rows[model]:
        raise ShoalError(f"{where}: token id {row} is beyond the {rows[model]} rows of {model}")
    return TokenSource(model, row)


def build_output_tokenizer(recipe: Recipe, parents: dict[str, Checkpoint]) -> OutputTokenizer:
    """The output tokenizer of a recipe with tokenizer settings (recipe.vocabulary), and its Vocabulary.

    source `base` is the base's tokenizer (the first parent's without a base_model), a model its tokenizer,
    `union` the base's plus every other parent's tokens (see _union); tokens the `tokens` section names are added
    where missing. Output ids are the tokenizer's; the rows are its length, rounded up to pad_to_multiple_of."""
    settings = recipe.vocabulary
    assert settings is not None
    refs = recipe.parents()
    base = recipe.base_model or refs[0]
    rows = {ref: vocabulary_rows(parents[ref]) for ref in refs}
    tokenizers = {ref: load_tokenizer(parents[ref].path, f"parent {ref}") for ref in refs}
    out, copy_from = _output(settings, base, parents, tokenizers, rows)
    missing = [t for t in (settings.tokens or {}) if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
        copy_from = None
    ids = out.get_vocab()
    tokens = max(ids.values()) + 1
    positions = {}
    for ref, tok in tokenizers.items():
        own = tok.get_vocab()
        position = torch.full((tokens,), -1, dtype=torch.int64)
        for text, i in ids.items():
            position[i] = own.get(text, -1)
        positions[ref] = position
    configured = settings.tokens or {}
    sources = {ids[t]: _source(s.source, t, ids[t], positions, tokenizers, rows) for t, s in configured.items()}
    multiple = settings.pad_to_multiple_of or 1
    vocab = Vocabulary(
        tokens=tokens, size=-(-tokens // multiple) * multiple, rows=positions, sources=sources,
        names={ids[t]: t for t in configured},
        forced=frozenset(ids[t] for t, s in configured.items() if s.force),
    )
    return OutputTokenizer(out, vocab, copy_from)


def _output(settings: TokenizerSection, base: str, parents: dict[str, Checkpoint],
            tokenizers: dict[str, PreTrainedTokenizerBase], rows: dict[str, int]
            ) -> tuple[PreTrainedTokenizerBase, Path | None]:
    """The output tokenizer before the `tokens` section's additions, and the folder it is a copy of (if any)."""
    if settings.source == "union":
        out = _union(parents[base].path, tokenizers, rows)
        unchanged = len(out) == len(tokenizers[base])
        return out, parents[base].path if unchanged else None
    if settings.source == "base":
        path = parents[base].path
    elif settings.source in parents:
        path = parents[settings.source].path
    else:
        path = resolve_model(settings.source)
    return load_tokenizer(path, f"tokenizer source {settings.source}"), path
