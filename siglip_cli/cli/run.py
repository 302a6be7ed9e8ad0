"""`embed`, `tag` and `classify`: the commands that read images into an index."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from ..config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_TEMPLATE,
    DEFAULT_THRESHOLD,
    DEFAULT_TIMEOUT,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SourceConfig,
)
from ..errors import UsageError
from .app import EXIT_CODES, app
from .boundary import (
    checked_texts,
    execute,
    output_path,
    read_lines,
    remote_guard,
    run_images,
    usage,
)
from .options import (
    Backend,
    BatchSize,
    Compile,
    Device,
    Dtype,
    Exact,
    Exclude,
    Ext,
    FilesFrom,
    Float16,
    IncludeHidden,
    Insecure,
    Int8Bound,
    MaxPatches,
    MaxPixels,
    Model,
    NoCache,
    Output,
    Overwrite,
    Paths,
    Prune,
    PruneAnyway,
    Quantize,
    Quiet,
    RawPairs,
    Ray,
    RayActors,
    Rehash,
    RetryErrors,
    Revision,
    Server,
    ServerRetry,
    Strict,
    Templates,
    TextRules,
    Timeout,
    Wait,
    Wire,
    Workers,
    finite,
)


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
    from ..tasks import EmbedSpec

    texts = checked_texts(list(text or []), "--text") + (read_lines(texts_file, "texts file") if texts_file else [])
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
        return run_images(EmbedSpec(float16), locals())
    opts = locals()
    remote_guard(opts)
    cfg = RunConfig(
        model=ModelConfig(opts["model"], revision, device, dtype, max_patches, backend=backend, text_rules=text_rules),
        sources=SourceConfig(),
        output=OutputConfig(output_path(output), float16, overwrite, wait),
        batch_size=batch_size,
        workers=workers,
        strict=strict,
        quiet=quiet,
        server=server,
        insecure=insecure,
        server_retry=server_retry,
    )
    execute(cfg, texts)


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
            callback=finite,
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
    from ..tasks import TagSpec
    from ..vocab import check_templates, read_vocab

    spec = usage(
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
    run_images(spec, locals())


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
    from ..tasks import ClassifySpec
    from ..vocab import check_templates, parse_vocab, read_vocab

    def build() -> ClassifySpec:
        if bool(labels) == bool(labels_file):
            raise UsageError("give the labels with --labels a,b,c or --labels-file FILE (one of them)")
        given = checked_texts(labels.split(","), "--labels") if labels else []
        if not all(part.strip() for part in given):
            raise UsageError("--labels: an empty label (two commas in a row, or one at an end?)")
        found = read_vocab(labels_file, False) if labels_file else parse_vocab(given, "--labels", False, comments=False)
        if len(found.tags) < 2:
            raise UsageError("classify needs at least two labels")
        return ClassifySpec(found.tags, check_templates(tuple(template or (DEFAULT_TEMPLATE,))), top_k, not no_cache)

    run_images(usage(build), locals())
