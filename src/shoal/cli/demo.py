"""`shoal demo`: the main job on built-in parents (for now: random parents merged with DARE-TIES)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from shoal.cli.app import app
from shoal.cli.progress import bar


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's parents and outputs.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Seed for the parents and the merge.")] = 0,
) -> None:
    """Build small random parents and merge them with DARE-TIES; load the result with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from shoal.merge.engine import run_merge
    from shoal.recipe import parse_recipe
    from shoal.synthetic import make_parents

    console = Console()
    paths = make_parents(out / "parents", seed=seed)
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[n]), "parameters": {"weight": w, "density": d}}
            for n, w, d in [("a", [0.2, 0.8], 0.6), ("b", 0.5, 0.5), ("c", 0.3, [0.9, 0.3])]
        ],
        "dtype": "bfloat16",
        "seed": seed,
    }
    text = yaml.safe_dump(recipe, sort_keys=False)
    (out / "recipe.yaml").write_text(text)
    with bar() as progress:
        task = progress.add_task("merging tensors", total=None)
        merged = run_merge(
            parse_recipe(text, str(out / "recipe.yaml")),
            out / "merged",
            recipe_text=text,
            overwrite=True,
            on_tensor=lambda done, total: progress.update(task, completed=done, total=total),
        )
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.arange(4, 20).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    table = Table(title="shoal demo")
    table.add_column("what")
    table.add_column("value")
    table.add_row("recipe", str(out / "recipe.yaml"))
    table.add_row("merged model", str(merged))
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    table.add_row("loads with transformers", type(model).__name__)
    table.add_row("logits finite", str(bool(torch.isfinite(logits).all())))
    console.print(table)
