"""The command line: parse options, build a frozen config, call the pipeline, map errors to exit codes.

Imports nothing heavy at module level: `siglip --help` must not pay for torch, transformers or pyarrow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
from typing import Annotated, List, Optional

import typer

from . import __version__
from .config import (
    ARCHS,
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TEMPLATE,
    DEFAULT_THRESHOLD,
    DEFAULT_TIMEOUT,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SourceConfig,
    default_model,
    default_workers,
    usable_cpus,
)
from .errors import RunError, SiglipError, UsageError

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


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|(cpu|mps|cuda(:\d+)?)(,(cpu|mps|cuda(:\d+)?))*", value):
        raise typer.BadParameter("expected auto, cpu, mps, cuda, cuda:N, or a list such as cuda:0,cuda:1")
    return value


def _one_of(*choices: str):
    """An option callback that accepts only the given words (exit 2 naming them otherwise)."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"expected {', '.join(choices[:-1])} or {choices[-1]}")
        return value

    return check


def _finite(value: float | None) -> float | None:
    """Every float option's callback: click's ranges let nan (and inf) through, and a nan threshold or weight
    quietly matches nothing."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("expected a finite number")
    return value


_dtype = _one_of("auto", "float32", "bfloat16", "float16")
_backend = _one_of("auto", "torch", "openvino")
_quantize = _one_of("none", "int8", "int8-weights", "int4")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"siglip {__version__}")
        raise typer.Exit()


# Options shared by the commands that read images.
Paths = Annotated[
    Optional[List[str]],
    typer.Argument(help="Image files and folders (folders are walked recursively).", show_default=False),
]


def _written_name(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """An option naming what siglip writes: not empty, and not a device, pipe or socket (an output is replaced
    whole by a rename, which would put a file in /dev/null's place; run as root, it did)."""
    stdout = param.name == "output"  # -o - is stdout; --html writes a file
    if value == "":
        raise typer.BadParameter("an empty name; give a file name" + (", or - for stdout" if stdout else ""))
    if value not in (None, "-") and os.path.exists(value) and not (os.path.isfile(value) or os.path.isdir(value)):
        raise typer.BadParameter(
            f"{value} is not a file or a folder; siglip replaces what it writes whole"
            + (" (-o - prints the results; add > /dev/null to discard them)" if stdout else "")
        )
    return value


Output = Annotated[
    Optional[str],
    typer.Option(
        "--output",
        "-o",
        callback=_written_name,
        help=(
            "Output: a FILE.parquet, a folder (a dataset of parts), or - for JSON Lines on stdout (the default when "
            "stdout is a pipe or a file). Files and folders are resumed and updated incrementally."
        ),
        show_default=False,
    ),
]
FilesFrom = Annotated[
    Optional[str],
    typer.Option(
        "--files-from",
        help="Read more paths from FILE, one a line (- is stdin); each is attempted whatever its extension.",
        show_default=False,
    ),
]
Ext = Annotated[
    Optional[List[str]],
    typer.Option(
        "--ext", help="Extensions to pick up in folders (repeatable; default: common image types).", show_default=False
    ),
]
Exclude = Annotated[
    Optional[List[str]],
    typer.Option(
        "--exclude",
        help="Leave out of folders' walks what matches this glob: a path relative to the folder given "
        "('2019/drafts/*'), or a file or folder name ('Screenshots'). Repeatable; a .siglipignore file "
        "(gitignore syntax) in any folder does the same for what is under it.",
        show_default=False,
    ),
]
RawPairs = Annotated[
    bool,
    typer.Option(
        "--raw-pairs",
        help="Index a RAW file even where the camera's JPEG (or HEIC) of the same name is beside it (by default "
        "the pair is indexed once, through the JPEG).",
    ),
]
IncludeHidden = Annotated[
    bool,
    typer.Option(
        "--include-hidden",
        help="Also walk hidden entries (names starting with '.') and the system folders of NAS and desktop "
        "systems (@eaDir, #recycle, $RECYCLE.BIN, lost+found, ...), which are skipped by default.",
    ),
]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hub id or local folder of a SigLIP / SigLIP 2 checkpoint. \\[env: SIGLIP_MODEL]",
        default_factory=default_model,
        show_default=False,
    ),
]
Revision = Annotated[
    Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).", show_default=False)
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto|cuda|cuda:N|mps|cpu, or a list (cuda:0,cuda:1). auto and cuda use every visible GPU.",
        callback=_device,
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help=(
            "auto|float32|bfloat16|float16 (auto: bfloat16 on CUDA and on CPUs with native bfloat16, float32 "
            "elsewhere)."
        ),
        callback=_dtype,
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help=(
            "auto|torch|openvino: what runs the image tower (auto: OpenVINO on a CPU when the openvino extra is "
            "installed)."
        ),
        callback=_backend,
    ),
]
Quantize = Annotated[
    str,
    typer.Option(
        "--quantize",
        help=(
            "none|int8|int8-weights|int4 (OpenVINO on a CPU): int8 quantizes weights and activations, calibrated on "
            "the run's first photos and checked against float32 on the next (see --int8-bound); int8-weights and "
            "int4 compress the weights only."
        ),
        callback=_quantize,
    ),
]


def _bound(value: str) -> tuple[float, float]:
    try:
        mean, least = (float(x) for x in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give MEAN,LEAST, two cosines such as 0.995,0.98") from None
    if not (0 <= least <= mean <= 1):
        raise typer.BadParameter(f"{value!r}: cosines from 0 to 1, the least no more than the mean")
    return mean, least


Int8Bound = Annotated[
    str,
    typer.Option(
        "--int8-bound",
        help="MEAN,LEAST: --quantize int8 is kept only where its embeddings' mean and least cosine to float32, on "
        "photos of the run, reach these; else int8 weights only, else float (said on stderr and in the metadata).",
    ),
]
BatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size", "-b", min=1, help="Images per batch (default: 256 on CUDA, 16 on CPU).", show_default=False
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers",
        "-j",
        min=0,
        help="Decode worker processes (0: decode in the main process).",
        default_factory=default_workers,
        show_default=f"{default_workers()} here",
    ),
]
MaxPatches = Annotated[
    Optional[int],
    typer.Option(
        "--max-patches",
        min=1,
        help="NaFlex checkpoints: patches per image (default: the checkpoint's).",
        show_default=False,
    ),
]
Float16 = Annotated[bool, typer.Option("--float16", help="Store embeddings as float16 (half the size).")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 if any image failed.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary on stderr.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Start afresh when the output was made with other settings (model, templates, ...)."
    ),
]
Wait = Annotated[
    bool, typer.Option("--wait", help="If another run holds the output, wait for it instead of exiting 1.")
]
Prune = Annotated[
    bool,
    typer.Option(
        "--prune",
        help=(
            "Remove the rows of files that no longer exist under the folders given (refused when a folder is missing "
            "or empty, or when more than half its rows would go)."
        ),
    ),
]
PruneAnyway = Annotated[
    bool,
    typer.Option("--prune-anyway", help="With --prune: prune even a missing or empty folder's rows, or most of them."),
]
Rehash = Annotated[
    bool,
    typer.Option("--rehash", help="Find changed files by content hash (reads every file) instead of size and mtime."),
]
MaxPixels = Annotated[
    int, typer.Option("--max-pixels", min=1, help="Refuse images with more pixels than this (decompression bombs).")
]
Timeout = Annotated[
    float,
    typer.Option(
        "--timeout",
        callback=_finite,
        min=0.1,
        help="Seconds one file may take to read and decode before it becomes an error row.",
    ),
]
Exact = Annotated[
    bool,
    typer.Option("--exact", help="Decode JPEGs at full size: bit-exact reference preprocessing, slower on big photos."),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="torch.compile the image tower: faster on a GPU after a one-time compile (cached on disk)."
    ),
]
Ray = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        help=(
            "Run on Ray Data (pip install 'siglip-cli\\[ray]'): local starts a Ray on this machine, auto joins the "
            "cluster `ray start` made, or give its address (HOST:PORT, ray://HOST:PORT)."
        ),
        show_default=False,
    ),
]
RayActors = Annotated[
    Optional[int],
    typer.Option(
        "--ray-actors",
        min=1,
        help="With --ray: encoder actors (default: one per GPU of the cluster, else one).",
        show_default=False,
    ),
]


Server = Annotated[
    Optional[str],
    typer.Option(
        "--server",
        envvar="SIGLIP_SERVER",
        help=(
            "Run the model on this `siglip serve` (http://HOST:PORT; its token from SIGLIP_API_KEY): files, decoding "
            "and the index stay here, only the model's input is sent. The model and its settings are the "
            "server's. \\[env: SIGLIP_SERVER]"
        ),
        show_default=False,
        show_envvar=False,
    ),
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Allow --server over plain http:// to a host that is not on this machine or a private network.",
    ),
]
ServerRetry = Annotated[
    float,
    typer.Option(
        "--server-retry",
        callback=_finite,
        min=0,
        help="Seconds to keep retrying a --server that stopped answering before the run stops (rows kept).",
    ),
]
Wire = Annotated[
    str,
    typer.Option(
        "--wire",
        callback=_one_of("raw", "webp"),
        help="raw|webp: how --server receives pixels: raw uint8, or lossless WebP (45% of the bytes, more CPU here).",
    ),
]
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


def _remote(opts: dict) -> None:
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


def _text_rules(value: str) -> str:
    if value not in ("canonical", "lower"):
        raise typer.BadParameter(f"{value!r}: canonical (as SigLIP was trained) or lower (as transformers' tokenizers)")
    return value


TextRules = Annotated[
    str,
    typer.Option(
        "--text-rules",
        callback=_text_rules,
        help=(
            "canonical|lower: what a text becomes before the tokenizer. canonical (as SigLIP was trained, open_clip's "
            "canonicalize): HTML unescaped, _ to space, punctuation dropped, lowercased; lower: lowercased only, as "
            "transformers' tokenizers."
        ),
    ),
]
RetryErrors = Annotated[
    bool,
    typer.Option(
        "--retry-errors",
        help=(
            "Try again every file that failed in an earlier run, even unchanged (those that failed for a passing "
            "reason are tried anyway)."
        ),
    ),
]


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
def _one_line():
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


def _execute(cfg: RunConfig, texts: Optional[list[str]] = None) -> None:
    """Run the pipeline (see _one_line)."""
    with _one_line():
        from . import pipeline

        summary = pipeline.run_texts(cfg, texts) if texts is not None else pipeline.run(cfg)
    if not cfg.quiet:
        typer.echo(summary.line(), err=True)
    if summary.missing:
        typer.echo(f"siglip: error: {summary.missing} of the paths given do not exist (said above)", err=True)
        raise typer.Exit(1)
    if cfg.strict and summary.failed:
        typer.echo(f"siglip: {summary.failed} image(s) failed (--strict)", err=True)
        raise typer.Exit(1)


def _output(value: Optional[str], opts: Optional[dict] = None) -> str:
    """-o as given (see _written_name); without it, stdout, unless stdout is a terminal (a screen of numbers
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


def _sources(
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


def _text(values: list[str], option: str) -> list[str]:
    """Texts from the command line as the tokenizer takes them: valid UTF-8 (a shell can pass any bytes)."""
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter(f"{option} {v.encode('utf-8', 'replace').decode()!r} is not UTF-8 text") from None
    return values


def _read_lines(path: str, what: str) -> list[str]:
    from .sources import text_lines

    return [line for line in _usage(lambda: text_lines(path, what)) if line.strip()]


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _run_images(head, opts: dict) -> None:
    """Build the run's config from a command's options (its locals) and execute it."""
    if not (opts["paths"] or opts["files_from"]):
        raise typer.BadParameter("no images: give image files or folders, or --files-from")
    _remote(opts)
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
            int8_bound=_bound(opts["int8_bound"]),
            text_rules=opts["text_rules"],
        ),
        sources=_sources(
            opts["paths"], opts["files_from"], opts["ext"], opts["exclude"], opts["include_hidden"], opts["raw_pairs"]
        ),
        output=OutputConfig(
            _output(opts["output"], opts),
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
    _execute(cfg)


def _usage(fn):
    """Turn a UsageError found while parsing option files (vocabularies, labels) into click's exit 2."""
    try:
        return fn()
    except UsageError as e:
        raise typer.BadParameter(str(e)) from None


@app.command(epilog=EXIT_CODES)
def embed(
    ctx: typer.Context,
    paths: Paths = None,
    output: Output = None,
    files_from: FilesFrom = None,
    ext: Ext = None,
    exclude: Exclude = None,
    include_hidden: IncludeHidden = False,
    raw_pairs: RawPairs = False,
    text: Annotated[
        Optional[List[str]],
        typer.Option("--text", "-t", help="Embed this text instead of images (repeatable).", show_default=False),
    ] = None,
    texts_file: Annotated[
        Optional[str],
        typer.Option("--texts-file", help="Embed the texts in FILE, one a line (- is stdin).", show_default=False),
    ] = None,
    model: Model = ...,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "auto",
    quantize: Quantize = "none",
    int8_bound: Int8Bound = "0.995,0.98",
    text_rules: TextRules = "canonical",
    batch_size: BatchSize = None,
    workers: Workers = ...,
    max_patches: MaxPatches = None,
    float16: Float16 = False,
    strict: Strict = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
    wait: Wait = False,
    prune: Prune = False,
    prune_anyway: PruneAnyway = False,
    rehash: Rehash = False,
    retry_errors: RetryErrors = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    timeout: Timeout = DEFAULT_TIMEOUT,
    exact: Exact = False,
    compile: Compile = False,
    ray: Ray = None,
    ray_actors: RayActors = None,
    server: Server = None,
    insecure: Insecure = False,
    server_retry: ServerRetry = 120.0,
    wire: Wire = "raw",
) -> None:
    """Write the L2-normalized embedding of every image (or of the given texts), one row each."""
    from .tasks import EmbedSpec

    texts = _text(list(text or []), "--text") + (_read_lines(texts_file, "texts file") if texts_file else [])
    if texts and (paths or files_from):
        raise typer.BadParameter("give images or texts (--text, --texts-file), not both")
    if texts and ray:
        raise typer.BadParameter("--ray runs image embedding; texts are embedded here, without it")
    images_only = {
        "--prune": prune,
        "--prune-anyway": prune_anyway,
        "--rehash": rehash,
        "--retry-errors": retry_errors,
        "--quantize": quantize != "none",
    }
    if texts and (given := [k for k, v in images_only.items() if v]):
        raise typer.BadParameter(f"{given[0]} works on images; texts are embedded whole, in float, at every run")
    if not texts:
        if not (paths or files_from):
            raise typer.BadParameter(
                "nothing to embed: give image files or folders, --files-from, --text or --texts-file"
            )
        return _run_images(EmbedSpec(float16), locals())
    opts = locals()
    _remote(opts)
    cfg = RunConfig(
        model=ModelConfig(opts["model"], revision, device, dtype, max_patches, backend=backend, text_rules=text_rules),
        sources=SourceConfig(),
        output=OutputConfig(_output(output), float16, overwrite, wait),
        batch_size=batch_size,
        workers=workers,
        strict=strict,
        quiet=quiet,
        server=server,
        insecure=insecure,
        server_retry=server_retry,
    )
    _execute(cfg, texts)


Templates = Annotated[
    Optional[List[str]],
    typer.Option(
        "--template",
        help=f"Prompt template, '{{}}' is the tag (repeatable: an ensemble). \\[default: {DEFAULT_TEMPLATE}]",
        show_default=False,
    ),
]
NoCache = Annotated[
    bool,
    typer.Option("--no-cache", help="Recompute the vocabulary's text embeddings instead of using the on-disk cache."),
]


@app.command(epilog=EXIT_CODES)
def tag(
    ctx: typer.Context,
    paths: Paths = None,
    vocab: Annotated[
        str,
        typer.Option(
            "--vocab", help="Tags, one a line ('#' comments; 'tag<TAB>0.2' sets its own threshold).", show_default=False
        ),
    ] = ...,
    output: Output = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            callback=_finite,
            min=0.0,
            max=1.0,
            help="Keep tags scoring at least this (per-tag thresholds in the file win).",
        ),
    ] = DEFAULT_THRESHOLD,
    top_k: Annotated[
        Optional[int],
        typer.Option("--top-k", "-k", min=1, help="Keep at most this many tags per image.", show_default=False),
    ] = None,
    template: Templates = None,
    all_scores: Annotated[
        bool, typer.Option("--all-scores", help="Also write the dense score vector (float16, one per tag).")
    ] = False,
    with_embeddings: Annotated[bool, typer.Option("--with-embeddings", help="Also write the image embedding.")] = False,
    no_cache: NoCache = False,
    files_from: FilesFrom = None,
    ext: Ext = None,
    exclude: Exclude = None,
    include_hidden: IncludeHidden = False,
    raw_pairs: RawPairs = False,
    model: Model = ...,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "auto",
    quantize: Quantize = "none",
    int8_bound: Int8Bound = "0.995,0.98",
    text_rules: TextRules = "canonical",
    batch_size: BatchSize = None,
    workers: Workers = ...,
    max_patches: MaxPatches = None,
    float16: Float16 = False,
    strict: Strict = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
    wait: Wait = False,
    prune: Prune = False,
    prune_anyway: PruneAnyway = False,
    rehash: Rehash = False,
    retry_errors: RetryErrors = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    timeout: Timeout = DEFAULT_TIMEOUT,
    exact: Exact = False,
    compile: Compile = False,
    ray: Ray = None,
    ray_actors: RayActors = None,
    server: Server = None,
    insecure: Insecure = False,
    server_retry: ServerRetry = 120.0,
    wire: Wire = "raw",
) -> None:
    """Score every image against a vocabulary: sigmoid probabilities, exactly as the model computes them."""
    from .tasks import TagSpec
    from .vocab import check_templates, read_vocab

    spec = _usage(
        lambda: TagSpec(
            read_vocab(vocab),
            check_templates(tuple(template or (DEFAULT_TEMPLATE,))),
            threshold,
            top_k,
            all_scores,
            with_embeddings,
            float16,
            not no_cache,
        )
    )
    _run_images(spec, locals())


@app.command(epilog=EXIT_CODES)
def classify(
    ctx: typer.Context,
    paths: Paths = None,
    labels: Annotated[
        Optional[str],
        typer.Option("--labels", "-l", help="Comma-separated labels: --labels cat,dog,bird.", show_default=False),
    ] = None,
    labels_file: Annotated[
        Optional[str], typer.Option("--labels-file", help="Labels, one a line.", show_default=False)
    ] = None,
    output: Output = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Ranked labels to keep per image.")] = 5,
    template: Templates = None,
    no_cache: NoCache = False,
    files_from: FilesFrom = None,
    ext: Ext = None,
    exclude: Exclude = None,
    include_hidden: IncludeHidden = False,
    raw_pairs: RawPairs = False,
    model: Model = ...,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "auto",
    quantize: Quantize = "none",
    int8_bound: Int8Bound = "0.995,0.98",
    text_rules: TextRules = "canonical",
    batch_size: BatchSize = None,
    workers: Workers = ...,
    max_patches: MaxPatches = None,
    strict: Strict = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
    wait: Wait = False,
    prune: Prune = False,
    prune_anyway: PruneAnyway = False,
    rehash: Rehash = False,
    retry_errors: RetryErrors = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    timeout: Timeout = DEFAULT_TIMEOUT,
    exact: Exact = False,
    compile: Compile = False,
    ray: Ray = None,
    ray_actors: RayActors = None,
    server: Server = None,
    insecure: Insecure = False,
    server_retry: ServerRetry = 120.0,
    wire: Wire = "raw",
) -> None:
    """Zero-shot classification: the best of the labels for every image, with its sigmoid score."""
    from .tasks import ClassifySpec
    from .vocab import check_templates, parse_vocab, read_vocab

    def build() -> ClassifySpec:
        if bool(labels) == bool(labels_file):
            raise UsageError("give the labels with --labels a,b,c or --labels-file FILE (one of them)")
        given = _text(labels.split(","), "--labels") if labels else []
        if not all(part.strip() for part in given):
            raise UsageError("--labels: an empty label (two commas in a row, or one at an end?)")
        found = read_vocab(labels_file, False) if labels_file else parse_vocab(given, "--labels", False, comments=False)
        if len(found.tags) < 2:
            raise UsageError("classify needs at least two labels")
        return ClassifySpec(found.tags, check_templates(tuple(template or (DEFAULT_TEMPLATE,))), top_k, not no_cache)

    _run_images(_usage(build), locals())


@app.command(epilog=EXIT_CODES)
def bench(
    paths: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Images to use (default: generated 500x375 JPEGs); the list is repeated up to --images.",
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        Optional[str],
        typer.Option(
            "--arch",
            help=f"Build this architecture with random weights instead of loading --model: {', '.join(ARCHS)}.",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        Optional[int],
        typer.Option(
            "--images", "-n", min=1, help="Images through the pipeline (default: 20 batches).", show_default=False
        ),
    ] = None,
    vocab: Annotated[
        Optional[str],
        typer.Option("--vocab", help="Also measure `tag` with this vocabulary, against `embed`.", show_default=False),
    ] = None,
    seconds: Annotated[
        float, typer.Option("--seconds", callback=_finite, min=0.1, help="Time the model alone for at least this long.")
    ] = 3.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
    backends: Annotated[
        bool,
        typer.Option(
            "--backends",
            help=(
                "Compare every backend, dtype and quantization this machine can run: images/s and cosine to torch "
                "float32."
            ),
        ),
    ] = False,
    ext: Ext = None,
    model: Model = ...,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "auto",
    quantize: Quantize = "none",
    int8_bound: Int8Bound = "0.995,0.98",
    batch_size: BatchSize = None,
    workers: Workers = ...,
    max_patches: MaxPatches = None,
    compile: Compile = False,
    exact: Exact = False,
) -> None:
    """Measure images/s on this machine: the model alone (the ceiling), decoding alone, and end to end."""
    if arch is not None and arch not in ARCHS:
        raise typer.BadParameter(f"unknown architecture {arch!r}; one of: {', '.join(ARCHS)}")
    tag_spec = None
    if vocab:
        from .tasks import TagSpec
        from .vocab import read_vocab

        tag_spec = _usage(lambda: TagSpec(read_vocab(vocab), cache=False))
    cfg = RunConfig(
        model=ModelConfig(
            model,
            revision,
            device,
            dtype,
            max_patches,
            compile,
            backend=backend,
            quantize=quantize,
            int8_bound=_bound(int8_bound),
        ),
        sources=_sources(paths, None, ext),
        output=OutputConfig(),
        batch_size=batch_size,
        workers=workers,
        quiet=True,
        exact=exact,
    )
    with _one_line():
        from . import bench as benchmark

        config = benchmark.BenchConfig(cfg, arch, images, seconds)
        result = benchmark.matrix(config, tag_spec) if backends else benchmark.run(config, tag_spec)
    show = benchmark.matrix_table if backends else benchmark.table
    typer.echo(json.dumps(result, indent=2) if json_out else show(result))


@app.command(epilog=EXIT_CODES)
def serve(
    model: Model = ...,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_patches: MaxPatches = None,
    text_rules: TextRules = "canonical",
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (another than loopback only when you mean it).")
    ] = "127.0.0.1",
    allow_host: Annotated[
        Optional[List[str]],
        typer.Option(
            "--allow-host",
            help=(
                "Also answer requests that name this host in their Host header (repeatable): the names clients use to "
                "reach a server on --host 0.0.0.0. Loopback names and --host are always answered."
            ),
            show_default=False,
        ),
    ] = None,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on.")] = 8002,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="SIGLIP_API_KEY",
            help="Require 'Authorization: Bearer KEY' (all routes but /health and /ready). \\[env: SIGLIP_API_KEY]",
            show_default=False,
            show_envvar=False,
        ),
    ] = None,
    vocab: Annotated[
        Optional[str],
        typer.Option(
            "--vocab", help="A vocabulary for POST /tag (one tag a line, as for `siglip tag`).", show_default=False
        ),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            callback=_finite,
            min=0.0,
            max=1.0,
            help="/tag's default threshold (a request may give its own).",
        ),
    ] = DEFAULT_THRESHOLD,
    index: Annotated[
        Optional[str],
        typer.Option(
            "--index",
            help=(
                "An index of this model for POST /search (and `siglip search --server`): searched here, its sidecar "
                "kept warm."
            ),
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Most items per forward pass, gathered from all requests.")
    ] = 16,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms", callback=_finite, min=0.0, help="How long a batch's first item waits for others."
        ),
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=1, help="Items waiting, all requests together; beyond it, 429.")
    ] = 1024,
    max_items: Annotated[int, typer.Option("--max-items", min=1, help="Items in one request; beyond it, 422.")] = 256,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", callback=_finite, min=0.001, help="Largest request body; beyond it, 413.")
    ] = 32.0,
    timeout: Annotated[
        float, typer.Option("--timeout", callback=_finite, min=0.1, help="Seconds a request may take; beyond it, 504.")
    ] = 30.0,
    workers: Workers = ...,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
) -> None:
    """Serve embeddings, tags and labels over HTTP (pip install 'siglip-cli\\[serve]'), batched across requests."""
    from .vocab import read_vocab

    found = _usage(lambda: read_vocab(vocab)) if vocab else None
    if api_key == "":  # (it turned the token off, silently)
        raise typer.BadParameter(
            "an empty key; give a key, or leave --api-key out (no token)", param_hint="'--api-key'"
        )
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        typer.echo("siglip: error: serve needs the serve extra: pip install 'siglip-cli[serve]'", err=True)
        raise typer.Exit(1) from None
    try:
        from . import serve as server
        from .model import Encoder
        from .weights import patches_setting

        if index is not None and not os.path.exists(index):  # before the model loads
            raise RunError(f"--index {index}: no index there")
        if index is not None:  # its images' --max-patches, for /img/embed queries of files outside it
            max_patches = server.index_patches(index, model, revision, max_patches)
        if max_patches is not None and (note := patches_setting(model, revision, max_patches)[1]):
            typer.echo(f"siglip: note: {note}", err=True)
        if "," in device:
            typer.echo(f"siglip: note: serve runs on one device: {device.split(',')[0]}", err=True)
        sock = server.bind(host, port)
        if warning := server.exposed_warning(server.ServeConfig(host, port, api_key)):
            typer.echo(warning, err=True)

        encoder = Encoder.load(
            ModelConfig(
                model, revision, device.split(",")[0], dtype, max_patches, backend="torch", text_rules=text_rules
            ),
            show_downloads=sys.stderr.isatty(),
        )
        server.text_on_openvino(encoder)
        cfg = server.ServeConfig(
            host,
            port,
            api_key,
            batch_size,
            max_wait_ms / 1000,
            max_queue,
            max_items,
            int(max_body_mb * (1 << 20)),
            timeout,
            max(1, workers),
            max_pixels,
            vocab=found,
            threshold=threshold,
            index=index,
            allow_hosts=tuple(allow_host or ()),
        )
        server.run(encoder, cfg, sock)
    except SiglipError as e:
        typer.echo(f"siglip: error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


Index = Annotated[
    str,
    typer.Argument(
        help="An index made by `siglip embed` or `siglip tag --with-embeddings` (folder or file).", show_default=False
    ),
]
ResultsOut = Annotated[
    Optional[str],
    typer.Option(
        "--output",
        "-o",
        callback=_written_name,
        help="FILE.parquet, or - for JSON Lines on stdout (default: a table on a terminal, JSON Lines in a pipe).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON Lines on stdout.")]
Html = Annotated[
    Optional[str],
    typer.Option(
        "--html",
        callback=_written_name,
        help="Also write a self-contained page of thumbnails to this file.",
        show_default=False,
    ),
]


def _results(work, output, as_json, html, title) -> None:
    """search and dedup: their results, with errors, Ctrl-C and SIGTERM as a run's (see _one_line)."""
    with _one_line():
        from . import report

        table = work()
        if html:
            report.write_html(html, table, title)
        report.emit(table, output, as_json)
        sys.stdout.flush()


@app.command(epilog=EXIT_CODES)
def search(
    index: Index,
    query: Annotated[
        Optional[List[str]], typer.Argument(help="Text queries (their vectors are added).", show_default=False)
    ] = None,
    image: Annotated[
        Optional[List[str]],
        typer.Option(
            "--image",
            help="An image query (repeatable): a file in the index reuses its stored vector.",
            show_default=False,
        ),
    ] = None,
    minus: Annotated[
        Optional[List[str]], typer.Option("--minus", help="A text to move away from (repeatable).", show_default=False)
    ] = None,
    minus_image: Annotated[
        Optional[List[str]],
        typer.Option("--minus-image", help="An image to move away from (repeatable).", show_default=False),
    ] = None,
    image_weight: Annotated[
        float, typer.Option("--image-weight", callback=_finite, help="Weight of the image parts against the texts' 1.")
    ] = 1.0,
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="How many results.")] = 10,
    min_score: Annotated[
        Optional[float],
        typer.Option("--min-score", callback=_finite, help="Drop results scoring below this.", show_default=False),
    ] = None,
    path: Annotated[
        Optional[List[str]],
        typer.Option("--path", help="Only rows whose path matches this glob (repeatable).", show_default=False),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", "-m", help="Embed text queries with this model instead of the index's.", show_default=False
        ),
    ] = None,
    device: Device = "auto",
    text_rules: TextRules = "canonical",
    server: Annotated[
        Optional[str],
        typer.Option(
            "--server",
            envvar="SIGLIP_SERVER",
            help=(
                "Embed the queries with a running `siglip serve` of the index's model (URL; its token from "
                "SIGLIP_API_KEY): no model load and no torch in this process. \\[env: SIGLIP_SERVER]"
            ),
            show_default=False,
            show_envvar=False,
        ),
    ] = None,
    insecure: Insecure = False,
    output: ResultsOut = None,
    json_out: AsJson = False,
    html: Html = None,
) -> None:
    """Search an index by text, by image, or both: exact top-k over the stored vectors.

    A single text query scores SigLIP's own sigmoid probability; image queries and combinations score the cosine."""
    _text(query or [], "query")
    _text(minus or [], "--minus")

    def work():
        from .remote import Remote, early

        if server and query and not (image or minus_image or model):  # a server holding this index searches it
            found = Remote(server, text_rules, insecure).search(
                index,
                {
                    "query": query,
                    "minus": minus or [],
                    "k": k,
                    "min_score": min_score,
                    "path": path or [],
                    "text_rules": text_rules,
                },
            )
            if found is not None:
                return found
        remote = early(server, tuple(query or ()), tuple(minus or ()), text_rules=text_rules, insecure=insecure)
        from . import search as s
        from .vectors import load

        q = s.Query(
            tuple(query or ()),
            tuple(image or ()),
            tuple(minus or ()),
            tuple(minus_image or ()),
            image_weight,
            k,
            min_score,
            tuple(path or ()),
            model,
            device,
            server,
            text_rules,
        )
        return s.search(load(index), q, remote=remote)

    _results(work, output, json_out, html, f"siglip search: {' '.join(query or image or [])}")


@app.command(epilog=EXIT_CODES)
def dedup(
    index: Annotated[
        Optional[str],
        typer.Argument(
            help="An index made by `siglip embed`, `tag` or `classify` (folder or file).", show_default=False
        ),
    ] = None,
    exact: Annotated[
        bool,
        typer.Option("--exact", help="Group files with identical bytes (by the index's content hashes; no model)."),
    ] = False,
    keep: Annotated[
        str,
        typer.Option(
            "--keep",
            help="Which file of a group is kept: largest (most pixels, then bytes), oldest (modification time), "
            "or path-prefix:FOLDER (the one under FOLDER).",
        ),
    ] = "largest",
    plan: Annotated[
        Optional[str],
        typer.Option(
            "--plan",
            callback=_written_name,
            help="Also write a plan to this file: one JSON line per file to move into a quarantine folder (every "
            "member but its group's keeper). Review it, then run `siglip dedup --apply FILE`.",
            show_default=False,
        ),
    ] = None,
    quarantine: Annotated[
        Optional[str],
        typer.Option(
            "--quarantine",
            help="Where --plan moves files (default: beside the library, LIBRARY.siglip-quarantine).",
            show_default=False,
        ),
    ] = None,
    apply: Annotated[
        Optional[str],
        typer.Option(
            "--apply",
            help="Carry out a plan --plan wrote: refused whole if a file changed since, or its keeper is gone. "
            "Files are moved, never deleted.",
            show_default=False,
        ),
    ] = None,
    similar: Annotated[
        bool,
        typer.Option(
            "--similar", help="Group similar shots (bursts, cosine >= 0.92) instead of near-identical copies (>= 0.99)."
        ),
    ] = False,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            callback=_finite,
            min=-1.0,
            max=1.0,
            help="Cosine at which two photos join a group (overrides the presets).",
            show_default=False,
        ),
    ] = None,
    output: ResultsOut = None,
    json_out: AsJson = False,
    html: Html = None,
) -> None:
    """Find groups of near-duplicate photos in an index (never deletes anything).

    By default near-identical copies (resized, recompressed: cosine >= 0.99); --similar groups shots of one scene."""

    from . import plan as plans

    if (index is None) == (apply is None):
        raise typer.BadParameter("give an index to look in, or --apply PLAN (one of them)")
    _usage(lambda: plans.check_rule(keep))
    if apply is not None:
        with _one_line():
            moved, where = plans.apply_plan(apply)
        typer.echo(f"siglip: moved {moved:,} files" + (f" into {where}" if where else ""), err=True)
        return

    def work():
        from . import search as s

        if exact:
            found = plans.as_results(plans.exact_groups(index), keep)
        else:
            from .vectors import load

            limit = threshold if threshold is not None else (s.SIMILAR if similar else s.NEAR_IDENTICAL)
            found = s.dedup(load(index), limit)
        if plan is not None:
            tier = "exact" if exact else "similar" if similar else "near-identical"
            n = plans.write_plan(plans.groups_of(found), tier, keep, plan, quarantine)
            print(
                f"siglip: {n:,} moves planned in {plan}; review it, then: siglip dedup --apply {plan}", file=sys.stderr
            )
        return found

    _results(work, output, json_out, html, "siglip dedup")


@app.command()
def doctor(
    model: Model = ...,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show what a bug report needs: versions, devices, what auto picks, caches, shared memory, the model.

    Reads only; loads no model."""
    from . import doctor as check

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
