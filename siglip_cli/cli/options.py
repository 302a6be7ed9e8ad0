"""The options the commands share, declared once (Annotated types), with the callbacks that check them."""

from __future__ import annotations

import math
import os
import re
from typing import Annotated, List, Optional

import typer

from ..config import (
    DEFAULT_TEMPLATE,
    default_model,
    default_workers,
)


def device_name(value: str) -> str:
    if not re.fullmatch(r"auto|(cpu|mps|cuda(:\d+)?)(,(cpu|mps|cuda(:\d+)?))*", value):
        raise typer.BadParameter("expected auto, cpu, mps, cuda, cuda:N, or a list such as cuda:0,cuda:1")
    return value


def one_of(*choices: str):
    """An option callback that accepts only the given words (exit 2 naming them otherwise)."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"expected {', '.join(choices[:-1])} or {choices[-1]}")
        return value

    return check


def finite(value: float | None) -> float | None:
    """Every float option's callback: click's ranges let nan (and inf) through, and a nan threshold or weight
    quietly matches nothing."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("expected a finite number")
    return value


dtype_name = one_of("auto", "float32", "bfloat16", "float16")
backend_name = one_of("auto", "torch", "openvino")
quantize_name = one_of("none", "auto", "int8", "int8-weights", "int4")


Paths = Annotated[
    Optional[List[str]],
    typer.Argument(help="Image files and folders (folders are walked recursively).", show_default=False),
]


def written_name(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
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
        callback=written_name,
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
        callback=device_name,
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
        callback=dtype_name,
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
        callback=backend_name,
    ),
]
Quantize = Annotated[
    str,
    typer.Option(
        "--quantize",
        help=(
            "none|auto|int8|int8-weights|int4 (OpenVINO on a CPU): int8 quantizes weights and activations, "
            "calibrated on the run's first photos and checked against float32 on the next (see --int8-bound); "
            "auto is int8 on a CPU with int8 dot products (VNNI, AMX), none elsewhere; int8-weights and int4 "
            "compress the weights only."
        ),
        callback=quantize_name,
    ),
]


def bound(value: str) -> tuple[float, float]:
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
        callback=finite,
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
        callback=finite,
        min=0,
        help="Seconds to keep retrying a --server that stopped answering before the run stops (rows kept).",
    ),
]
Wire = Annotated[
    str,
    typer.Option(
        "--wire",
        callback=one_of("raw", "webp"),
        help="raw|webp: how --server receives pixels: raw uint8, or lossless WebP (45% of the bytes, more CPU here).",
    ),
]


def text_rules_name(value: str) -> str:
    if value not in ("canonical", "lower"):
        raise typer.BadParameter(f"{value!r}: canonical (as SigLIP was trained) or lower (as transformers' tokenizers)")
    return value


TextRules = Annotated[
    str,
    typer.Option(
        "--text-rules",
        callback=text_rules_name,
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
