"""The command line: parse options, build a frozen config, call the pipeline, map errors to exit codes.

Imports nothing heavy at module level: `siglip --help` must not pay for torch, transformers or pyarrow.
"""

from __future__ import annotations

import re
import sys
from typing import List, Optional

import typer
from typing_extensions import Annotated

from . import __version__
from .config import DEFAULT_EXTENSIONS, ModelConfig, OutputConfig, RunConfig, SourceConfig, default_model, default_workers
from .errors import SiglipError, UsageError

EXIT_CODES = "Exit codes: 0 done (failed images are rows, not failures, unless --strict); 1 the run could not be done; 2 bad usage."

app = typer.Typer(
    help=f"Batch image embedding and tagging with SigLIP 2, to Parquet or JSON Lines.\n\n{EXIT_CODES}",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise typer.BadParameter("expected auto, cpu, mps, cuda or cuda:N")
    return value


def _dtype(value: str) -> str:
    if value not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter("expected auto, float32, bfloat16 or float16")
    return value


def _version(value: bool) -> None:
    if value:
        typer.echo(f"siglip {__version__}")
        raise typer.Exit()


# Options shared by the commands that read images.
Paths = Annotated[Optional[List[str]], typer.Argument(help="Image files and folders (folders are walked recursively).", show_default=False)]
Output = Annotated[str, typer.Option("--output", "-o", help="Output .parquet file, or - for JSON Lines on stdout.")]
FilesFrom = Annotated[Optional[str], typer.Option("--files-from", help="Read more paths from FILE, one a line (- is stdin); each is attempted whatever its extension.", show_default=False)]
Ext = Annotated[Optional[List[str]], typer.Option("--ext", help="Extensions to pick up in folders (repeatable; default: common image types).", show_default=False)]
Model = Annotated[str, typer.Option("--model", "-m", help="Hub id or local folder of a SigLIP / SigLIP 2 checkpoint. [env: SIGLIP_MODEL]", default_factory=default_model, show_default=False)]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).", show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto|cuda|cuda:N|mps|cpu (auto picks the best present).", callback=_device)]
Dtype = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (auto: bfloat16 on CUDA, float32 elsewhere).", callback=_dtype)]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Images per batch (default: 256 on CUDA, 16 on CPU).", show_default=False)]
Workers = Annotated[int, typer.Option("--workers", "-j", min=0, help="Decode worker processes (0: decode in the main process).", default_factory=default_workers, show_default=f"{default_workers()} here")]
MaxPatches = Annotated[Optional[int], typer.Option("--max-patches", min=1, help="NaFlex checkpoints: patches per image (default: the checkpoint's).", show_default=False)]
Float16 = Annotated[bool, typer.Option("--float16", help="Store embeddings as float16 (half the size).")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 if any image failed.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary on stderr.")]


def _execute(cfg: RunConfig, texts: Optional[list[str]] = None) -> None:
    """Run the pipeline; expected errors become one line on stderr and an exit code, never a traceback."""
    try:
        from . import pipeline

        summary = pipeline.run_texts(cfg, texts) if texts is not None else pipeline.run(cfg)
    except SiglipError as e:
        typer.echo(f"siglip: error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("siglip: interrupted", err=True)
        raise typer.Exit(130)
    if not cfg.quiet:
        typer.echo(summary.line(), err=True)
    if cfg.strict and summary.failed:
        typer.echo(f"siglip: {summary.failed} image(s) failed (--strict)", err=True)
        raise typer.Exit(1)


def _sources(paths: Optional[List[str]], files_from: Optional[str], ext: Optional[List[str]]) -> SourceConfig:
    exts = tuple(e.strip() for item in ext for e in item.split(",") if e.strip()) if ext else DEFAULT_EXTENSIONS
    return SourceConfig(paths=tuple(paths or ()), files_from=files_from, extensions=exts)


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as e:
        raise typer.BadParameter(f"cannot read {what} {path}: {e.strerror or e}")


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


@app.command(epilog=EXIT_CODES)
def embed(
    paths: Paths = None,
    output: Output = "-",
    files_from: FilesFrom = None,
    ext: Ext = None,
    text: Annotated[Optional[List[str]], typer.Option("--text", "-t", help="Embed this text instead of images (repeatable).", show_default=False)] = None,
    texts_file: Annotated[Optional[str], typer.Option("--texts-file", help="Embed the texts in FILE, one a line (- is stdin).", show_default=False)] = None,
    model: Model = ..., revision: Revision = None, device: Device = "auto", dtype: Dtype = "auto",
    batch_size: BatchSize = None, workers: Workers = ..., max_patches: MaxPatches = None,
    float16: Float16 = False, strict: Strict = False, quiet: Quiet = False,
) -> None:
    """Write the L2-normalized embedding of every image (or of the given texts), one row each."""
    from .tasks import EmbedSpec

    texts = list(text or []) + (_read_lines(texts_file, "texts file") if texts_file else [])
    has_images = bool(paths or files_from)
    if texts and has_images:
        raise typer.BadParameter("give images or texts (--text, --texts-file), not both")
    if not texts and not has_images:
        raise typer.BadParameter("nothing to embed: give image files or folders, --files-from, --text or --texts-file")
    cfg = RunConfig(
        model=ModelConfig(model, revision, device, dtype, max_patches),
        sources=_sources(paths, files_from, ext), output=OutputConfig(output, float16),
        head=EmbedSpec(float16), batch_size=batch_size, workers=workers, strict=strict, quiet=quiet,
    )
    _execute(cfg, texts if texts else None)


def main() -> None:
    """Console-script entry point."""
    app()
