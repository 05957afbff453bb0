"""`shoal merge RECIPE OUT_DIR`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from shoal import yamlfile
from shoal.cli.app import app
from shoal.cli.progress import bar
from shoal.errors import Interrupted, ShoalError


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe in mergekit's YAML format.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (written atomically).")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for random methods (overrides the recipe's).")] = None,
    shard_size: Annotated[float, typer.Option(help="Largest shard, in GB (more than 0).")] = 2.0,
) -> None:
    """Merge the parents named in RECIPE into a new model folder OUT_DIR."""
    from shoal.merge.engine import run_merge
    from shoal.recipe import load_recipe

    if not (math.isfinite(shard_size) and shard_size * 1024**3 >= 1):
        raise ShoalError(f"--shard-size {shard_size}: give the largest shard's size in GB, a number above 0")

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
            recipe_text=yamlfile.read_text(recipe) if seed is None else None,
            device=device,
            overwrite=overwrite,
            max_shard_bytes=int(shard_size * 1024**3),
            on_tensor=show,
        )
    except KeyboardInterrupt:
        kept = "the earlier OUT_DIR is unchanged" if overwrite and out_dir.exists() else "nothing was written"
        raise Interrupted(f"{out_dir}: {kept} (no half-written model is left); run the command again to merge") from None
    finally:
        progress.stop()
    Console(stderr=True).print(f"wrote [bold]{escape(str(out_dir))}[/]")
