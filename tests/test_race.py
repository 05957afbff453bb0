"""Racing a generation: on hand-made populations with known per-item scores, no candidate of the selected set is
ever dropped, what CMA-ES is told ranks the selected set as a full evaluation would, and items are saved."""

from __future__ import annotations

import random

import pytest

from shoal.search.race import radius, race, schedule


def _population(seed: int, candidates: int, sizes: list[int]) -> list[list[list[float]]]:
    """Per candidate and task, 0/1 item scores with a candidate-specific rate (some close, some far apart)."""
    rng = random.Random(seed)
    rates = [rng.uniform(0.05, 0.95) for _ in range(candidates)]
    return [[[float(rng.random() < p) for _ in range(size)] for size in sizes] for p in rates]


def _full(items: list[list[float]], weights: list[float]) -> float:
    return sum(w * sum(s) / len(s) for w, s in zip(weights, items))


@pytest.mark.parametrize("seed", range(30))
def test_racing_never_drops_a_candidate_of_the_selected_set(seed) -> None:
    sizes, weights, mu, candidates = [400, 150], [1.0, 0.5], 5, 10
    population = _population(seed, candidates, sizes)
    asked: list[tuple[int, int, int, int]] = []

    def score(c: int, t: int, start: int, stop: int) -> list[float]:
        asked.append((c, t, start, stop))
        return population[c][t][start:stop]

    entrants = race(candidates, sizes, weights, mu, score, first=8)
    full = [_full(items, weights) for items in population]
    selected = sorted(range(candidates), key=lambda c: -full[c])[:mu]
    assert not any(entrants[c].dropped for c in selected)
    finishers = [c for c, e in enumerate(entrants) if not e.dropped]
    assert len(finishers) >= mu
    for c in finishers:
        assert entrants[c].told == pytest.approx(full[c])  # scored on every item
    told = sorted(range(candidates), key=lambda c: -entrants[c].told)[:mu]
    assert told == selected  # CMA-ES ranks its selected set as after a full evaluation
    for c, e in enumerate(entrants):  # items are scored in order, once each
        assert e.items == sum(len(s) for s in e.scores)
        starts = [(t, start) for cc, t, start, _ in asked if cc == c]
        assert len(starts) == len(set(starts))


def test_racing_saves_items_on_a_spread_population() -> None:
    sizes, weights, mu = [400], [1.0], 3
    rates = [0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.85, 0.9, 0.92, 0.95]
    rng = random.Random(0)
    population = [[[float(rng.random() < p) for _ in range(400)]] for p in rates]
    entrants = race(10, sizes, weights, mu, lambda c, t, a, b: population[c][t][a:b], first=16)
    assert [e.dropped for e in entrants[:5]] == [True] * 5  # far below the best three: stopped early
    assert sum(e.items for e in entrants) < 0.7 * 10 * 400


def test_the_bound_closes_when_every_item_is_scored() -> None:
    assert radius(50, 50, 0.01) == 0.0
    assert radius(10, 50, 0.01) < radius(10, 10_000, 0.01) < radius(5, 10_000, 0.01)
    assert schedule(100, 8) == [8, 16, 32, 64, 100] and schedule(5, 8) == [5]
