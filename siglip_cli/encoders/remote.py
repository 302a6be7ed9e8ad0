"""A remote tower: `embed|tag|classify --server URL` runs the model on a `siglip serve` elsewhere.

Everything else of the run stays here (files, decoding, the index, the lock, progress): a batch goes over the
wire as the model's input (see wire.py) and comes back as embeddings. It has the public face of model.Encoder
that the run uses (spec, info, encode_images, encode_texts, ...), so the pipeline does not know the difference.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import sys
import threading
import time

import numpy as np
import torch

from .. import wire
from ..errors import RunError
from ..loader import Batch
from ..model import ModelInfo
from ..remote import bearer, check_transport, error_message, parse_url, shown

IN_FLIGHT = 3  # batches on their way at once: the server's device never waits on one round trip
ANSWER_S = 300.0  # seconds one request may take (its wait behind the other batches in flight too): a stall
RETRYABLE = {408, 429, 500, 502, 503, 504}


class Connection:
    """HTTP to one server: a kept-alive connection per thread, the bearer token from $SIGLIP_API_KEY."""

    def __init__(self, url: str, insecure: bool = False):
        self.parts = parse_url(url)
        check_transport(url, insecure)
        self.url, self.key = shown(url), bearer()
        self.local = threading.local()
        self.every: set = set()  # every thread's connection: close() ends them all, reads under way too
        self.lock = threading.Lock()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
            conn = self.local.conn = kind(self.parts.hostname, self.parts.port, timeout=timeout)
            with self.lock:
                self.every.add(conn)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def request(
        self,
        method: str,
        route: str,
        body: bytes | None = None,
        kind: str = "application/json",
        timeout: float = ANSWER_S,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; OSError or http.client.HTTPException when no answer came."""
        headers = {"Content-Type": kind} if body is not None else {}
        if self.key:
            headers["Authorization"] = self.key
        path = (self.parts.path.rstrip("/") or "") + route
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except BaseException:
            self.close()  # a half-used connection is not used again
            raise

    def close(self) -> None:
        """This thread's connection."""
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            with self.lock:
                self.every.discard(conn)
            conn.close()

    def close_all(self) -> None:
        """Every thread's connection, a read under way included (it ends at once with an OSError)."""
        import socket

        with self.lock:
            every, self.every = self.every, set()
        for conn in every:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RemoteEncoder:
    """The model of a `siglip serve`, for a run whose files are here. Contacted first by `describe` (the
    server's model and settings, before anything is sent); `require` refuses a server of other settings than
    the index's."""

    backend = "remote"
    quantize = "none"
    chunk = 0
    pad_to = 0
    device = torch.device("cpu")

    def __init__(self, url: str, insecure: bool = False, retry_s: float = 120.0, encoding: str = "raw"):
        self.conn = Connection(url, insecure)
        self.url, self.retry_s, self.encoding = self.conn.url, retry_s, encoding
        self.described: dict | None = None
        self.expect: dict = {}
        self.stop = threading.Event()  # set when one lane gives up, or the run ends: the others stop retrying
        self.failure: BaseException | None = None
        self.said = False
        self.tower = self

    # -- before the run ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        """GET /v1/model, once: a wrong URL, no key or a wrong key is one line here, with no retries."""
        if self.described is None:
            status, body = self._once("GET", "/v1/model")
            if status == 404:
                raise RunError(f"--server {self.url} has no /v1/model: is it a `siglip serve` of this version?")
            if status != 200:
                raise RunError(f"--server {self.url}: HTTP {status}: {error_message(body)}")
            try:
                self.described = json.loads(body)
                self._take(self.described)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise RunError(f"--server {self.url}/v1/model: not a siglip answer") from None
        return self.described

    def _once(self, method: str, route: str) -> tuple[int, bytes]:
        try:
            return self.conn.request(method, route, timeout=30.0)
        except (OSError, http.client.HTTPException) as e:
            raise RunError(f"--server {self.url}: {_reason(e)}") from None

    def _take(self, d: dict) -> None:
        self.signature = d["signature"]
        self.spec = wire.spec_of(d["spec"])
        self.naflex = self.spec.naflex
        self.info = ModelInfo(
            d["model"],
            d.get("revision"),
            d.get("commit"),
            d["architecture"],
            int(d["dim"]),
            int(d["text_length"]),
            d["preprocessing"],
        )
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[d["dtype"]]
        self.logit_scale, self.logit_bias = float(d["logit_scale"]), float(d["logit_bias"])
        self.text_backend, self.text_kind = d["text_backend"], "remote " + str(d["text_kind"])
        self.text_rules, self.patches = d["text_rules"], d["signature"].get("max_patches")
        self.fingerprint = d["fingerprint"]
        self.limits, self.versions = d["limits"], d.get("versions") or {}

    def require(self, expect: dict) -> None:
        """Refuse, before any row is written, a server whose model part of the signature is not `expect`'s
        (the index's, or the one this run was resolved with)."""
        from ..index.store import differences
        from ..weights import MODEL_KEYS

        theirs = {k: v for k, v in self.describe()["signature"].items() if k in expect}
        ours = {k: v for k, v in expect.items() if k in MODEL_KEYS}
        if theirs != ours:
            raise RunError(
                f"--server {self.url} runs other settings than this index's ({differences(theirs, ours)}); start "
                "the server with the index's settings, or choose another output (--overwrite starts afresh)"
            )
        self.expect = ours

    def start(self, model, texts: bool, expect: dict | None) -> list["RemoteEncoder"]:
        """The lanes of a run whose model options are `model` (--model given: it must be the server's; its text
        rules must be the server's where texts are encoded) and whose index needs `expect` (None: a new one)."""
        import os

        from ..weights import local_fingerprint

        described = self.describe()
        name = model.name
        if name and name != described["model"]:
            if not (os.path.isdir(name) and local_fingerprint(name) == described["weights"]):
                raise RunError(
                    f"--model {name}: --server {self.url} runs {described['model']} (leave --model out to use "
                    "the server's model)"
                )
        if texts and model.text_rules != self.text_rules:
            raise RunError(
                f"--server {self.url} cleans texts by --text-rules {self.text_rules}; this run asks for "
                f"{model.text_rules} (start the server with that, or pass --text-rules {self.text_rules})"
            )
        self.require(expect if expect is not None else self.signature)
        return self.lanes()

    def batch_size(self, asked: int | None) -> int:
        """Images per request: as asked, else the server's batch size; within its item and body limits."""
        per_image = int(np.prod(_shape(self.spec)))
        most = max(1, min(self.limits["max_items"], (self.limits["max_body"] - 65536) // per_image))
        return max(1, min(asked or self.limits["batch_size"], most))

    def lanes(self) -> list["RemoteEncoder"]:
        """The encoders a run spreads its batches over: this one, IN_FLIGHT times (each lane a thread)."""
        return [self] * IN_FLIGHT

    # -- the run -----------------------------------------------------------------------------------------
    def on_device(self):
        return contextlib.nullcontext()

    def encode_images(self, batch: Batch) -> torch.Tensor:
        """Embeddings (n, D) of the batch's decoded images, computed by the server. An item the server refuses
        (a 4xx naming it) becomes that item's error row; the rest are sent again."""
        images = [batch.pixels[j].numpy() for j in range(len(batch.ok))]
        grids = [tuple(g) for g in batch.grids.tolist()] if self.naflex else [(0, 0)] * len(images)
        keep = list(range(len(images)))
        while keep:
            body = wire.pack(self.spec, [images[j] for j in keep], [grids[j] for j in keep], self.encoding, self.expect)
            status, answer = self._post("/v1/pixels", body, wire.CONTENT_TYPE)
            if status == 200:
                vectors = self._vectors(answer, len(keep))
                break
            index, message = _item(answer)
            if status == 409:
                raise self._give_up(RunError(f"--server {self.url} now runs other settings: {message}"))
            if index is None or not 0 <= index < len(keep):
                raise self._give_up(RunError(f"--server {self.url}/v1/pixels: HTTP {status}: {message}"))
            batch.items[batch.ok[keep[index]]].error = f"the server refused it: {message}"
            del keep[index]
        else:
            vectors = np.zeros((0, self.info.dim), np.float32)
        batch.ok[:] = [batch.ok[j] for j in keep]
        return torch.from_numpy(vectors.copy())

    def _vectors(self, answer: bytes, n: int) -> np.ndarray:
        try:
            data = json.loads(answer)
            vectors = np.frombuffer(base64.b64decode(data["embeddings"]), "<f4")
            if data.get("dim") != self.info.dim or vectors.size != n * self.info.dim:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._give_up(RunError(f"--server {self.url}/v1/pixels: not the answer of a siglip serve")) from None
        return vectors.reshape(n, self.info.dim)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Text embeddings (n, D) computed by the server, with its text rules (the signature's)."""
        step = max(1, min(self.limits["max_items"], 4 * self.limits["batch_size"]))
        out = []
        for i in range(0, len(texts), step):
            body = json.dumps({"input": texts[i : i + step]}).encode()
            status, answer = self._post("/txt/embed", body, "application/json")
            if status != 200:
                raise self._give_up(RunError(f"--server {self.url}/txt/embed: HTTP {status}: {error_message(answer)}"))
            try:
                data = json.loads(answer)
                same = (
                    data.get("weights") == self.signature.get("weights") and data.get("text_rules") == self.text_rules
                )
                vectors = np.asarray(data["embeddings"], np.float32).reshape(-1, self.info.dim)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise self._give_up(
                    RunError(f"--server {self.url}/txt/embed: not the answer of a siglip serve")
                ) from None
            if not same:
                raise self._give_up(RunError(f"--server {self.url} now runs another model or other text rules"))
            out.append(vectors)
        return torch.from_numpy(np.concatenate(out)) if out else torch.empty((0, self.info.dim))

    def to_host(self, tensors: dict[str, torch.Tensor]):
        arrays = {k: v.numpy() for k, v in tensors.items()}
        return lambda: arrays

    def shrink(self, error: BaseException, batch_size: int) -> None:
        raise error

    def close(self) -> None:
        """The run is over (or stopped): lanes still waiting on the server stop at once."""
        self.stop.set()
        self.conn.close_all()

    def _give_up(self, error: BaseException) -> BaseException:
        self.failure = self.failure or error
        self.stop.set()
        return error

    def _post(self, route: str, body: bytes, kind: str) -> tuple[int, bytes]:
        """One request, retried with backoff while the server is away, busy or failing, for at most retry_s
        from the first failure; then a RunError (the rows finished so far are the run's to keep)."""
        give_up_at, delay = None, 0.5
        while True:
            if self.stop.is_set():
                raise self.failure or RunError("stopped")
            wait = delay
            left = ANSWER_S if give_up_at is None else max(10.0, give_up_at - time.monotonic())
            try:
                status, answer = self.conn.request("POST", route, body, kind, timeout=min(ANSWER_S, left))
                if status not in RETRYABLE:
                    return status, answer
                problem = f"HTTP {status}: {error_message(answer)}"
                if status in (429, 503):
                    wait = 1.0
            except (OSError, http.client.HTTPException) as e:
                problem = _reason(e)
            now = time.monotonic()
            give_up_at = give_up_at or now + self.retry_s
            if now >= give_up_at:
                raise self._give_up(
                    RunError(
                        f"--server {self.url}: {problem}; gave up after retrying for {self.retry_s:g} s "
                        "(--server-retry); the rows finished are kept, and a rerun goes on from there"
                    )
                )
            if not self.said:
                self.said = True
                print(f"siglip: --server {self.url}: {problem}; retrying for up to {self.retry_s:g} s", file=sys.stderr)
            self.stop.wait(min(wait, max(0.0, give_up_at - now)))
            delay = min(delay * 2, 10.0)


def _shape(spec) -> tuple[int, ...]:
    from ..worker import pixel_shape

    return pixel_shape(spec)


def _item(body: bytes) -> tuple[int | None, str]:
    """The item a 4xx names (its index in the request), and its message."""
    try:
        error = json.loads(body).get("error") or {}
        index = error.get("index")
        return (index if isinstance(index, int) else None), str(error.get("message"))[:300]
    except (ValueError, AttributeError):
        return None, error_message(body)


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time (a stalled server?)"
    if isinstance(e, http.client.HTTPException):
        return f"the connection broke ({type(e).__name__})"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
