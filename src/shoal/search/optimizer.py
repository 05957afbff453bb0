"""CMA-ES over the unit cube, as the paper runs it: start at the middle (or a given point), step a fraction of the
range."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from cmaes import CMA


class Optimizer(Protocol):
    """What the trial loop drives: generations of `population` asks, then one tell with every fitness."""

    population: int

    def ask(self) -> np.ndarray: ...

    def tell(self, solutions: list[tuple[np.ndarray, float]]) -> None: ...


class CmaEs:
    """The `cmaes` package's CMA-ES on [0, 1]^dim, maximising. Its asks depend only on the seed and what it was
    told, so replaying the stored trials of a generation rebuilds its exact state."""

    def __init__(
        self, dim: int, *, sigma: float = 1 / 6, population: int | None = None, seed: int = 0,
        mean: np.ndarray | None = None,
    ) -> None:
        self._cma = CMA(
            mean=np.full(dim, 0.5) if mean is None else np.asarray(mean, dtype=float),
            sigma=sigma,
            bounds=np.tile([0.0, 1.0], (dim, 1)),
            seed=seed,
            population_size=population,
        )
        self.population: int = self._cma.population_size
        self.mu: int = self.population // 2
        """How many of a generation's best candidates the update uses (cmaes' μ: half the population)."""

    def ask(self) -> np.ndarray:
        return self._cma.ask()

    def tell(self, solutions: list[tuple[np.ndarray, float]]) -> None:
        self._cma.tell([(x, -fitness) for x, fitness in solutions])  # cmaes minimises
