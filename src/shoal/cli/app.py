"""The typer application that every `shoal` sub-command registers on."""

import typer

app = typer.Typer(
    name="shoal",
    help="Evolve new language models out of existing open ones by model merging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
