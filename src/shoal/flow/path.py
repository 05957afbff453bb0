"""Data-flow bookkeeping: the slots of repeated parent layers, and the path an indicator array and scales choose.

Following Akiba et al. 2024: the M layers of all parents are laid out in order (parent A's, then B's, ...) and
the sequence is repeated r times, giving T = M x r slots. Slot t is on the path iff I_t > 0, in slot order.
The input of each path layer is scaled by W[i, j] (i the previous layer's place in the layout, j this one's),
or by one scale per ordered pair of parents at a seam between them, or not at all. The path starts from A's
embeddings and ends in A's final norm and head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Scaling = Literal["full", "seam", "none"]


@dataclass(frozen=True)
class Layout:
    parents: tuple[str, ...]
    """Parent names in layout order; the first is A (tokenizer, embeddings, head)."""
    layers: tuple[int, ...]
    """Number of layers of each parent."""
    repeats: int

    @property
    def m(self) -> int:
        return sum(self.layers)

    @property
    def t(self) -> int:
        return self.m * self.repeats

    def place(self, index: int) -> tuple[str, int]:
        """(parent, layer) at position index in 0..M-1 of one repetition."""
        for parent, count in zip(self.parents, self.layers):
            if index < count:
                return parent, index
            index -= count
        raise IndexError(index)

    def slot(self, t: int) -> tuple[str, int]:
        """(parent, layer) of slot t in 0..T-1."""
        if not 0 <= t < self.t:
            raise IndexError(f"slot {t} is outside 0..{self.t - 1}")
        return self.place(t % self.m)


@dataclass(frozen=True)
class Step:
    """One layer on the path: which parent's layer, and the scale applied to its input."""

    parent: str
    layer: int
    scale: float


def seams(layout: Layout) -> list[tuple[str, str]]:
    """Ordered pairs of different parents: the seams `seam` scaling gives a scale each."""
    return [(a, b) for a in layout.parents for b in layout.parents if a != b]


def choose_path(
    layout: Layout,
    indicator: Sequence[float],
    scaling: Scaling = "none",
    scales: Sequence[float] = (),
) -> list[Step]:
    """The path of slots with indicator > 0, each with its input scale.

    scales: for "full", the M x M matrix W row by row (W[i][j] scales layer j's input after layer i; the first
    path layer, fed by A's embeddings, is not scaled); for "seam", one scale per pair in `seams(layout)` (the
    first path layer counts as coming from A); for "none", empty.
    """
    if len(indicator) != layout.t:
        raise ValueError(f"the indicator has {len(indicator)} entries for {layout.t} slots")
    expected = {"full": layout.m * layout.m, "seam": len(seams(layout)), "none": 0}[scaling]
    if len(scales) != expected:
        raise ValueError(f"{scaling} scaling takes {expected} scales, got {len(scales)}")
    seam_scale = dict(zip(seams(layout), scales))
    path: list[Step] = []
    previous: int | None = None
    for t, value in enumerate(indicator):
        if value <= 0:
            continue
        here = t % layout.m
        parent, layer = layout.place(here)
        if scaling == "full":
            scale = 1.0 if previous is None else float(scales[previous * layout.m + here])
        elif scaling == "seam":
            before = layout.parents[0] if previous is None else layout.place(previous)[0]
            scale = float(seam_scale[(before, parent)]) if before != parent else 1.0
        else:
            scale = 1.0
        path.append(Step(parent, layer, scale))
        previous = here
    return path
