"""`embed`, `tag`, `classify` and `bench`: the commands that read images."""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import typer

from ..config import (
    ARCHS,
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
    one_line,
    output_path,
    read_lines,
    remote_guard,
    run_images,
    sources_of,
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
    bound,
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
        float, typer.Option("--seconds", callback=finite, min=0.1, help="Time the model alone for at least this long.")
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
        from ..tasks import TagSpec
        from ..vocab import read_vocab

        tag_spec = usage(lambda: TagSpec(read_vocab(vocab), cache=False))
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
            int8_bound=bound(int8_bound),
        ),
        sources=sources_of(paths, None, ext),
        output=OutputConfig(),
        batch_size=batch_size,
        workers=workers,
        quiet=True,
        exact=exact,
    )
    with one_line():
        from .. import bench as benchmark

        config = benchmark.BenchConfig(cfg, arch, images, seconds)
        result = benchmark.matrix(config, tag_spec) if backends else benchmark.run(config, tag_spec)
    show = benchmark.matrix_table if backends else benchmark.table
    typer.echo(json.dumps(result, indent=2) if json_out else show(result))
