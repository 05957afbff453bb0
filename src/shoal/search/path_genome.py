"""The data-flow genome: an indicator gene per slot (on the path iff > 0) and the seam scales."""

from __future__ import annotations

import numpy as np

from shoal.flow.path import Layout, Scaling, Step, choose_path, seams
from shoal.search.genome import Gene, GeneSpace


class PathGenome(GeneSpace):
    """Genes `slotNNN.<parent>.layerL` in [-1, 1] for the T slots, then the scales in scale_bounds:
    `scale.<parent>.<i>-><parent>.<j>` (full W, row by row) or `scale.<parent>-><parent>` (seams)."""

    def __init__(self, layout: Layout, scaling: Scaling, scale_bounds: tuple[float, float]) -> None:
        self.layout = layout
        self.scaling = scaling
        low, high = scale_bounds
        self.genes = [
            Gene(f"slot{t:03d}.{parent}.layer{layer}", parent, "on", f"slot{t}", -1.0, 1.0)
            for t, (parent, layer) in ((t, layout.slot(t)) for t in range(layout.t))
        ]
        if scaling == "full":
            places = [layout.place(i) for i in range(layout.m)]
            self.genes += [
                Gene(f"scale.{pi}.{li}->{pj}.{lj}", pj, "scale", f"{pi}.{li}->{pj}.{lj}", low, high)
                for pi, li in places
                for pj, lj in places
            ]
        elif scaling == "seam":
            self.genes += [Gene(f"scale.{a}->{b}", b, "scale", f"{a}->{b}", low, high) for a, b in seams(layout)]

    def start(self) -> np.ndarray:
        """A's layers of the first repetition on (indicator +0.5), every other slot off (-0.5), scales at 1
        (or the middle of their bounds when 1 is outside them): the search starts from model A, as in the paper."""
        first = self.layout.layers[0]
        x = []
        for i, gene in enumerate(self.genes):
            if gene.param == "on":
                x.append(0.75 if i < first else 0.25)
            else:
                one = (1.0 - gene.low) / (gene.high - gene.low)
                x.append(one if 0 <= one <= 1 else 0.5)
        return np.array(x)

    def path(self, values: dict[str, float]) -> list[Step]:
        indicator = [values[g.name] for g in self.genes if g.param == "on"]
        scales = [values[g.name] for g in self.genes if g.param == "scale"]
        return choose_path(self.layout, indicator, self.scaling, scales)
