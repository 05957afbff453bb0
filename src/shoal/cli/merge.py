"""`shoal merge RECIPE OUT_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shoal.cli.app import app
from shoal.cli.progress import bar


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe in mergekit's YAML format.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (written atomically).")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for random methods (overrides the recipe's).")] = None,
    shard_size: Annotated[float, typer.Option(help="Largest shard, in GB.")] = 2.0,
) -> None:
    """Merge the parents named in RECIPE into a new model folder OUT_DIR."""
    from shoal.merge.engine import run_merge
    from shoal.recipe import load_recipe

    parsed = load_recipe(recipe)
    if seed is not None:
        parsed = parsed.model_copy(update={"seed": seed})
    progress = bar()
    task = progress.add_task("merging tensors", total=None)

    def show(done: int, total: int) -> None:
        if done == 0:
            progress.start()  # only once the recipe and parents have been checked
        progress.update(task, completed=done, total=total)

    try:
        run_merge(
            parsed,
            out_dir,
            recipe_text=recipe.read_text() if seed is None else None,
            device=device,
            overwrite=overwrite,
            max_shard_bytes=int(shard_size * 1024**3),
            on_tensor=show,
        )
    finally:
        progress.stop()
    Console(stderr=True).print(f"wrote [bold]{out_dir}[/]")
