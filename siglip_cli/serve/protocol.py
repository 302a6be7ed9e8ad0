"""`siglip serve`'s protocol: its settings, the bounds on what a request may ask, and reading a request's body
and fields into values or an ApiError (a 4xx naming the item at fault)."""

import base64
import binascii
import json
import re
from dataclasses import dataclass

from ..config import DEFAULT_THRESHOLD


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
    from ..wire import CONTENT_TYPE

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


async def disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def number(payload: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(422, f'"{key}" must be a number from {lo:g} to {hi:g}')
    return float(value)


def count(payload: dict, key: str, default: int | None) -> int | None:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, f'"{key}" must be a positive integer')
    return value
