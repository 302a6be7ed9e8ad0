"""Dynamic batching for `siglip serve`: items from many requests go through the model together.

One thread owns the encoder. It takes the oldest waiting item, then more of the same kind (image or text)
until the batch is full or `max_wait` has passed since the first, runs them, and hands each request its
vectors. Items whose request gave up (deadline, disconnect) are dropped before they cost anything.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..decode import Decoded
from ..encode import embed_decoded
from ..model import Encoder


class QueueFull(Exception):
    """More items are waiting than the server accepts (answered 429)."""


@dataclass
class Job:
    """One item of a request: a decoded image or a text, and where its vector goes."""

    kind: str  # "image" | "text"
    item: Decoded | str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.monotonic)


def _deliver(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # the request gave up meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Batcher:
    """The encoder behind a bounded queue, served by one thread."""

    def __init__(self, encoder: Encoder, batch_size: int, max_wait: float, max_queue: int, metrics=None):
        self.encoder, self.batch_size, self.max_wait, self.max_queue = encoder, batch_size, max_wait, max_queue
        self.metrics = metrics
        self.jobs: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.busy_since = 0.0  # monotonic time the running batch started; 0 when idle
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="siglip-batcher", daemon=True)
        self.thread.start()

    def depth(self) -> int:
        return len(self.jobs)

    def submit(self, kind: str, items: list) -> list[asyncio.Future]:
        """Queue a request's items (all or none); futures of their vectors (float32 numpy, L2-normalized)."""
        loop = asyncio.get_running_loop()
        jobs = [Job(kind, item, loop.create_future(), loop) for item in items]
        with self.lock:
            if len(self.jobs) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.jobs)} items are waiting")
            self.jobs.extend(jobs)
            self.lock.notify()
        return [j.future for j in jobs]

    def drop(self, futures: list[asyncio.Future]) -> None:
        """Take a request's items out of the queue (its client gave up); those already running finish unread."""
        gone = set(map(id, futures))
        with self.lock:
            self.jobs = collections.deque(j for j in self.jobs if id(j.future) not in gone)
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join(timeout=5)

    def _take(self) -> list[Job]:
        """The next batch: the oldest live item and the live items of its kind after it, up to the batch size,
        waiting up to max_wait for more to arrive."""
        with self.lock:
            while True:
                while self.jobs and self.jobs[0].future.done():  # given up: dropped unseen
                    self.jobs.popleft()
                if self.jobs or self.stopped:
                    break
                self.lock.wait(timeout=1.0)
            if self.stopped:
                return []
            kind, first = self.jobs[0].kind, self.jobs[0].queued
            while True:
                same = sum(1 for j in self.jobs if j.kind == kind and not j.future.done())
                left = first + self.max_wait - time.monotonic()
                if same >= self.batch_size or left <= 0 or self.stopped:
                    break
                self.lock.wait(timeout=left)
            batch, rest = [], collections.deque()
            for j in self.jobs:
                if j.future.done():
                    continue
                (batch if j.kind == kind and len(batch) < self.batch_size else rest).append(j)
            self.jobs = rest
            return batch

    def _loop(self) -> None:
        while not self.stopped:
            batch = self._take()
            if not batch:
                continue
            self.busy_since = time.monotonic()
            try:
                vectors = self._run(batch)
                for j, v in zip(batch, vectors):
                    j.loop.call_soon_threadsafe(_deliver, j.future, v)
            except BaseException as e:  # noqa: BLE001 - the batch's requests fail; the server goes on
                for j in batch:
                    j.loop.call_soon_threadsafe(_deliver, j.future, None, e)
            finally:
                self.busy_since = 0.0
            if self.metrics is not None:
                self.metrics.batch(batch[0].kind, len(batch))

    def _run(self, batch: list[Job]) -> np.ndarray:
        if batch[0].kind == "text":
            return self.encoder.encode_texts([j.item for j in batch]).cpu().numpy()
        return self.images([j.item for j in batch])

    def images(self, items: list[Decoded]) -> np.ndarray:
        return embed_decoded(self.encoder, items, self.batch_size)
