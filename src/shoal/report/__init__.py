"""Turn a `shoal evolve` run folder into files a person opens: fitness and recipe plots and a markdown table."""

from shoal.report.load import Run, Summary, Trial, load_run
from shoal.report.markdown import render_markdown
from shoal.report.plots import RecipeMatrix, best_so_far, plot_fitness, plot_recipe, recipe_matrix
from shoal.report.write import write_report, write_run_report

__all__ = [
    "RecipeMatrix",
    "Run",
    "Summary",
    "Trial",
    "best_so_far",
    "load_run",
    "plot_fitness",
    "plot_recipe",
    "recipe_matrix",
    "render_markdown",
    "write_report",
    "write_run_report",
]
