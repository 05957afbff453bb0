"""`shoal eval MODEL --task TASK`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shoal.cli.app import app
from shoal.cli.progress import console


@app.command(name="eval")
def eval_command(
    model: Annotated[Path, typer.Argument(
        help="Model folder (config, weights, tokenizer; or a vision-language model and its processor).")],
    task: Annotated[list[Path], typer.Option(help="Task folder or its task.yaml; repeat for several.")],
    split: Annotated[str, typer.Option(help="Split to score, as named in task.yaml.")] = "dev",
    as_json: Annotated[bool, typer.Option("--json", help="Print only a JSON list, one object per task.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts (or prompt-choice pairs) per forward pass.")] = 64,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N items of the split.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    allow_pickle: Annotated[bool, typer.Option(
        help="Also load PyTorch pickle weights (*.bin); unpickling runs code, so only for files you trust.")] = False,
) -> None:
    """Score MODEL on each TASK's split."""
    from transformers.utils import logging as transformers_logging

    from shoal.evaluate import evaluate, load_task
    from shoal.evaluate.runner import load_model

    transformers_logging.disable_progress_bar()
    tasks = [load_task(t) for t in task]
    loaded, tokenizer = load_model(model, device, allow_pickle=allow_pickle)
    results = [evaluate(loaded, t, split, tokenizer=tokenizer, batch_size=batch_size, limit=limit) for t in tasks]
    if as_json:
        typer.echo(json.dumps([r.summary() for r in results], indent=2))
        return
    table = Table(title=escape(f"shoal eval {model}"))
    for column in ("task", "split", "metric", "score", "n", "constraint failures", "seconds"):
        table.add_column(column, justify="right" if column in ("score", "n", "seconds") else "left")
    for r in results:
        failures = ", ".join(f"{escape(name)}: {count}" for name, count in r.constraint_failures.items()) or "-"
        table.add_row(escape(r.task), escape(r.split), r.metric, f"{r.score:.4f}", str(r.n), failures, f"{r.seconds:.2f}")
    console().print(table)
