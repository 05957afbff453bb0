"""`shoal demo` compares its run with the pre-registered seeds that benchmarks/zoo_seeds.py measured: the shipped
reference must be exactly that script's output, and the comparison must place a run inside or outside its range."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from shoal.cli.demo import against_measured
from shoal.search.summary import Summary

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_reference_is_the_benchmarks_result() -> None:
    shipped = json.loads(files("shoal.zoo").joinpath("measured.json").read_text())
    results = json.loads((ROOT / "benchmarks" / "results" / "zoo_seeds.json").read_text())
    assert [r["seed"] for r in shipped["rows"]] == [0, 1, 2, 3, 4]  # the pre-registered seeds, every one
    for mine, full in zip(shipped["rows"], results["rows"], strict=True):
        assert mine == {key: full[key] for key in mine}
    assert shipped["versions"]["torch"] == results["versions"]["torch"]


def _summary(test: float, parents: dict[str, float]) -> Summary:
    return Summary.model_construct(best=type("B", (), {"test": test})(), parents=parents)


def test_a_run_is_placed_against_the_measured_range() -> None:
    rows = json.loads(files("shoal.zoo").joinpath("measured.json").read_text())["rows"]
    low, high = min(r["evolved_test"] for r in rows), max(r["evolved_test"] for r in rows)
    inside = against_measured(_summary(0.5, {"base": 0.3, "math": 0.0}), seed=7)
    assert "this run (seed 7): 50.0, +20.0 — inside that range" in inside and low < 50 < high
    assert f"{low:.1f} to {high:.1f}" in inside
    outside = against_measured(_summary(0.1, {"base": 0.05}), seed=0)
    assert outside.endswith("outside that range") and "10.0, +5.0" in outside
