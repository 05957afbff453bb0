"""Write a run's report folder (fitness.png, recipe.png or path.png, report.md) from a loaded run."""

from __future__ import annotations

import os
from pathlib import Path

from shoal.errors import ShoalError
from shoal.report.load import HybridRun, Run, load_hybrid, load_run, run_space
from shoal.report.markdown import render_hybrid_markdown, render_markdown
from shoal.report.plots import plot_compute, plot_fitness, plot_path, plot_recipe, recipe_matrix


def write_report(folder: Path, storage: str | None = None) -> list[Path]:
    """Load the run in `folder` and write `folder/report/`; return the paths written (report.md, then the images).

    A hybrid run writes each stage's report into `folder/<stage>/report/` first, then its combined report.
    """
    folder = Path(folder)
    if run_space(folder) == "hybrid":
        if storage is not None:
            raise ShoalError(f"{folder} is a hybrid run whose stages each have their own study; --storage cannot "
                             f"apply to both: report a stage with `shoal report {folder}/STAGE --storage URL`")
        return write_hybrid_report(load_hybrid(folder), folder / "report")
    run = load_run(folder, storage)
    return write_run_report(run, folder / "report")


def write_run_report(run: Run, out: Path) -> list[Path]:
    """Draw and render `run` into the folder `out` (created if needed); return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    title = " · ".join(part for part in (run.target, run.method, run.space) if part)
    written = [
        plot_fitness(
            out / "fitness.png",
            [t.index for t in run.trials],
            [t.value for t in run.trials],
            [t.generation for t in run.trials],
            title=f"{title}: fitness by trial" if title else "fitness by trial",
        )
    ]
    if any(t.items for t in run.trials):  # runs that count the items they score
        written.append(plot_compute(out / "compute.png", [t.items for t in run.trials], [t.value for t in run.trials],
                                    title=f"{title}: best so far by compute" if title else "best so far by compute"))
    if run.summary is not None:
        best = run.summary.best
        trial = f" (trial #{best.trial})"
        matrix = recipe_matrix(best.layers or {}, best.embeddings)
        if matrix.rows and matrix.columns:
            heading = f"{title}: best recipe{trial}" if title else f"best recipe{trial}"
            written.append(plot_recipe(out / "recipe.png", matrix, title=heading))
        if best.path is not None:
            heading = f"{title}: best path{trial}" if title else f"best path{trial}"
            steps = [step.model_dump() for step in best.path]
            written.append(plot_path(out / "path.png", steps, best.parents_order, title=heading))
    report = out / "report.md"
    report.write_text(render_markdown(run, [p.name for p in written]))
    return [report, *written]


def write_hybrid_report(hybrid: HybridRun, out: Path) -> list[Path]:
    """Write each stage's report into its own folder, then the combined report.md into `out`; return the paths
    written, stage by stage, the combined report.md last."""
    written: list[Path] = []
    links: dict[str, list[str]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for stage in hybrid.stages:
        if stage.run is None:
            continue
        paths = write_run_report(stage.run, stage.folder / "report")
        written += paths
        links[stage.name] = [Path(os.path.relpath(p, out)).as_posix() for p in paths]
    report = out / "report.md"
    report.write_text(render_hybrid_markdown(hybrid, links))
    return [*written, report]
