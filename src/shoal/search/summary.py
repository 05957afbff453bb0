"""summary.json's model, a finished run's results: `shoal evolve` writes it, the CLI and the report read it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathStep(_Record):
    """One layer on a data-flow path: layer `layer` of parent `parent`, its input multiplied by `scale`."""

    parent: str
    layer: int
    scale: float


class Best(_Record):
    """The picked trial: its scores, and the recipe (parameter space) or the path (data-flow space) it built."""

    trial: int
    """Its index in the search."""
    dev: float
    """Its score on the whole dev split, which picked it among the top trials by search fitness (`selection`)."""
    test: float
    search: float | None = None
    """Its search fitness (the score that put it among the top trials; on a subset of dev in fitness mode subset)."""
    dev_scores: dict[str, float]
    test_scores: dict[str, float]
    recipe: dict[str, Any] | None = None
    """PS: the mergekit recipe of the best model."""
    layers: dict[str, dict[str, list[float | None]]] | None = None
    """PS: parameter (e.g. "weight", "density (mlp)") -> parent -> its value at each layer."""
    embeddings: dict[str, dict[str, float]] | None = None
    """PS: parameter -> parent -> its value for the tensors outside the layers; None when they are the base's."""
    kept: list[str] | None = None
    """PS with genome.choose_parents: the parents its keep genes put in the merge (the others have weight 0)."""
    path: list[PathStep] | None = None
    """DFS: the layers a token goes through, in order."""
    parents_order: list[str] | None = None
    """DFS: the layout's parents; the first gives the embeddings and the head."""
    slots: int | None = None
    """DFS: T, the slots the path chose from."""


class Cost(_Record):
    """What scoring cost: dev items scored and tokens generated (tokens are not counted for lm-eval tasks)."""

    items: int
    tokens: int


class Rescored(_Record):
    """One of the top trials by search fitness, scored again on the whole dev split."""

    trial: int
    search: float
    dev: float


class Selection(_Record):
    """How the final model was picked: the `top` trials by search fitness re-scored `on` a split, the best kept."""

    top: int
    on: str
    rescored: list[Rescored]
    """Best search fitness first."""
    cost: Cost
    """Of the re-scoring (nothing in fitness mode full: the search fitness is already the whole-dev score)."""


class SecondsPerTrial(_Record):
    merge: float
    """Waited for the merge (less than merge_compute when the next candidate was merged ahead)."""
    merge_compute: float
    eval: float
    total: float


class StageResult(_Record):
    """A hybrid run's result of one stage."""

    dev: float
    test: float
    trials: int
    best_trial: int


class PoolRound(_Record):
    """One round of a pool's tournament: the trials each of its subsets had by its end, and each subset's score
    (its picked trial on the whole dev split), best first."""

    trials: int
    dev: dict[str, float | None]
    """Subset ("math+language") -> score (None: every trial of its search failed, so it ranks last); while the
    round runs, the subsets done so far."""


class PoolResult(_Record):
    """A pool run's tournament: its subsets' size, the subset that won, and every round."""

    subset: int
    winner: list[str]
    rounds: list[PoolRound]


START = "start"
"""Summary.untuned's key for the search's start."""
STARTS = {"ps": "every gene mid-range", "dfs": "parent A's layers, scales at 1",
          "hybrid": "its PS stage's: every gene mid-range"}


def untuned_label(name: str, space: str) -> str:
    """How a report names an entry of Summary.untuned: a method's merge at common settings, or the search's start
    (the genome's start: space's entry of STARTS)."""
    return f"search's start ({STARTS[space]})" if name == START else f"untuned merge: {name}"


class Summary(_Record):
    """A finished run: its best trial, the test scores it is compared with, and what the search cost."""

    target: str
    """The first task's name."""
    method: str
    space: Literal["ps", "dfs", "hybrid"]
    best: Best
    parents: dict[str, float]
    """Test score of the base and of each parent."""
    untuned: dict[str, float]
    """Test score of merges made without a search (each method at common settings) and of the search's start."""
    trials: int
    failed_trials: int
    budget: int
    """Trials, at most (a hybrid run: both stages')."""
    budget_items: int | None = None
    """The budget in dev items scored, if one was given (a hybrid run: each stage's)."""
    budget_tokens: int | None = None
    """The budget in tokens generated, if one was given (a hybrid run: each stage's)."""
    genes: int
    population: int
    seconds_per_trial: SecondsPerTrial
    threads: int
    wall_seconds: float
    sessions: int
    """How many times `shoal evolve` ran on the folder (a resumed run: more than one)."""
    stages: dict[str, StageResult] | None = None
    """Hybrid runs: each stage's best."""
    fitness: str | None = None
    """How trials were scored: full, or subset (N dev items per task and generation)."""
    compute: Cost | None = None
    """What the search's trials cost in all (not the selection's re-scoring, nor the test scores)."""
    selection: Selection | None = None
    """How the best trial was picked (a hybrid run: in its last stage)."""
    pool: PoolResult | None = None
    """A tournament over subsets of the parents (a hybrid run: its PS stage's); `parents` and `untuned` then score
    every parent of the pool and merges of all of them, and `trials`, `compute` and `wall_seconds` count every
    subset's search."""
