"""`siglip serve`: the CLI's encoder, preprocessing and text rules over HTTP, batched across requests.

Routes (routes.py): POST /txt/embed, /img/embed (the plan's request shape), /v1/embeddings (OpenAI's), /tag,
/classify, /search, /v1/pixels (a remote run's batches); GET /v1/model, /health, /ready, /metrics. Images arrive
as base64 or data: URIs and are decoded in worker processes (the CLI's decoding, no torch in them); a bad item
answers 4xx naming its index and never reaches the model.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .protocol import LOOPBACK, ServeConfig

if TYPE_CHECKING:
    from ..model import Encoder


def index_patches(index: str, model: str, revision: str | None, given: int | None) -> int | None:
    """serve --index: the --max-patches the index's images were embedded with, so that an image query of a file
    outside it is embedded the same way; another one given is refused."""
    from ..errors import RunError
    from ..sink import read_metadata
    from ..weights import patches_setting, recorded_patches

    try:
        theirs = recorded_patches(read_metadata(index))
    except Exception:  # not an index: opening it says so, in its own words
        return given
    if given is not None and patches_setting(model, revision, given)[0] != theirs:
        raise RunError(f"--index {index} was embedded with --max-patches {theirs or 'the default'}, not {given}")
    return given if given is not None else theirs


def bind(host: str, port: int):
    """The server's socket, bound before the model loads: a port in use or a bad --host is one line at once
    (it was uvicorn's, after a minute of loading, with exit 3). Not listening yet: until the model is ready a
    client is refused, not queued."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        from ..errors import RunError

        raise RunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


LIMIT_CONNECTIONS = 512  # open connections at once (beyond: 503), under the common limit of 1024 open files


def exposed_warning(cfg: ServeConfig) -> str | None:
    """A loud line for a server that listens beyond loopback without a key: anyone who reaches it can use it."""
    if cfg.api_key or cfg.host.strip("[]") in LOOPBACK:
        return None
    return (
        f"siglip: WARNING: listening on {cfg.host} without --api-key: anyone who can reach this machine can "
        "use the model and search the index (set SIGLIP_API_KEY, or serve behind a proxy that checks one)"
    )


def run(encoder: Encoder, cfg: ServeConfig, sock=None) -> None:
    """Serve until interrupted."""
    import uvicorn

    sock = sock or bind(cfg.host, cfg.port)
    from .routes import create_app

    app = create_app(encoder, cfg)
    encoder.encode_texts(["a photo"])  # the text tower loaded before the first request, not during it
    host, port = sock.getsockname()[:2]
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"  # the port itself where --port 0
    print(
        f"siglip: serving {encoder.info.name} on {where} (dim {encoder.info.dim}, {encoder.device}, "
        f"{str(encoder.dtype)[6:]})" + (", bearer token required" if cfg.api_key else ""),
        file=sys.stderr,
    )
    # half-sent requests and idle connections are bounded: slow clients cannot hold every file descriptor
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        limit_concurrency=LIMIT_CONNECTIONS,
        h11_max_incomplete_event_size=64 << 10,
    )
    uvicorn.Server(config).run(sockets=[sock])
