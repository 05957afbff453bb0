"""Draw the report's figures (fitness by trial, best recipe heatmap, best data-flow path) from plain lists and dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ANNOTATED_COLUMNS = 16
MAX_GENERATION_LINES = 60
MAX_PATH_STEPS_PER_ROW = 24  # longer paths wrap into rows of about equal length
UNKNOWN_PARENT_COLOUR = (0.75, 0.75, 0.75, 1.0)  # embeddings and head when no parent A is known


def best_so_far(values: Sequence[float | None]) -> list[float | None]:
    """Running maximum of `values`; None (a failed trial) carries the previous best, or stays None before any."""
    best: float | None = None
    out: list[float | None] = []
    for v in values:
        if v is not None and not math.isnan(v) and (best is None or v > best):
            best = v
        out.append(best)
    return out


@dataclass(frozen=True)
class RecipeMatrix:
    """Heatmap data: `values[i][j]` is row `rows[i]` = (row label, parent) at column `columns[j]`; NaN = no value."""

    rows: list[tuple[str, str]]
    columns: list[str]
    values: list[list[float]]


def recipe_matrix(
    layers: Mapping[str, Mapping[str, Sequence[float | None]]],
    embeddings: Mapping[str, Mapping[str, float | None]] | None = None,
) -> RecipeMatrix:
    """One row per (row label, parent), one column per layer ("0", "1", ...) and an "emb" column if embeddings.

    Rows keep the order of `layers`, then any (label, parent) found only in `embeddings` (e.g. "weight" when
    layers were split into "weight (attn)" and "weight (mlp)"); cells with no value are NaN.
    """
    rows: list[tuple[str, str]] = [(label, parent) for label, by_parent in layers.items() for parent in by_parent]
    for label, by_parent in (embeddings or {}).items():
        rows.extend((label, parent) for parent in by_parent if (label, parent) not in rows)
    n_layers = max((len(v) for by_parent in layers.values() for v in by_parent.values()), default=0)
    columns = [str(i) for i in range(n_layers)] + (["emb"] if embeddings is not None else [])

    def number(v: float | None) -> float:
        return math.nan if v is None else float(v)

    values = []
    for label, parent in rows:
        per_layer = list(layers.get(label, {}).get(parent, []))
        row = [number(v) for v in per_layer] + [math.nan] * (n_layers - len(per_layer))
        if embeddings is not None:
            row.append(number(embeddings.get(label, {}).get(parent)))
        values.append(row)
    return RecipeMatrix(rows, columns, values)


def _figure(width: float, height: float):
    # A bare Figure draws with Agg and touches no pyplot state: headless, nothing to close, no backend switch.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def plot_fitness(
    path: Path,
    numbers: Sequence[int],
    values: Sequence[float | None],
    generations: Sequence[int | None] | None = None,
    title: str = "fitness by trial",
) -> Path:
    """Save a scatter of each trial's fitness with the best-so-far line; a None value is a failed trial (red x)."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    done = [(n, v) for n, v in zip(numbers, values) if v is not None]
    failed = [n for n, v in zip(numbers, values) if v is None]

    if generations is not None:
        starts = [n for i, (n, g) in enumerate(zip(numbers, generations)) if i > 0 and g != generations[i - 1]]
        if len(starts) <= MAX_GENERATION_LINES:
            for n in starts:
                ax.axvline(n - 0.5, color="0.88", linewidth=0.7, zorder=0)

    ax.scatter([n for n, _ in done], [v for _, v in done], s=8, alpha=0.55, color="tab:blue", linewidths=0,
               label="trial fitness", zorder=2)
    running = [(n, b) for n, b in zip(numbers, best_so_far(values)) if b is not None]
    if running:
        ax.step([n for n, _ in running], [b for _, b in running], where="post", color="tab:orange", linewidth=1.8,
                label="best so far", zorder=3)
        best_n, best_v = max(done, key=lambda nv: nv[1])
        ax.scatter([best_n], [best_v], marker="*", s=120, color="tab:orange", edgecolors="black", linewidths=0.6,
                   label=f"best: trial #{best_n} ({best_v:.4f})", zorder=4)
    if failed:
        # at the bottom of the axes whatever the y range: x in data, y in axes fraction
        ax.scatter(failed, [0.02] * len(failed), marker="x", s=18, color="tab:red", linewidths=1.0,
                   transform=ax.get_xaxis_transform(), label=f"failed ({len(failed)})", zorder=4, clip_on=False)

    ax.set_xlabel("trial")
    ax.set_ylabel("fitness (dev)")
    ax.set_title(title)
    ax.grid(axis="y", color="0.92", linewidth=0.7)
    ax.set_axisbelow(True)
    if numbers:
        ax.set_xlim(min(numbers) - 1, max(numbers) + 1)
    ax.legend(loc="lower right", fontsize="small", frameon=False)
    fig.savefig(path)
    return Path(path)


def plot_compute(path: Path, items: Sequence[int], values: Sequence[float | None],
                 title: str = "best so far by compute") -> Path:
    """Save the best-so-far fitness against the dev items scored so far (trials in index order)."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    spent, total = [], 0
    for n in items:
        total += n
        spent.append(total)
    running = [(x, b) for x, b in zip(spent, best_so_far(values)) if b is not None]
    if running:
        ax.step([x for x, _ in running], [b for _, b in running], where="post", color="tab:orange", linewidth=1.8,
                label="best so far")
    ax.set_xlabel("dev items scored")
    ax.set_ylabel("best fitness so far (search)")
    ax.set_title(title)
    ax.grid(color="0.92", linewidth=0.7)
    ax.set_axisbelow(True)
    fig.savefig(path)
    return Path(path)


def plot_recipe(path: Path, matrix: RecipeMatrix, title: str = "best recipe") -> Path:
    """Save a heatmap of `matrix`, rows grouped by row label, values written in the cells when few columns."""
    import numpy as np
    from matplotlib import colormaps

    data = np.ma.masked_invalid(np.array(matrix.values, dtype=float).reshape(len(matrix.rows), len(matrix.columns)))
    n_rows, n_cols = data.shape
    fig = _figure(min(20.0, max(6.0, 0.55 * n_cols + 3.5)), min(20.0, max(3.0, 0.42 * n_rows + 1.6)))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    finite = data.compressed()
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)

    ax.set_xticks(range(n_cols), matrix.columns)
    ax.set_yticks(range(n_rows), [f"{label} · {parent}" for label, parent in matrix.rows])
    ax.set_xlabel("layer")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for i in range(1, n_rows):  # a thick white rule between row-label groups
        if matrix.rows[i][0] != matrix.rows[i - 1][0]:
            ax.axhline(i - 0.5, color="white", linewidth=4)
    if matrix.columns and matrix.columns[-1] == "emb" and n_cols > 1:
        ax.axvline(n_cols - 1.5, color="white", linewidth=4)

    if n_cols <= MAX_ANNOTATED_COLUMNS:
        middle = (vmin + vmax) / 2
        blank = np.ma.getmaskarray(data)
        for i in range(n_rows):
            for j in range(n_cols):
                if blank[i, j]:
                    continue
                v = float(data[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v < middle else "black")
    ax.set_title(title)
    fig.savefig(path)
    return Path(path)


@dataclass(frozen=True)
class PathBox:
    """One box of the path figure at (`row`, `column`): the embeddings, a layer step, or the head.

    `kind` is "embeddings", "layer" or "head"; `parent` is None for the embeddings and head when no parent A is
    known; `scale_text` is "" where the scale is exactly 1.0.
    """

    row: int
    column: int
    kind: str
    parent: str | None
    label: str
    scale_text: str


def scale_text(scale: float) -> str:
    """How a seam scale is written: "" for exactly 1.0, else "×0.87" (2 decimals)."""
    return "" if scale == 1.0 else f"×{scale:.2f}"


def path_boxes(
    steps: Sequence[Mapping[str, Any]],
    parents_order: Sequence[str] | None,
    max_steps_per_row: int = MAX_PATH_STEPS_PER_ROW,
) -> list[PathBox]:
    """Lay out embeddings of A → each step ({"parent", "layer", "scale"}) → head of A, left to right.

    A is parents_order[0]. Up to `max_steps_per_row` steps (plus the embeddings and head boxes) fit on one row;
    a longer path wraps into the fewest rows of that width, filled evenly and read left to right, top to bottom.
    """
    if max_steps_per_row < 1:
        raise ValueError("max_steps_per_row must be at least 1")
    a = parents_order[0] if parents_order else None
    items: list[tuple[str, str | None, str, str]] = [("embeddings", a, "emb", "")]
    for step in steps:
        items.append(("layer", str(step["parent"]), f"L{int(step['layer'])}", scale_text(float(step.get("scale", 1.0)))))
    items.append(("head", a, "head", ""))
    width = max_steps_per_row + 2
    rows = math.ceil(len(items) / width)
    per_row = math.ceil(len(items) / rows)
    return [PathBox(i // per_row, i % per_row, kind, parent, label, text)
            for i, (kind, parent, label, text) in enumerate(items)]


def _parent_colours(parents: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(parents) <= 10 else colormaps["tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(parents)}


def plot_path(
    path: Path,
    steps: Sequence[Mapping[str, Any]],
    parents_order: Sequence[str] | None,
    title: str = "best path",
) -> Path:
    """Save the data-flow path as rows of boxes coloured by parent, "L{layer}" inside and the scale under each box."""
    from matplotlib.patches import FancyBboxPatch, Patch

    boxes = path_boxes(steps, parents_order)
    n_rows = max(b.row for b in boxes) + 1
    n_cols = max(b.column for b in boxes) + 1
    a = parents_order[0] if parents_order else None
    parents = list(parents_order or [])
    parents += [b.parent for b in boxes if b.parent is not None and b.parent not in parents]
    colours = _parent_colours(parents)

    row_height = 1.5
    fig = _figure(max(6.0, 0.62 * n_cols + 1.0), 1.3 + 0.9 * n_rows)
    ax = fig.add_subplot()
    side = 0.72
    for i, box in enumerate(boxes):
        x, y = box.column, -box.row * row_height
        colour = colours.get(box.parent, UNKNOWN_PARENT_COLOUR)
        ends = box.kind != "layer"
        ax.add_patch(FancyBboxPatch((x - side / 2, y - side / 2), side, side, boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=colour, edgecolor="black", linewidth=0.6,
                                    hatch="///" if ends else None, alpha=0.55 if ends else 1.0))
        r, g, b_, _ = colour
        dark = 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5 and not ends
        ax.text(x, y, box.label, ha="center", va="center", fontsize=8, fontweight="bold",
                color="white" if dark else "black")
        if box.scale_text:
            ax.text(x, y - side / 2 - 0.12, box.scale_text, ha="center", va="top", fontsize=7)
        if i + 1 < len(boxes):
            nxt = boxes[i + 1]
            if nxt.row == box.row:
                ax.annotate("", xy=(nxt.column - side / 2, y), xytext=(x + side / 2, y),
                            arrowprops={"arrowstyle": "->", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0})
            else:  # the path goes on at the start of the next row
                ax.text(x + side / 2 + 0.08, y, "→", ha="left", va="center", fontsize=9)
                ax.text(nxt.column - side / 2 - 0.08, -nxt.row * row_height, "→", ha="right", va="center",
                        fontsize=9)

    pad = max(0.0, (8 - n_cols) / 2)  # a short path keeps the boxes the size they have in a long one
    ax.set_xlim(-0.8 - pad, n_cols - 0.2 + pad)
    ax.set_ylim(-(n_rows - 1) * row_height - 0.9, 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    handles = [Patch(facecolor=colours[name], edgecolor="black", linewidth=0.6,
                     label=f"{name} (A: embeddings, head)" if name == a else name) for name in parents]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small",
                   frameon=False)
    steps_word = "step" if len(steps) == 1 else "steps"
    ax.set_title(f"{title} ({len(steps)} {steps_word})")
    fig.savefig(path)
    return Path(path)
