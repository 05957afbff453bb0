"""The `shoal` command: parse, validate, call the library, print; a ShoalError becomes one line and exit 2."""

from __future__ import annotations

import sys

from rich.console import Console
from typer.exceptions import TyperException

from shoal.cli import demo as _demo  # noqa: F401  (registers `shoal demo`)
from shoal.cli import evaluate as _evaluate  # noqa: F401  (registers `shoal eval`)
from shoal.cli import evolve as _evolve  # noqa: F401  (registers `shoal evolve`)
from shoal.cli import merge as _merge  # noqa: F401  (registers `shoal merge`)
from shoal.cli import report as _report  # noqa: F401  (registers `shoal report`)
from shoal.cli import zoo as _zoo  # noqa: F401  (registers `shoal zoo`)
from shoal.cli.app import app
from shoal.errors import ShoalError


def main() -> None:
    try:
        app(standalone_mode=False)
    except ShoalError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print(
            "[bold red]interrupted[/]: no half-written model is left; `shoal evolve` continues from its stored trials"
        )
        sys.exit(130)
    except TyperException as exc:  # usage errors of the click that typer bundles: its message, its exit code (2)
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
