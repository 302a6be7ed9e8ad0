"""`siglip serve`'s routes: each a function of the server's state and a request's parsed body, wired into a
FastAPI app by create_app with the checks every request passes (Host, token, deadline, metrics)."""

import asyncio
import base64
import hmac
import os
import time
from contextlib import asynccontextmanager

import numpy as np

from ..errors import SiglipError
from ..heads import select
from ..model import Encoder
from .protocol import (
    DATA_URI,
    MAX_GLOB_CHARS,
    MAX_GLOBS,
    ApiError,
    ServeConfig,
    allowed_hosts,
    count,
    disconnected,
    host_of,
    items_of,
    number,
    read_json,
    read_pixels,
)
from .state import Server


def embedded(server: Server, vectors: np.ndarray, many: bool) -> dict:
    """The plan's answer: the vector (or the vectors, in order) and the model that made them."""
    name, dim, commit, weights = server.model
    return {
        **({"embeddings": vectors.tolist()} if many else {"embedding": vectors[0].tolist()}),
        "model": name,
        "dim": dim,
        "commit": commit,
        "weights": weights,
        "max_patches": server.encoder.patches,
        "text_rules": server.encoder.text_rules,
    }


async def txt_embed(server: Server, payload) -> dict:
    values, many = items_of(payload, server.cfg.max_items)
    return embedded(server, await server.texts(values), many)


async def img_embed(server: Server, payload) -> dict:
    values, many = items_of(payload, server.cfg.max_items)
    return embedded(server, await server.images(values), many)


async def pixels(server: Server, body: bytes) -> dict:
    """A remote run's batch, decoded by the client (wire.py): its embeddings, float32 in base64."""
    from ..decode import Decoded
    from ..wire import WireError, unpack

    try:
        header, images = await asyncio.to_thread(unpack, body, server.spec, server.cfg.max_items)
    except WireError as e:
        raise ApiError(422, str(e), e.index) from None
    expect = header.get("expect") or {}
    if not isinstance(expect, dict):
        raise ApiError(422, '"expect" must be an object of signature settings')
    ours = server.described["signature"]
    if any(ours.get(k) != v for k, v in expect.items()):
        raise ApiError(409, f"this server runs {ours}; the client's index needs {expect}")
    vectors = await server.vectors("image", [Decoded(None, pixels=p, grid=g) for p, g in images])
    return {"embeddings": base64.b64encode(vectors.astype("<f4").tobytes()).decode(), "dim": server.model[1]}


def tokens_read(encoder: Encoder, texts: list[str]) -> int:
    """The tokens the model reads of these texts (cleaned and cut as it reads them, at most its length each)."""
    from ..text import prepare

    return sum(
        min(len(encoder.tokenizer(t)["input_ids"]), encoder.info.text_length)
        for t in prepare(texts, encoder.text_rules)
    )


async def openai_embeddings(server: Server, payload) -> dict:
    """OpenAI's /v1/embeddings: an image is a base64 data: URI; any other string is a text, "data: ..." too."""
    dim = server.model[1]
    values, _ = items_of(payload, server.cfg.max_items)
    fmt = payload.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(422, 'encoding_format must be "float" or "base64"')
    if payload.get("dimensions") not in (None, dim):  # (it was ignored: the whole vector came back)
        raise ApiError(422, f"dimensions: this model's embeddings have {dim}; they cannot be shortened")
    images = [i for i, v in enumerate(values) if isinstance(v, str) and DATA_URI.match(v)]
    texts = [i for i in range(len(values)) if i not in set(images)]
    out: list = [None] * len(values)

    async def some(embed, idx):  # errors name the item by its place in the whole request
        try:
            for i, v in zip(idx, await embed([values[i] for i in idx]) if idx else []):
                out[i] = v
        except ApiError as e:
            if e.index is not None:
                e.message = e.message.replace(f"item {e.index}:", f"item {idx[e.index]}:", 1)
                e.index = idx[e.index]
            raise

    await asyncio.gather(some(server.images, images), some(server.texts, texts))
    tokens = await asyncio.to_thread(tokens_read, server.encoder, [values[i] for i in texts])  # off the loop
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist(),
        }
        for i, v in enumerate(out)
    ]
    return {
        "object": "list",
        "data": data,
        "model": payload.get("model") or server.model[0],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def tag(server: Server, payload) -> dict:
    if server.tag_text is None:
        raise ApiError(400, "this server has no vocabulary: start it with --vocab FILE")
    values, many = items_of(payload, server.cfg.max_items)
    threshold = number(payload, "threshold", server.cfg.threshold, 0.0, 1.0)
    top_k = count(payload, "top_k", None)
    scores = server.scores(await server.images(values), server.tag_text)
    limits = np.array([threshold if t is None else t for t in server.thresholds], np.float32)
    results = [
        {"tags": [{"tag": server.tags[i], "score": float(s)} for i, s in zip(idx, val)]}
        for idx, val in select(scores, limits, top_k)
    ]
    name = server.model[0]
    return {"model": name, "results": results} if many else {"model": name, **results[0]}


async def classify(server: Server, payload) -> dict:
    max_items = server.cfg.max_items
    labels = payload.get("labels") if isinstance(payload, dict) else None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise ApiError(422, '"labels" must be a list of at least two non-empty strings')
    if len(labels) > max_items:  # (a busy 429 that no retry would cure)
        raise ApiError(422, f"at most {max_items} labels in one request (--max-items)")
    values, many = items_of(payload, max_items)
    top_k = count(payload, "top_k", 5)
    text = await server.label_embeddings(tuple(labels))
    scores = server.scores(await server.images(values), text)
    results = [
        {
            "label": labels[idx[0]],
            "score": float(val[0]),
            "top_k": [{"label": labels[i], "score": float(s)} for i, s in zip(idx, val)],
        }
        for idx, val in select(scores, np.zeros(len(labels), np.float32), top_k)
    ]
    name = server.model[0]
    return {"model": name, "results": results} if many else {"model": name, **results[0]}


def strings(payload: dict, key: str, need: bool) -> list[str]:
    value = payload.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value) or (need and not value):
        raise ApiError(422, f'"{key}" must be a string or a list of strings' + (" (at least one)" if need else ""))
    return value


def same_index(server: Server, payload) -> None:
    """A /search for the server's own --index, as the client sees it (the same files, sizes and times on any
    host); 404 for another, so that the client searches it itself."""
    index, rules = server.cfg.index, server.encoder.text_rules
    if index is None:
        raise ApiError(404, "this server holds no index: start it with --index INDEX")
    if not isinstance(payload, dict):
        raise ApiError(422, "the body must be a JSON object")
    given, theirs = payload.get("index"), payload.get("state")
    if theirs is not None:
        from ..index.layouts import state

        try:
            ours = state(index)
        except OSError:
            ours = None
        if theirs != ours:
            raise ApiError(
                404,
                f"this server searches {index} as it is now; the index sent ({given or 'unnamed'}) is another, or "
                "that one as it was",
            )
    elif given is not None and (not isinstance(given, str) or os.path.realpath(given) != os.path.realpath(index)):
        raise ApiError(404, f"this server searches {index}, not {given}")
    if payload.get("text_rules", rules) != rules:  # the client then says why
        raise ApiError(404, f"this server cleans texts by --text-rules {rules}")


async def search(server: Server, payload) -> dict:
    same_index(server, payload)
    cfg = server.cfg
    texts, minus, paths = (
        strings(payload, "query", True),
        strings(payload, "minus", False),
        strings(payload, "path", False),
    )
    if len(texts) + len(minus) > cfg.max_items:
        raise ApiError(422, f"at most {cfg.max_items} texts in one request (--max-items)")
    if len(paths) > MAX_GLOBS or any(len(g) > MAX_GLOB_CHARS for g in paths):
        raise ApiError(422, f'"path": at most {MAX_GLOBS} globs of at most {MAX_GLOB_CHARS} characters')
    k = count(payload, "k", 10)
    min_score = payload.get("min_score")
    if min_score is not None:
        min_score = number(payload, "min_score", 0.0, -1e30, 1e30)
    vectors = await server.texts(texts + minus)
    try:
        found = await asyncio.to_thread(server.search, texts, minus, vectors, k, min_score, paths)
    except (SiglipError, OSError) as e:  # the index gone or unreadable now, or rebuilt by another run
        raise ApiError(503, f"cannot search {cfg.index} now: {e}", headers={"Retry-After": "5"}) from None
    for row in found.rows:  # the exact name (not UTF-8) in base64, as JSON Lines have it
        if row.get("path_bytes") is not None:
            row["path_bytes"] = base64.b64encode(row["path_bytes"]).decode()
    name, dim, commit, weights = server.model
    return {
        "columns": found.columns,
        "rows": found.rows,
        "score": found.score,
        "model": name,
        "dim": dim,
        "commit": commit,
        "weights": weights,
    }


# path -> (work, deadline, reader). deadline None: no --timeout of its own (/v1/pixels: a client sends a
# server's batch size and says itself when it waited too long; /search: after the index changed, its first
# search rebuilds the sidecar, a minute for 10M rows); "timeout": --timeout.
POSTS = {
    "/txt/embed": (txt_embed, "timeout", read_json),
    "/img/embed": (img_embed, "timeout", read_json),
    "/v1/pixels": (pixels, None, read_pixels),
    "/v1/embeddings": (openai_embeddings, "timeout", read_json),
    "/tag": (tag, "timeout", read_json),
    "/classify": (classify, "timeout", read_json),
    "/search": (search, None, read_json),
}


async def guarded(server: Server, request, work, deadline: float | None, read):
    """The work of a request, its body's arrival included, within its deadline (the body within --timeout
    always); dropped if the client goes away."""
    from fastapi.responses import Response

    cfg = server.cfg
    start = time.monotonic()
    try:
        payload = await asyncio.wait_for(read(request, cfg.max_body), deadline or cfg.timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            504, f"the request took over {cfg.timeout:g}s (--timeout): its body was still arriving"
        ) from None
    if deadline is not None:
        deadline = max(0.0, deadline - (time.monotonic() - start))
    task = asyncio.ensure_future(work(server, payload))
    gone = asyncio.ensure_future(disconnected(request))
    done, _ = await asyncio.wait({task, gone}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if gone in done:
        return Response(status_code=499)  # nobody reads it; the queue no longer holds its items
    raise ApiError(504, f"the request took over {cfg.timeout:g}s (--timeout)")


def refusal(server: Server, request, hosts: frozenset):
    """The answer to a request refused before any work (a Host not answered, a missing or wrong token), or None."""
    from fastapi.responses import JSONResponse

    path = request.url.path
    if host_of(request.headers.get("host", "")) not in hosts:
        message = "this server does not answer that Host (--allow-host adds one)"
        return JSONResponse({"error": {"message": message, "code": 421}}, status_code=421)
    key = server.cfg.api_key
    if key and path not in ("/health", "/ready"):  # probes need no token
        # the header's bytes as sent (Starlette decodes it as Latin-1), against the key's UTF-8; the scheme's
        # name in any case (RFC 9110)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, key.encode()):
            return JSONResponse(
                {"error": {"message": "missing or wrong bearer token", "code": 401}},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    return None


def create_app(encoder: Encoder, cfg: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    server = Server(encoder, cfg)

    @asynccontextmanager
    async def lifespan(app):
        await server.vectors("text", ["ready?"])  # the model answers before the port says ready
        server.canary_ok = time.monotonic()
        canary = asyncio.create_task(server.canary())
        yield
        canary.cancel()
        server.close()

    app = FastAPI(title="siglip", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        body = {"error": {"message": e.message, "index": e.index, "code": e.status}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    hosts = allowed_hosts(cfg)
    routes: set = set()  # the app's own paths (filled in below): /metrics labels no other

    @app.middleware("http")
    async def around(request: Request, call_next):
        t = time.perf_counter()
        route = request.url.path if request.url.path in routes else "other"
        response = refusal(server, request, hosts) or await call_next(request)
        server.metrics.request(route, response.status_code, time.perf_counter() - t)
        return response

    def endpoint(work, deadline, read):
        async def route(request: Request):
            return await guarded(server, request, work, cfg.timeout if deadline == "timeout" else None, read)

        return route

    for path, (work, deadline, read) in POSTS.items():
        app.post(path, name=work.__name__)(endpoint(work, deadline, read))

    @app.get("/v1/model")
    async def model():
        return server.described

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok, why = server.ready()
        return JSONResponse({"ready": ok, "reason": why, "model": server.model[0]}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes.update(r.path for r in app.routes)
    return app
