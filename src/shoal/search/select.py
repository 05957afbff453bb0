"""Honest selection: the top trials by search fitness scored again on the whole dev split, the best re-score picked.

The best of many noisy scores overstates itself (it was picked for its luck); scoring the few leaders again on
every dev item, with the DARE seed each trial stored, ranks them by a measurement that did not pick them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shoal.errors import EveryTrialFailed, ShoalError
from shoal.search.trials import Evaluation, Outcome, Trial


@dataclass
class Rescore:
    trial: Trial
    evaluation: Evaluation


@dataclass
class Selection:
    pick: Rescore
    rescored: list[Rescore]
    """The top trials by search fitness, in that order (best first), each with its whole-dev Evaluation."""


def top_trials(trials: list[Trial], top: int) -> list[Trial]:
    """The `top` trials with the highest search fitness, best first (the earliest of equals first)."""
    complete = [t for t in trials if t.value is not None]
    if not complete:
        raise EveryTrialFailed(f"every trial failed; the first (trial {trials[0].index}): {trials[0].error}")
    return sorted(complete, key=lambda t: (-t.value, t.index))[:top]  # type: ignore[operator]


def select(trials: list[Trial], top: int, rescore: Callable[[Trial], Outcome]) -> Selection:
    """Re-score the `top` trials by search fitness and pick the best re-score (ties: the better search fitness)."""
    leaders = top_trials(trials, top)
    rescored = []
    for trial in leaders:
        outcome = rescore(trial)
        if isinstance(outcome, str):
            raise ShoalError(f"trial {trial.index} scored {trial.value} in the search and now fails on the whole "
                             f"dev split: {outcome}")
        rescored.append(Rescore(trial, outcome))
    pick = max(rescored, key=lambda r: r.evaluation.fitness)  # max keeps the first of equals: the search's order
    return Selection(pick, rescored)


def stored_score(trial: Trial) -> Evaluation:
    """A trial's own Evaluation, when its search fitness already is its whole-dev score (fitness mode `full`): no
    item is scored again."""
    assert trial.value is not None
    return Evaluation(trial.value, trial.dev_scores, 0.0, 0.0)
