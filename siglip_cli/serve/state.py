"""The state behind `siglip serve`'s routes: the encoder's batcher, the decode pool, the vocabulary, the --index,
the metrics, and the description of the model that remote runs read."""

import asyncio
import collections
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ..compat import pool_processes
from ..config import DEFAULT_TEMPLATE
from ..heads import sigmoid_scores
from ..model import Encoder
from .batcher import Batcher, QueueFull
from .metrics import Metrics
from .protocol import ApiError, ServeConfig, image_bytes


class Server:
    """The state behind the routes: the encoder's batcher, the decode pool, the vocabulary, the metrics."""

    def __init__(self, encoder: Encoder, cfg: ServeConfig):
        import dataclasses

        self.encoder, self.cfg = encoder, cfg
        info = encoder.info
        # its weights as an index's signature records them: the Hub commit, or a local folder's fingerprint
        # (which tells ./ckpt here from another ./ckpt: see remote.same_model)
        if os.path.isdir(info.name):
            from ..weights import local_fingerprint

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
            from ..vocab import text_embeddings

            self.tags = list(cfg.vocab.tags)
            self.tag_text = text_embeddings(encoder, cfg.vocab.tags, (DEFAULT_TEMPLATE,)).float().cpu().numpy()
            self.thresholds = list(cfg.vocab.thresholds)

    def _pool(self) -> ProcessPoolExecutor:
        from .. import worker

        # as a run's decode workers: Ctrl-C and SIGTERM are the server's to handle (each worker printed a
        # KeyboardInterrupt traceback), and they end with it
        return ProcessPoolExecutor(
            self.cfg.workers,
            multiprocessing.get_context("spawn"),
            initializer=worker.init,
            initargs=(None, os.getpid()),
        )

    async def decode(self, data: bytes, index: int):
        from .. import worker

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
        from ..errors import RunError
        from ..index.layouts import state
        from ..remote import describe, index_model, same_model
        from ..vectors import SIDECAR_VERSION, load

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
        from .. import search as s

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
    from .. import __version__, wire
    from ..encode import made_with
    from ..weights import model_signature

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
