"""`serve`: the model over HTTP."""

from __future__ import annotations

import os
import sys
from typing import Annotated, List, Optional

import typer

from ..config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_THRESHOLD,
    ModelConfig,
)
from ..errors import RunError, SiglipError
from .app import EXIT_CODES, app
from .boundary import usage
from .options import Device, Dtype, MaxPatches, MaxPixels, Model, Revision, TextRules, Workers, finite

Host = Annotated[
    str, typer.Option("--host", help="Address to listen on (another than loopback only when you mean it).")
]

AllowHost = Annotated[
    Optional[List[str]],
    typer.Option(
        "--allow-host",
        help=(
            "Also answer requests that name this host in their Host header (repeatable): the names clients use to "
            "reach a server on --host 0.0.0.0. Loopback names and --host are always answered."
        ),
        show_default=False,
    ),
]

Port = Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on.")]

ApiKey = Annotated[
    Optional[str],
    typer.Option(
        "--api-key",
        envvar="SIGLIP_API_KEY",
        help="Require 'Authorization: Bearer KEY' (all routes but /health and /ready). \\[env: SIGLIP_API_KEY]",
        show_default=False,
        show_envvar=False,
    ),
]

ServeVocab = Annotated[
    Optional[str],
    typer.Option(
        "--vocab", help="A vocabulary for POST /tag (one tag a line, as for `siglip tag`).", show_default=False
    ),
]

ServeThreshold = Annotated[
    float,
    typer.Option(
        "--threshold",
        callback=finite,
        min=0.0,
        max=1.0,
        help="/tag's default threshold (a request may give its own).",
    ),
]

ServeIndex = Annotated[
    Optional[str],
    typer.Option(
        "--index",
        help=(
            "An index of this model for POST /search (and `siglip search --server`): searched here, its sidecar "
            "kept warm."
        ),
        show_default=False,
    ),
]

ServeBatchSize = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Most items per forward pass, gathered from all requests.")
]

MaxWaitMs = Annotated[
    float,
    typer.Option("--max-wait-ms", callback=finite, min=0.0, help="How long a batch's first item waits for others."),
]

MaxQueue = Annotated[
    int, typer.Option("--max-queue", min=1, help="Items waiting, all requests together; beyond it, 429.")
]

MaxItems = Annotated[int, typer.Option("--max-items", min=1, help="Items in one request; beyond it, 422.")]

MaxBodyMb = Annotated[
    float, typer.Option("--max-body-mb", callback=finite, min=0.001, help="Largest request body; beyond it, 413.")
]

ServeTimeout = Annotated[
    float, typer.Option("--timeout", callback=finite, min=0.1, help="Seconds a request may take; beyond it, 504.")
]


@app.command(epilog=EXIT_CODES)
def serve(
    model: Model = ...,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_patches: MaxPatches = None,
    text_rules: TextRules = "canonical",
    host: Host = "127.0.0.1",
    allow_host: AllowHost = None,
    port: Port = 8002,
    api_key: ApiKey = None,
    vocab: ServeVocab = None,
    threshold: ServeThreshold = DEFAULT_THRESHOLD,
    index: ServeIndex = None,
    batch_size: ServeBatchSize = 16,
    max_wait_ms: MaxWaitMs = 5.0,
    max_queue: MaxQueue = 1024,
    max_items: MaxItems = 256,
    max_body_mb: MaxBodyMb = 32.0,
    timeout: ServeTimeout = 30.0,
    workers: Workers = ...,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
) -> None:
    """Serve embeddings, tags and labels over HTTP (pip install 'siglip-cli\\[serve]'), batched across requests."""
    from ..vocab import read_vocab

    found = usage(lambda: read_vocab(vocab)) if vocab else None
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
        from .. import serve as server
        from ..model import Encoder
        from ..weights import patches_setting

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
            # texts on the OpenVINO text tower on a CPU, as `tag` and `classify` there (a served text vector is
            # theirs); images on torch: an OpenVINO image graph has one batch size, a server's batches have all
            text_openvino=True,
        )
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
