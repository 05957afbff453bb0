"""`shoal report RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shoal.cli.app import app
from shoal.cli.progress import console


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `shoal evolve`.")],
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (overrides run.json's).")] = None,
) -> None:
    """Write plots and a table of an evolution run into RUN_DIR/report/ (a hybrid run: also each RUN_DIR/STAGE/report/)."""
    import optuna

    from shoal.report import write_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = console()
    for path in write_report(run_dir, storage):
        out.print(str(path), highlight=False, soft_wrap=True, markup=False)
