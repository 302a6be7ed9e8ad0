"""The command line: parse options, build a frozen config, call the pipeline, map errors to exit codes.

Imports nothing heavy at module level: `siglip --help` must not pay for torch, transformers or pyarrow. The
commands register themselves on `app` as their modules are imported, in the order `--help` lists them:
run (embed, tag, classify), bench, serving (serve), query (search, dedup), then doctor here.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from .app import app
from .options import Model

# isort: off
from . import run, bench, serving, query  # noqa: E402,F401 - their commands, registered on app in this order
# isort: on


@app.command()
def doctor(
    model: Model = ...,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show what a bug report needs: versions, devices, what auto picks, caches, shared memory, the model.

    Reads only; loads no model."""
    from .. import doctor as check

    report = check.report(model)
    typer.echo(json.dumps(report, indent=2) if json_out else check.text(report))


def main() -> None:
    """Console-script entry point. Usage errors in click's plain form, the message on one line ("Error: ..."),
    not in a box drawn to the terminal's width that wraps it (and that a script's log keeps as box art)."""
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("siglip: interrupted", err=True)
        code = 130
    except Exception as e:  # click's exceptions (typer vendors click): a usage error shows itself, exit 2
        if type(e).__name__ == "Abort":  # Ctrl-C (or an end of input) as older typer and click report it
            typer.echo("siglip: interrupted", err=True)
            code = 130
        elif callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            code = e.exit_code
        else:
            raise
    sys.exit(code if isinstance(code, int) else 0)
