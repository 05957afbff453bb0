"""Write a run's report folder (fitness.png, recipe.png, report.md) from a loaded run."""

from __future__ import annotations

from pathlib import Path

from shoal.report.load import Run, load_run
from shoal.report.markdown import render_markdown
from shoal.report.plots import plot_fitness, plot_recipe, recipe_matrix


def write_report(folder: Path, storage: str | None = None) -> list[Path]:
    """Load the run in `folder` and write `folder/report/`; return the paths written (report.md, then the images)."""
    run = load_run(folder, storage)
    return write_run_report(run, Path(folder) / "report")


def write_run_report(run: Run, out: Path) -> list[Path]:
    """Draw and render `run` into the folder `out` (created if needed); return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    title = " · ".join(part for part in (run.target, run.method) if part)
    written = [
        plot_fitness(
            out / "fitness.png",
            [t.number for t in run.trials],
            [t.value for t in run.trials],
            [t.generation for t in run.trials],
            title=f"{title}: fitness by trial" if title else "fitness by trial",
        )
    ]
    if run.summary is not None:
        matrix = recipe_matrix(run.summary.best.layers, run.summary.best.embeddings)
        if matrix.rows and matrix.columns:
            trial = f" (trial #{run.summary.best.trial})" if run.summary.best.trial is not None else ""
            heading = f"{title}: best recipe{trial}" if title else f"best recipe{trial}"
            written.append(plot_recipe(out / "recipe.png", matrix, title=heading))
    report = out / "report.md"
    report.write_text(render_markdown(run, [p.name for p in written]))
    return [report, *written]
