"""`siglip serve`: the CLI's encoder, preprocessing and text rules over HTTP, batched across requests.

Routes: POST /txt/embed, /img/embed (the plan's request shape), /v1/embeddings (OpenAI's), /tag, /classify;
GET /health, /ready, /metrics. Images arrive as base64 or data: URIs and are decoded in worker processes (the
CLI's decoding, no torch in them); a bad item answers 4xx naming its index and never reaches the model.
"""

import asyncio
import base64
import binascii
import collections
import hmac
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from .batcher import Batcher, QueueFull
from .compat import pool_processes
from .config import DEFAULT_TEMPLATE, DEFAULT_THRESHOLD
from .errors import SiglipError
from .heads import sigmoid_scores
from .model import Encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8002
    api_key: str | None = None
    batch_size: int = 16
    max_wait: float = 0.005  # seconds the first item of a batch waits for company
    max_queue: int = 1024  # items waiting, all requests together; more is 429
    max_items: int = 256  # items in one request; more is 422
    max_body: int = 32 << 20  # bytes; more is 413
    timeout: float = 30.0  # seconds a request may take; more is 504
    workers: int = 1  # decode processes
    max_pixels: int = 100_000_000
    canary_every: float = 10.0  # seconds between the /ready canary's embeddings
    vocab: object = None  # a Vocab for /tag, or None
    threshold: float = DEFAULT_THRESHOLD
    index: str | None = None  # an index (of this model) that POST /search searches
    allow_hosts: tuple[str, ...] = ()  # Host header names answered besides loopback's and --host's (--allow-host)


# Bounds on what one request may ask of the server, checked before any work (a 422 names the limit).
MAX_GLOBS = 16  # /search's "path" globs (fnmatch is quadratic in "[": 1,024 of them take 70 ms)
MAX_GLOB_CHARS = 1024
MAX_JSON_DEPTH = 32
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def allowed_hosts(cfg: ServeConfig) -> frozenset[str]:
    """The Host names a request may carry (DNS rebinding: a page whose name now points at 127.0.0.1 is refused)."""
    host = cfg.host.strip("[]")
    extra = () if host in ("0.0.0.0", "::") else (host, f"[{host}]")
    return frozenset(h.lower() for h in (*LOOPBACK, *extra, *cfg.allow_hosts))


def host_of(header: str) -> str:
    """A Host header's name, without its port."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply a parsed JSON value nests, counted up to limit + 1, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


class ApiError(Exception):
    """An answer other than 200: status, message, and the index of the item at fault."""

    def __init__(self, status: int, message: str, index: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.index, self.headers = status, message, index, headers


class Metrics:
    """The server's Prometheus metrics (prometheus_client), in a registry of its own: requests, items, batch
    sizes, latency, the queue's depth, and the process's memory, CPU and open files."""

    def __init__(self, depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("siglip_requests", "Requests answered", ["route", "status"], registry=self.registry)
        self.items = Counter("siglip_items", "Items embedded", ["kind"], registry=self.registry)
        self.latency = Histogram(
            "siglip_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batches = Histogram(
            "siglip_batch_size", "Items per forward pass", ["kind"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        Gauge("siglip_queue_depth", "Items waiting", registry=self.registry).set_function(depth)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, kind: str, size: int) -> None:
        self.items.labels(kind).inc(size)
        self.batches.labels(kind).observe(size)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.ASCII)


def image_bytes(value, index: int) -> bytes:
    """The bytes of one image item: base64, or a data: URI holding base64. Never a remote URL."""
    if not isinstance(value, str):
        raise ApiError(422, f"item {index}: an image must be a base64 string or a data: URI", index)
    if value.startswith(("http://", "https://", "file:", "ftp://")):
        raise ApiError(400, f"item {index}: the server does not fetch URLs; send the image itself as base64", index)
    if value.startswith("data:"):
        m = DATA_URI.match(value)
        if not m:
            raise ApiError(400, f"item {index}: only base64 data: URIs are accepted", index)
        value = value[m.end() :]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"item {index}: not valid base64", index) from None
    if not data:
        raise ApiError(400, f"item {index}: empty image", index)
    return data


def items_of(payload, max_items: int) -> tuple[list, bool]:
    """The request's `input` as a list, and whether it was given as a list."""
    if not isinstance(payload, dict) or "input" not in payload:
        raise ApiError(422, 'the body must be a JSON object with "input"')
    value = payload["input"]
    if not isinstance(value, list):
        return [value], False
    if not value:
        raise ApiError(422, '"input" is an empty list')
    if len(value) > max_items:
        raise ApiError(422, f'"input" has {len(value)} items; at most {max_items} per request (--max-items)')
    return value, True


class Server:
    """The state behind the routes: the encoder's batcher, the decode pool, the vocabulary, the metrics."""

    def __init__(self, encoder: Encoder, cfg: ServeConfig):
        import dataclasses

        self.encoder, self.cfg = encoder, cfg
        info = encoder.info
        # its weights as an index's signature records them: the Hub commit, or a local folder's fingerprint
        # (which tells ./ckpt here from another ./ckpt: see remote.same_model)
        if os.path.isdir(info.name):
            from .weights import local_fingerprint

            weights = local_fingerprint(info.name)
        else:
            weights = info.commit
        self.model = (info.name, info.dim, info.commit, weights)
        self.described = describe(encoder, weights, cfg)
        self.metrics = Metrics(depth=lambda: self.batcher.depth())
        self.batcher = Batcher(encoder, cfg.batch_size, cfg.max_wait, cfg.max_queue, self.metrics)
        self.spec = dataclasses.replace(encoder.spec, max_pixels=cfg.max_pixels)
        self.pool = self._pool()
        self.canary_ok = 0.0
        self.labels: collections.OrderedDict = collections.OrderedDict()  # labels -> text embeddings (LRU)
        self.tags = self.tag_text = self.thresholds = None
        self.index_lock, self.index_key, self.index_vectors = threading.Lock(), None, None
        if cfg.index is not None:
            self.open_index()  # its sidecar built, and its model checked, before the port opens
        if cfg.vocab is not None:
            from .vocab import text_embeddings

            self.tags = list(cfg.vocab.tags)
            self.tag_text = text_embeddings(encoder, cfg.vocab.tags, (DEFAULT_TEMPLATE,)).float().cpu().numpy()
            self.thresholds = list(cfg.vocab.thresholds)

    def _pool(self) -> ProcessPoolExecutor:
        from . import worker

        # as a run's decode workers: Ctrl-C and SIGTERM are the server's to handle (each worker printed a
        # KeyboardInterrupt traceback), and they end with it
        return ProcessPoolExecutor(
            self.cfg.workers,
            multiprocessing.get_context("spawn"),
            initializer=worker.init,
            initargs=(None, os.getpid()),
        )

    async def decode(self, data: bytes, index: int):
        from . import worker

        loop = asyncio.get_running_loop()
        pool = self.pool
        try:
            d = await loop.run_in_executor(pool, worker.decode_bytes, data, self.spec)
        except BrokenProcessPool:  # a decoder crashed (on this image or another): a new pool, this item fails
            if self.pool is pool:
                self.pool = self._pool()
                pool.shutdown(wait=False, cancel_futures=True)
            raise ApiError(400, f"item {index}: the decoder crashed on this image", index) from None
        if d.error:
            raise ApiError(400, f"item {index}: {d.error}", index)
        return d

    async def vectors(self, kind: str, items: list) -> np.ndarray:
        try:
            futures = self.batcher.submit(kind, items)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", headers={"Retry-After": "1"}) from None
        try:
            return np.stack(await asyncio.gather(*futures))
        except asyncio.CancelledError:  # past its deadline, or its client went away
            self.batcher.drop(futures)
            for f in futures:
                f.cancel()
            raise

    async def images(self, values: list) -> np.ndarray:
        datas = [image_bytes(v, i) for i, v in enumerate(values)]
        decoded = await asyncio.gather(*(self.decode(d, i) for i, d in enumerate(datas)))
        return await self.vectors("image", list(decoded))

    async def texts(self, values: list) -> np.ndarray:
        """Every text of every route comes here: a bad one is a 4xx naming it, and never reaches the batch it
        would fail with the other requests' texts (a lone surrogate failed a whole batch with 500)."""
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ApiError(422, f"item {i}: a text must be a string", i)
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(422, f"item {i}: not valid Unicode text (a lone surrogate such as \\ud800)", i) from None
        return await self.vectors("text", values)

    async def label_embeddings(self, labels: tuple[str, ...]) -> np.ndarray:
        if labels not in self.labels:
            self.labels[labels] = await self.texts([DEFAULT_TEMPLATE.format(x) for x in labels])
            while len(self.labels) > 256:
                self.labels.popitem(last=False)
        self.labels.move_to_end(labels)
        return self.labels[labels]

    def open_index(self):
        """The --index's vectors, reopened (rebuilt by vectors.load) when the index changed since the last search;
        refused at startup when another model made it."""
        from .errors import RunError
        from .index.layouts import state
        from .remote import describe, index_model, same_model
        from .vectors import SIDECAR_VERSION, load

        with self.index_lock:
            try:
                key = [SIDECAR_VERSION, state(self.cfg.index)]  # the index's files' names, sizes and times
            except OSError:
                key = None  # gone: load says so
            if key is None or key != self.index_key:
                self.index_vectors, self.index_key = load(self.cfg.index, resident=True), key
            v = self.index_vectors
        if not same_model(index_model(v.meta, v.matrix.shape[1]), self.model):
            raise RunError(
                f"--index {self.cfg.index} was made with {describe(index_model(v.meta, v.matrix.shape[1]))}; "
                f"this server runs {describe(self.model)}"
            )
        return v

    def search(self, texts: list[str], minus: list[str], vectors: np.ndarray, k: int, min_score, paths: list[str]):
        """A text search of the --index (see search.py), with the texts embedded already: the same results as
        `siglip search` there."""
        from . import search as s

        known = dict(zip(texts + minus, vectors))

        class Embedded:  # in place of a Remote: this server's own vectors
            def expect(self, *_):
                pass

            def texts(self, items):
                return np.stack([known[t] for t in items])

        q = s.Query(tuple(texts), minus=tuple(minus), k=k, min_score=min_score, paths=tuple(paths))
        return s.search(self.open_index(), q, remote=Embedded())

    def scores(self, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
        e = self.encoder
        return sigmoid_scores(images, texts, np.float32(e.logit_scale), np.float32(e.logit_bias))

    async def canary(self) -> None:
        """Embed a short text now and then (the first at startup): /ready says whether the model still answers."""
        while True:
            await asyncio.sleep(self.cfg.canary_every)
            try:
                await asyncio.wait_for(self.vectors("text", ["ready?"]), timeout=max(30.0, self.cfg.timeout))
                self.canary_ok = time.monotonic()
            except Exception:  # noqa: BLE001 - reported by /ready, not raised
                pass

    def ready(self) -> tuple[bool, str]:
        now = time.monotonic()
        busy = self.batcher.busy_since
        if not self.batcher.thread.is_alive():
            return False, "the batching thread has stopped"
        if busy and now - busy > max(60.0, 2 * self.cfg.timeout):
            return False, f"one batch has run for {now - busy:.0f}s"
        if not self.canary_ok or now - self.canary_ok > 3 * self.cfg.canary_every + 30:
            return False, "no embedding has succeeded recently"
        return True, "ok"

    def close(self) -> None:
        """At shutdown: the decoders are ended (one may be stuck in a file) and the pool joined, so that its
        queues are freed here, not reported leaked by the resource tracker at exit."""
        self.batcher.stop()
        for process in pool_processes(self.pool):
            process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def describe(encoder: Encoder, weights: str | None, cfg: ServeConfig) -> dict:
    """GET /v1/model: what a remote run (`embed --server`) needs to decode images as this server would, to
    check its index's settings against this model's, and to write the same metadata as a local run."""
    from . import __version__, wire
    from .encode import made_with
    from .weights import model_signature

    info = encoder.info
    dtype = str(encoder.dtype).removeprefix("torch.")
    return {
        "model": info.name,
        "revision": info.revision,
        "commit": info.commit,
        "weights": weights,
        "architecture": info.architecture,
        "dim": info.dim,
        "text_length": info.text_length,
        "preprocessing": info.preprocessing,
        "signature": model_signature(
            info.name, weights, dtype, encoder.patches, encoder.quantize, None, encoder.text_rules
        ),
        "spec": wire.describe(encoder.spec),
        "dtype": dtype,
        "backend": encoder.backend,
        "text_backend": encoder.text_backend,
        "text_kind": encoder.text_kind,
        "text_rules": encoder.text_rules,
        "fingerprint": encoder.fingerprint,
        "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias,
        "versions": made_with("openvino" in (encoder.backend, encoder.text_backend)),
        "tool_version": __version__,
        "limits": {"batch_size": cfg.batch_size, "max_items": cfg.max_items, "max_body": cfg.max_body},
        "encodings": list(wire.ENCODINGS),
    }


async def read_body(request, max_body: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body:
        raise ApiError(413, f"the body is {int(length):,} bytes; at most {max_body:,} (--max-body-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ApiError(413, f"the body is over {max_body:,} bytes (--max-body-mb)")
    return bytes(body)


async def read_pixels(request, max_body: int) -> bytes:
    from .wire import CONTENT_TYPE

    if request.headers.get("content-type", "").split(";")[0].strip().lower() != CONTENT_TYPE:
        raise ApiError(415, f"send the body as {CONTENT_TYPE} (see siglip_cli/wire.py)")
    return await read_body(request, max_body)


async def read_json(request, max_body: int):
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # a page's form or text/plain post (no CORS preflight) is not read
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json")
    body = await read_body(request, max_body)
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ApiError(422, f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if depth(payload) > MAX_JSON_DEPTH:
        raise ApiError(422, f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return payload


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(encoder: Encoder, cfg: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    server = Server(encoder, cfg)
    name, dim, commit, weights = server.model

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
    routes: set = set()  # the app's own paths, filled in below: /metrics labels no other (a client's paths would
    # grow it without bound and could break its format)

    @app.middleware("http")
    async def around(request: Request, call_next):
        t = time.perf_counter()
        path = request.url.path
        route = path if path in routes else "other"
        if host_of(request.headers.get("host", "")) not in hosts:
            server.metrics.request(route, 421, time.perf_counter() - t)
            return JSONResponse(
                {"error": {"message": "this server does not answer that Host (--allow-host adds one)", "code": 421}},
                status_code=421,
            )
        if cfg.api_key and path not in ("/health", "/ready"):  # probes need no token
            # the header's bytes as sent (Starlette decodes it as Latin-1), against the key's UTF-8; the scheme's
            # name in any case (RFC 9110)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""
            if not hmac.compare_digest(given, cfg.api_key.encode()):
                response = JSONResponse(
                    {"error": {"message": "missing or wrong bearer token", "code": 401}},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                server.metrics.request(route, 401, time.perf_counter() - t)
                return response
        response = await call_next(request)
        server.metrics.request(route, response.status_code, time.perf_counter() - t)
        return response

    async def guarded(request: Request, work, deadline: float | None = cfg.timeout, read=read_json):
        """The work of a request, its body's arrival included, within its deadline (the body within --timeout
        always); dropped if the client goes away."""
        start = time.monotonic()
        try:
            payload = await asyncio.wait_for(read(request, cfg.max_body), deadline or cfg.timeout)
        except asyncio.TimeoutError:
            raise ApiError(
                504, f"the request took over {cfg.timeout:g}s (--timeout): its body was still arriving"
            ) from None
        if deadline is not None:
            deadline = max(0.0, deadline - (time.monotonic() - start))
        task = asyncio.ensure_future(work(payload))
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({task, gone}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if gone in done:
            return Response(status_code=499)  # nobody reads it; the queue no longer holds its items
        raise ApiError(504, f"the request took over {cfg.timeout:g}s (--timeout)")

    def tokens_read(texts: list[str]) -> int:
        """The tokens the model reads of these texts (cleaned and cut as it reads them, at most its length each)."""
        from .text import prepare

        return sum(
            min(len(encoder.tokenizer(t)["input_ids"]), encoder.info.text_length)
            for t in prepare(texts, encoder.text_rules)
        )

    def embedded(vectors: np.ndarray, many: bool) -> dict:
        return {
            **({"embeddings": vectors.tolist()} if many else {"embedding": vectors[0].tolist()}),
            "model": name,
            "dim": dim,
            "commit": commit,
            "weights": weights,
            "max_patches": encoder.patches,
            "text_rules": encoder.text_rules,
        }

    def embed_route(path: str, embed) -> None:
        """The plan's routes: {"input": item or list} -> the vector, or the vectors in order."""

        async def route(request: Request):
            async def work(payload):
                values, many = items_of(payload, cfg.max_items)
                return embedded(await embed(values), many)

            return await guarded(request, work)

        app.post(path, name=path.strip("/").replace("/", "_"))(route)

    embed_route("/txt/embed", server.texts)
    embed_route("/img/embed", server.images)

    @app.get("/v1/model")
    async def model():
        return server.described

    @app.post("/v1/pixels")
    async def pixels(request: Request):
        """A remote run's batch, decoded by the client (wire.py): its embeddings, float32 in base64."""

        async def work(body: bytes):
            from .decode import Decoded
            from .wire import WireError, unpack

            try:
                header, images = await asyncio.to_thread(unpack, body, server.spec, cfg.max_items)
            except WireError as e:
                raise ApiError(422, str(e), e.index) from None
            expect = header.get("expect") or {}
            if not isinstance(expect, dict):
                raise ApiError(422, '"expect" must be an object of signature settings')
            ours = server.described["signature"]
            if any(ours.get(k) != v for k, v in expect.items()):
                raise ApiError(409, f"this server runs {ours}; the client's index needs {expect}")
            vectors = await server.vectors("image", [Decoded(None, pixels=p, grid=g) for p, g in images])
            return {"embeddings": base64.b64encode(vectors.astype("<f4").tobytes()).decode(), "dim": dim}

        # no deadline of its own: a client sends a server's batch size, and says itself when it waited too long
        return await guarded(request, work, deadline=None, read=read_pixels)

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        async def work(payload):
            values, _ = items_of(payload, cfg.max_items)
            fmt = payload.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise ApiError(422, 'encoding_format must be "float" or "base64"')
            if payload.get("dimensions") not in (None, dim):  # (it was ignored: the whole vector came back)
                raise ApiError(422, f"dimensions: this model's embeddings have {dim}; they cannot be shortened")
            # an image is a base64 data: URI; any other string is a text, "data: ..." too
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
            tokens = await asyncio.to_thread(tokens_read, [values[i] for i in texts])  # off the event loop
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                    if fmt == "base64"
                    else v.tolist(),
                }
                for i, v in enumerate(out)
            ]
            return {
                "object": "list",
                "data": data,
                "model": payload.get("model") or name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }

        return await guarded(request, work)

    @app.post("/tag")
    async def tag(request: Request):
        async def work(payload):
            if server.tag_text is None:
                raise ApiError(400, "this server has no vocabulary: start it with --vocab FILE")
            values, many = items_of(payload, cfg.max_items)
            threshold = _number(payload, "threshold", cfg.threshold, 0.0, 1.0)
            top_k = _count(payload, "top_k", None)
            from .heads import select

            scores = server.scores(await server.images(values), server.tag_text)
            limits = np.array([threshold if t is None else t for t in server.thresholds], np.float32)
            results = [
                {"tags": [{"tag": server.tags[i], "score": float(s)} for i, s in zip(idx, val)]}
                for idx, val in select(scores, limits, top_k)
            ]
            return {"model": name, "results": results} if many else {"model": name, **results[0]}

        return await guarded(request, work)

    @app.post("/classify")
    async def classify(request: Request):
        async def work(payload):
            labels = payload.get("labels") if isinstance(payload, dict) else None
            if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
                raise ApiError(422, '"labels" must be a list of at least two non-empty strings')
            if len(labels) > cfg.max_items:  # (a busy 429 that no retry would cure)
                raise ApiError(422, f"at most {cfg.max_items} labels in one request (--max-items)")
            values, many = items_of(payload, cfg.max_items)
            top_k = _count(payload, "top_k", 5)
            from .heads import select

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
            return {"model": name, "results": results} if many else {"model": name, **results[0]}

        return await guarded(request, work)

    def strings(payload: dict, key: str, need: bool) -> list[str]:
        value = payload.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value) or (need and not value):
            raise ApiError(422, f'"{key}" must be a string or a list of strings' + (" (at least one)" if need else ""))
        return value

    @app.post("/search")
    async def search(request: Request):
        async def work(payload):
            if cfg.index is None:
                raise ApiError(404, "this server holds no index: start it with --index INDEX")
            if not isinstance(payload, dict):
                raise ApiError(422, "the body must be a JSON object")
            given, theirs = payload.get("index"), payload.get("state")
            if theirs is not None:  # the client's index as it sees it: the same files, sizes and times, on any host
                from .index.layouts import state

                try:
                    ours = state(cfg.index)
                except OSError:
                    ours = None
                if theirs != ours:
                    raise ApiError(
                        404,
                        f"this server searches {cfg.index} as it is now; the index sent "
                        f"({given or 'unnamed'}) is another, or that one as it was",
                    )
            elif given is not None and (
                not isinstance(given, str) or os.path.realpath(given) != os.path.realpath(cfg.index)
            ):
                raise ApiError(404, f"this server searches {cfg.index}, not {given}")
            if payload.get("text_rules", encoder.text_rules) != encoder.text_rules:  # the client then says why
                raise ApiError(404, f"this server cleans texts by --text-rules {encoder.text_rules}")
            texts, minus, paths = (
                strings(payload, "query", True),
                strings(payload, "minus", False),
                strings(payload, "path", False),
            )
            if len(texts) + len(minus) > cfg.max_items:
                raise ApiError(422, f"at most {cfg.max_items} texts in one request (--max-items)")
            if len(paths) > MAX_GLOBS or any(len(g) > MAX_GLOB_CHARS for g in paths):
                raise ApiError(422, f'"path": at most {MAX_GLOBS} globs of at most {MAX_GLOB_CHARS} characters')
            k = _count(payload, "k", 10)
            min_score = payload.get("min_score")
            if min_score is not None:
                min_score = _number(payload, "min_score", 0.0, -1e30, 1e30)
            vectors = await server.texts(texts + minus)
            try:
                found = await asyncio.to_thread(server.search, texts, minus, vectors, k, min_score, paths)
            except (SiglipError, OSError) as e:  # the index gone or unreadable now, or rebuilt by another run
                raise ApiError(503, f"cannot search {cfg.index} now: {e}", headers={"Retry-After": "5"}) from None
            for row in found.rows:  # the exact name (not UTF-8) in base64, as JSON Lines have it
                if row.get("path_bytes") is not None:
                    row["path_bytes"] = base64.b64encode(row["path_bytes"]).decode()
            return {
                "columns": found.columns,
                "rows": found.rows,
                "score": found.score,
                "model": name,
                "dim": dim,
                "commit": commit,
                "weights": weights,
            }

        # no deadline: after the index changed, the first search rebuilds its sidecar (a minute for 10M rows)
        return await guarded(request, work, deadline=None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok, why = server.ready()
        return JSONResponse({"ready": ok, "reason": why, "model": name}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes.update(r.path for r in app.routes)
    return app


def _number(payload: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(422, f'"{key}" must be a number from {lo:g} to {hi:g}')
    return float(value)


def _count(payload: dict, key: str, default: int | None) -> int | None:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, f'"{key}" must be a positive integer')
    return value


def index_patches(index: str, model: str, revision: str | None, given: int | None) -> int | None:
    """serve --index: the --max-patches the index's images were embedded with, so that an image query of a file
    outside it is embedded the same way; another one given is refused."""
    from .errors import RunError
    from .sink import read_metadata
    from .weights import patches_setting, recorded_patches

    try:
        theirs = recorded_patches(read_metadata(index))
    except Exception:  # not an index: opening it says so, in its own words
        return given
    if given is not None and patches_setting(model, revision, given)[0] != theirs:
        raise RunError(f"--index {index} was embedded with --max-patches {theirs or 'the default'}, not {given}")
    return given if given is not None else theirs


def text_on_openvino(encoder: Encoder) -> None:
    """On a CPU with the openvino extra, texts are embedded by the OpenVINO text tower (as `tag` and `classify`
    there do, so a served text vector is theirs; converted at startup where not cached): one query in 0.45 s
    against torch's 0.61 s on so400m's text tower, two cores. Images stay on torch: OpenVINO's image graph
    has a fixed batch, and a server's batches are of every size."""
    from .encoders import openvino, ovtext

    if encoder.device.type == "cpu" and ovtext.available():
        from .config import usable_cpus

        openvino.attach_text(encoder, encoder.dtype, usable_cpus())


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
        from .errors import RunError

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
