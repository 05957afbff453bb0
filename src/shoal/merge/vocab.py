"""Rows of vocabulary-indexed tensors (embeddings, LM head) moved onto the output's vocabulary, as mergekit 0.1.5
does before a merge method sees them.

Each parent's row of a token goes to the token's output id. A parent that lacks a token gets a stand-in row, so
that the merge formula runs unchanged on full tensors (nothing is masked; mergekit's behaviour):
- the row the recipe's `tokenizer.tokens` section names (a parent's row, another token's row, or zeros);
- else the base's row, where the base has the token;
- else the mean of the rows of the parents that have it: the one parent's own row where only one has it, zeros
  where none does.
With `force: true` every parent takes the named row, its own too. Rows beyond the vocabulary (`pad_to_multiple_of`)
are each parent's mean row. A parent's token id beyond its tensor's rows counts as lacking.

So where every parent but one lacks a token, each merge method sees that parent's row for all of them: linear
and task arithmetic give the row back (a task vector of zero from a base that took it), as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSource:
    """A fixed row: parent's row `row` (of its own numbering), or zeros when parent is None."""

    parent: str | None
    row: int = 0


@dataclass(frozen=True)
class Vocabulary:
    """The output's vocabulary, as the rows of each parent that hold its tokens."""

    tokens: int
    """Tokens in the output tokenizer."""
    size: int
    """Rows of the output's embedding and head: tokens, rounded up to pad_to_multiple_of."""
    rows: Mapping[str, torch.Tensor]
    """Per parent: its row of each output token (int64, length tokens), -1 where it lacks the token."""
    sources: Mapping[int, TokenSource | None]
    """Output tokens the recipe sets (tokenizer.tokens), by id; None: set without a source (only force given)."""
    names: Mapping[int, str]
    """The text of each token in sources, for messages."""
    forced: frozenset[int]
    """Of those, the tokens every parent takes from its source, own row or not."""

    def is_identity(self, parents: Sequence[str], lengths: Sequence[int]) -> bool:
        """Whether these parents' tensors of these lengths (rows) are already the output's rows."""
        if self.forced or self.size != self.tokens:
            return False
        order = torch.arange(self.tokens)
        return all(n == self.tokens and torch.equal(self.rows[p], order) for p, n in zip(parents, lengths))


@dataclass(frozen=True)
class RowAlignment:
    """How the tensors of one vocabulary-indexed job (the base's first) are aligned."""

    vocab: Vocabulary
    parents: tuple[str, ...]
    base: str | None
    """The parent whose row stands in first (mergekit's base_model), if it is among parents."""


def present(vocab: Vocabulary, parent: str, length: int) -> torch.Tensor:
    """Which output tokens a parent's tensor of `length` rows has."""
    rows = vocab.rows[parent]
    return (rows >= 0) & (rows < length)


def missing_source(how: RowAlignment, lengths: Sequence[int]) -> tuple[int, str] | None:
    """(token id, parent) of a token the recipe sets without a source although that parent needs a stand-in
    row for it; None when every stand-in row has a source."""
    for token, source in how.vocab.sources.items():
        if source is not None:
            continue
        for parent, length in zip(how.parents, lengths):
            if token in how.vocab.forced or not bool(present(how.vocab, parent, length)[token]):
                return token, parent
    return None


def _stand_ins(tensors: Sequence[torch.Tensor], how: RowAlignment, has: list[torch.Tensor], needed: torch.Tensor
               ) -> torch.Tensor:
    """The stand-in rows of the `needed` output tokens (one row each, in the tensors' dtype)."""
    vocab = how.vocab
    first = tensors[0]
    total = first.new_zeros((len(needed), *first.shape[1:]))
    count = torch.zeros(len(needed), dtype=torch.int64, device=first.device)
    rows_of = {}
    for parent, tensor, mask in zip(how.parents, tensors, has):
        rows = vocab.rows[parent].to(first.device)[needed].clamp(0, tensor.shape[0] - 1)
        rows_of[parent] = tensor[rows]
        keep = mask[needed]
        shape = (-1,) + (1,) * (first.dim() - 1)
        total = total + torch.where(keep.view(shape), rows_of[parent], 0)
        count += keep
    shape = (-1,) + (1,) * (first.dim() - 1)
    stand_in = total / count.clamp(min=1).view(shape).to(total.dtype)
    if how.base is not None:
        base_has = has[how.parents.index(how.base)][needed]
        stand_in = torch.where(base_has.view(shape), rows_of[how.base], stand_in)
    index = {parent: i for i, parent in enumerate(how.parents)}
    for k, token in enumerate(needed.tolist()):
        source = vocab.sources.get(token)
        if source is None:
            continue
        stand_in[k] = 0 if source.parent is None else tensors[index[source.parent]][source.row]
    return stand_in


def align_rows(tensors: Sequence[torch.Tensor], how: RowAlignment) -> list[torch.Tensor]:
    """Each tensor (vocabulary along dim 0, one per parent of `how`) with its rows moved to the output's ids and
    the stand-in rows the module's docstring describes; new tensors of vocab.size rows, the inputs unchanged."""
    vocab = how.vocab
    device = tensors[0].device
    has = [present(vocab, p, t.shape[0]).to(device) for p, t in zip(how.parents, tensors)]
    forced = torch.zeros(vocab.tokens, dtype=torch.bool, device=device)
    forced[list(vocab.forced)] = True
    needed = (forced | ~torch.stack(has).all(0)).nonzero().squeeze(1)
    stand_in = _stand_ins(tensors, how, has, needed) if len(needed) else None
    out = []
    for parent, tensor, mask in zip(how.parents, tensors, has):
        rows = vocab.rows[parent].to(device).clamp(0, tensor.shape[0] - 1)
        aligned = tensor.new_empty((vocab.size, *tensor.shape[1:]))
        aligned[: vocab.tokens] = tensor[rows]
        if stand_in is not None:
            take = ~mask[needed] | forced[needed]
            aligned[needed[take]] = stand_in[take]
        if vocab.size > vocab.tokens:
            aligned[vocab.tokens :] = aligned[: vocab.tokens].mean(0)
        out.append(aligned)
    return out
