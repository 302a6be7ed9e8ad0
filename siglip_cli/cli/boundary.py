"""Where a command meets the run: its options checked and built into a frozen config, and errors and signals
turned into one line and an exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import List, Optional

import typer

from ..config import (
    DEFAULT_EXTENSIONS,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SourceConfig,
    usable_cpus,
)
from ..errors import SiglipError, UsageError
from .options import bound

# The options that choose or run the model: with --server they are the server's (the defaults they must keep).
SERVER_OWNS = {
    "revision": None,
    "device": "auto",
    "dtype": "auto",
    "backend": "auto",
    "quantize": "none",
    "int8_bound": "0.995,0.98",
    "max_patches": None,
    "compile": False,
    "ray": None,
}


def remote_guard(opts: dict) -> None:
    """With --server: the model's options are the server's (refused here); --model, given on the command line,
    must name its model (else "", the server's); the decode workers take every CPU (the model is elsewhere)."""
    if not opts.get("server"):
        return
    if given := [k for k, v in SERVER_OWNS.items() if k in opts and opts[k] != v]:
        flag = "--" + given[0].replace("_", "-")
        raise typer.BadParameter(f"{flag} is the server's setting with --server: start `siglip serve` with it")
    ctx = opts["ctx"]  # (typer may carry a click of its own: the source is compared by name)
    if getattr(ctx.get_parameter_source("model"), "name", None) != "COMMANDLINE":
        opts["model"] = ""
    if getattr(ctx.get_parameter_source("workers"), "name", None) == "DEFAULT":
        opts["workers"] = max(1, min(16, usable_cpus()))


def _pipe_closed() -> None:
    """`siglip ... | head`: the reader has all it wants; end quietly with SIGPIPE's status, as Unix tools do."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    raise typer.Exit(141)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cron job's timeout, systemd stopping a service): unwound as Ctrl-C is, so that the workers end,
    the shared memory is freed and the rows written so far are kept."""


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise Terminated()


@contextlib.contextmanager
def one_line():
    """A command's work: expected errors are one line on stderr and an exit code, never a traceback; Ctrl-C and
    SIGTERM unwind it (its workers end, its temporary files go) and say so, exit 130 or 143."""
    main_thread = threading.current_thread() is threading.main_thread()  # (signals are the main thread's)
    before = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        yield
    except SiglipError as e:
        typer.echo(f"siglip: error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except (KeyboardInterrupt, ImportError) as e:
        # a signal during the import of a C extension (OpenVINO's, torch's) arrives as an ImportError it caused
        cause = e if isinstance(e, KeyboardInterrupt) else e.__cause__ or e.__context__
        if not isinstance(cause, KeyboardInterrupt):
            raise
        typer.echo("siglip: terminated" if isinstance(cause, Terminated) else "siglip: interrupted", err=True)
        raise typer.Exit(143 if isinstance(cause, Terminated) else 130) from None
    except BrokenPipeError:
        _pipe_closed()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


def execute(cfg: RunConfig, texts: Optional[list[str]] = None) -> None:
    """Run the pipeline (see one_line)."""
    with one_line():
        from .. import pipeline

        summary = pipeline.run_texts(cfg, texts) if texts is not None else pipeline.run(cfg)
    if not cfg.quiet:
        typer.echo(summary.line(), err=True)
    if summary.missing:
        typer.echo(f"siglip: error: {summary.missing} of the paths given do not exist (said above)", err=True)
        raise typer.Exit(1)
    if cfg.strict and summary.failed:
        typer.echo(f"siglip: {summary.failed} image(s) failed (--strict)", err=True)
        raise typer.Exit(1)


def output_path(value: Optional[str], opts: Optional[dict] = None) -> str:
    """-o as given (see written_name); without it, stdout, unless stdout is a terminal (a screen of numbers
    helps nobody). Options that only an index can honour, given with stdout, are usage errors: a run must not
    seem to do what it cannot."""
    given = [
        f"--{k.replace('_', '-')}" for k in ("prune", "prune_anyway", "rehash", "retry_errors") if (opts or {}).get(k)
    ]
    if given and value in (None, "-") and (value == "-" or not sys.stdout.isatty()):
        raise typer.BadParameter(
            f"{given[0]} works on an index (-o FILE.parquet or -o FOLDER); to stdout every image is done and printed"
        )
    if value is not None:
        return value
    if sys.stdout.isatty():
        typer.echo(
            "siglip: error: not writing results to a terminal; give -o FILE.parquet or -o FOLDER "
            "(or -o - to print them anyway)",
            err=True,
        )
        raise typer.Exit(2)
    return "-"


def sources_of(
    paths: Optional[List[str]],
    files_from: Optional[str],
    ext: Optional[List[str]],
    exclude: Optional[List[str]] = None,
    include_hidden: bool = False,
    raw_pairs: bool = False,
) -> SourceConfig:
    exts = tuple(e.strip() for item in ext for e in item.split(",") if e.strip()) if ext else DEFAULT_EXTENSIONS
    if files_from not in (None, "-"):  # before anything is loaded (it is read as the run goes)
        try:
            with open(files_from, "rb") as f:
                f.read(1)
        except OSError as e:
            raise typer.BadParameter(f"cannot read --files-from {files_from}: {e.strerror or e}") from None
    exclude = tuple(exclude or ())
    return SourceConfig(tuple(paths or ()), files_from, exts, exclude, include_hidden, raw_pairs)


def checked_texts(values: list[str], option: str) -> list[str]:
    """Texts from the command line as the tokenizer takes them: valid UTF-8 (a shell can pass any bytes)."""
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter(f"{option} {v.encode('utf-8', 'replace').decode()!r} is not UTF-8 text") from None
    return values


def read_lines(path: str, what: str) -> list[str]:
    from ..sources import text_lines

    return [line for line in usage(lambda: text_lines(path, what)) if line.strip()]


def run_images(head, opts: dict) -> None:
    """Build the run's config from a command's options (its locals) and execute it."""
    if not (opts["paths"] or opts["files_from"]):
        raise typer.BadParameter("no images: give image files or folders, or --files-from")
    remote_guard(opts)
    cfg = RunConfig(
        model=ModelConfig(
            opts["model"],
            opts["revision"],
            opts["device"],
            opts["dtype"],
            opts["max_patches"],
            opts["compile"],
            backend=opts["backend"],
            quantize=opts["quantize"],
            int8_bound=bound(opts["int8_bound"]),
            text_rules=opts["text_rules"],
        ),
        sources=sources_of(
            opts["paths"], opts["files_from"], opts["ext"], opts["exclude"], opts["include_hidden"], opts["raw_pairs"]
        ),
        output=OutputConfig(
            output_path(opts["output"], opts),
            opts.get("float16", False),
            opts["overwrite"],
            opts["wait"],
            opts["prune"],
            opts["prune_anyway"],
            opts["rehash"],
            opts["retry_errors"],
        ),
        head=head,
        batch_size=opts["batch_size"],
        workers=opts["workers"],
        strict=opts["strict"],
        quiet=opts["quiet"],
        max_pixels=opts["max_pixels"],
        timeout=opts["timeout"],
        exact=opts["exact"],
        ray=opts["ray"],
        ray_actors=opts["ray_actors"],
        server=opts["server"],
        insecure=opts["insecure"],
        server_retry=opts["server_retry"],
        wire=opts["wire"],
    )
    execute(cfg)


def usage(fn):
    """Turn a UsageError found while parsing option files (vocabularies, labels) into click's exit 2."""
    try:
        return fn()
    except UsageError as e:
        raise typer.BadParameter(str(e)) from None


def show_results(work, output, as_json, html, title) -> None:
    """search and dedup: their results, with errors, Ctrl-C and SIGTERM as a run's (see one_line)."""
    with one_line():
        from .. import report

        table = work()
        if html:
            report.write_html(html, table, title)
        report.emit(table, output, as_json)
        sys.stdout.flush()
