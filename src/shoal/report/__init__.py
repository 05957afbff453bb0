"""Turn a `shoal evolve` run folder into files a person opens: fitness, recipe and path plots and a markdown table."""

from shoal.report.load import HybridRun, Run, Stage, load_hybrid, load_run, run_space
from shoal.report.markdown import hybrid_progress, path_line, render_hybrid_markdown, render_markdown
from shoal.report.plots import (
    PathBox,
    RecipeMatrix,
    best_so_far,
    path_boxes,
    plot_fitness,
    plot_path,
    plot_recipe,
    recipe_matrix,
    scale_text,
)
from shoal.report.write import write_hybrid_report, write_report, write_run_report

__all__ = [
    "HybridRun",
    "PathBox",
    "RecipeMatrix",
    "Run",
    "Stage",
    "best_so_far",
    "hybrid_progress",
    "load_hybrid",
    "load_run",
    "path_boxes",
    "path_line",
    "plot_fitness",
    "plot_path",
    "plot_recipe",
    "recipe_matrix",
    "render_hybrid_markdown",
    "render_markdown",
    "run_space",
    "scale_text",
    "write_hybrid_report",
    "write_report",
    "write_run_report",
]
