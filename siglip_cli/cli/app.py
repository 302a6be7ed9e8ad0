"""The Typer app every command is registered on, and the text its help ends with."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

EXIT_CODES = (
    "Exit codes: 0 done (failed images are rows, not failures, unless --strict); 1 the run could not be done; 2 bad "
    "usage."
)

app = typer.Typer(
    help=f"Batch image embedding and tagging with SigLIP 2, to Parquet or JSON Lines.\n\n{EXIT_CODES}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"siglip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass
