"""Racing a CMA-ES generation: its candidates are scored on items in rounds, and a candidate whose upper confidence
bound falls below the μ-th best lower bound, so that it cannot reach the μ candidates CMA-ES selects, stops early.

The bound. Each task's items are scored in one random order per generation, so after n of its N items a
candidate's mean is a sample drawn without replacement from the N item scores (each in [0, 1]). The
Hoeffding-Serfling inequality (Serfling 1974; in the form of Bardenet & Maillard 2015, Thm 2.4) bounds how far it
lies from the mean over all N items: with probability at least 1 - δ,

    |mean_n - mean_N| <= sqrt(ρ_n ln(2/δ) / (2n)),   ρ_n = min(1 - (n-1)/N, (1 - n/N)(1 + 1/n)),

which is 0 once n = N. The fitness is the weighted sum of task means, so its radius is the weighted sum of the
tasks' radii, each at δ / tasks; δ itself is the race's `delta` split over every (candidate, round) comparison
(a union bound), so with probability at least 1 - delta no bound used by the race is wrong.

The rule. After each round, a candidate still racing is dropped when its upper bound is below the μ-th largest
lower bound of the candidates still racing. If the bounds hold, μ candidates have a whole-split fitness above
that lower bound, so the dropped one is not among the best μ: the selected set is that of scoring everyone on
every item. A candidate with one of the μ largest lower bounds is never dropped, so μ always finish.

What CMA-ES is told. A finished candidate: its fitness on every item. A dropped one: its upper bound when it was
dropped. If the bounds hold, that is below the whole-split fitness of each of the μ finishers with the largest
fitness, so the μ best told values are the selected set, in its true order, and the weights CMA-ES gives them are
those of a full evaluation. The order among dropped candidates (which `cmaes`' active covariance update gives
negative weights) is that of their upper bounds, an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ScoreItems = Callable[[int, int, int, int], list[float]]
"""(candidate, task, start, stop) -> the candidate's scores, each in [0, 1], on items start..stop-1 of the task in
the generation's order."""


def radius(n: int, total: int, delta: float) -> float:
    """Hoeffding-Serfling: how far the mean of n of `total` scores in [0, 1], drawn without replacement, may lie
    from the mean of all of them, with probability at least 1 - delta."""
    if n >= total:
        return 0.0
    rho = min(1 - (n - 1) / total, (1 - n / total) * (1 + 1 / n))
    return math.sqrt(rho * math.log(2 / delta) / (2 * n))


def schedule(total: int, first: int) -> list[int]:
    """Items scored by the end of each round: `first`, then doubling, up to `total`."""
    ends, n = [], min(first, total)
    while True:
        ends.append(n)
        if n == total:
            return ends
        n = min(2 * n, total)


@dataclass
class Entrant:
    """One candidate's race: the item scores it got (per task), and where it stopped."""

    scores: list[list[float]]
    dropped_round: int | None = None
    """The round after which it was dropped (None: it was scored on every item)."""
    told: float = 0.0
    """What CMA-ES is told: its whole-split fitness, or its upper bound when it was dropped."""
    bounds: list[tuple[float, float]] = field(default_factory=list)
    """Its (lower, upper) bound after each round it ran."""

    @property
    def dropped(self) -> bool:
        return self.dropped_round is not None

    @property
    def items(self) -> int:
        return sum(len(s) for s in self.scores)


def _mean(scores: Sequence[float]) -> float:
    return sum(scores) / len(scores)


def race(
    candidates: int, sizes: Sequence[int], weights: Sequence[float], mu: int, score: ScoreItems, *,
    first: int = 8, delta: float = 0.05,
) -> list[Entrant]:
    """Race `candidates` on tasks of `sizes` items (fitness: the `weights`-weighted sum of task means) and return
    each one's Entrant; μ (`mu`) of them are scored on every item. `first` items per task in the first round."""
    if not 1 <= mu <= candidates:
        raise ValueError(f"mu must lie in [1, {candidates}], got {mu}")
    plans = [schedule(size, first) for size in sizes]
    rounds = max(len(p) for p in plans)
    ends = [[p[min(r, len(p) - 1)] for p in plans] for r in range(rounds)]
    step = delta / (candidates * rounds * len(sizes))  # per task, candidate and round: a union bound
    entrants = [Entrant([[] for _ in sizes]) for _ in range(candidates)]
    for r, end in enumerate(ends):
        racing = [c for c, e in enumerate(entrants) if not e.dropped]
        for c in racing:
            for t, stop in enumerate(end):
                start = len(entrants[c].scores[t])
                if stop > start:
                    entrants[c].scores[t] += score(c, t, start, stop)
            e = entrants[c]
            middle = sum(w * _mean(s) for w, s in zip(weights, e.scores))
            width = sum(abs(w) * radius(len(s), size, step) for w, s, size in zip(weights, e.scores, sizes))
            e.bounds.append((middle - width, middle + width))
        if r == rounds - 1:
            break
        floor = sorted((entrants[c].bounds[-1][0] for c in racing), reverse=True)[mu - 1]
        for c in racing:
            if entrants[c].bounds[-1][1] < floor:
                entrants[c].dropped_round = r
    for e in entrants:
        e.told = e.bounds[-1][1] if e.dropped else e.bounds[-1][0]  # a finisher's bounds are both its fitness
    return entrants
