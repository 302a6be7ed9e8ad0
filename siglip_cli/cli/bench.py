"""`bench`: images/s on this machine."""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import typer

from ..config import (
    ARCHS,
    ModelConfig,
    OutputConfig,
    RunConfig,
)
from .app import EXIT_CODES, app
from .boundary import (
    one_line,
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
    Ext,
    Int8Bound,
    MaxPatches,
    Model,
    Quantize,
    Revision,
    Workers,
    bound,
    finite,
)


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
        from .. import bench_backends as backends_bench

        config = benchmark.BenchConfig(cfg, arch, images, seconds)
        result = backends_bench.matrix(config, tag_spec) if backends else benchmark.run(config, tag_spec)
    show = backends_bench.matrix_table if backends else benchmark.table
    typer.echo(json.dumps(result, indent=2) if json_out else show(result))
