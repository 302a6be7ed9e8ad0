"""Decode in worker processes with bounded prefetch, and collate the results into batches of uint8 pixels.

Workers write pixels straight into shared-memory slots (one per chunk in flight) and send back only the
small per-file records, so the main process does one copy per image into the batch buffer and no pickling
of pixels. The slots are sized to the room in /dev/shm and reserved up front; when not even one image per
worker fits, pixels travel by pipe instead. Blocks left by killed runs are removed at the start.

A file that stalls (a hung network mount) for longer than the timeout gets an error row and its worker is
killed; a worker that dies (a decoder segfault, the OOM killer) has the file it was on decoded again alone,
and only a file that kills its worker alone is recorded as corrupt. Everything else in flight is redone.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import shared_memory
from typing import Iterable, Iterator

import numpy as np
import torch

from . import worker
from .compat import pool_processes
from .decode import STALLED, Decoded, ImageSpec, decode
from .errors import RunError
from .shm import SHM_DIR, free, reap_stale_blocks, slots
from .sources import FileRecord
from .worker import pixel_shape


@dataclass
class Batch:
    """Decoded items in input order, and the pixels of those that decoded, ready to ship to the device."""

    items: list[Decoded]
    ok: list[int]  # indices into items of the images in `pixels`
    pixels: torch.Tensor | None  # uint8: (n, H, W, 3), or (n, max_patches, p*p*3) for NaFlex
    patch_mask: torch.Tensor | None = None  # NaFlex: (n, max_patches) int32
    grids: torch.Tensor | None = None  # NaFlex: (n, 2) int64 patch rows, columns


# -- the pool -----------------------------------------------------------------------------------------
class _Pool:
    """A spawn-context process pool that can be killed and restarted when a worker dies or hangs."""

    def __init__(self, workers: int, board):
        self.workers, self.board = workers, board
        # spawn, not fork: the parent holds torch threads (and maybe CUDA) that a forked child must not inherit.
        self.ctx = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self.ctx, initializer=worker.init, initargs=(self.board, os.getpid())
        )

    def submit(self, *args):
        return self.executor.submit(worker.decode_into, *args)

    def _kill(self) -> None:
        for p in pool_processes(self.executor):
            p.kill()  # a worker stuck in a read or a decoder loop: nothing else would stop it

    def restart(self) -> None:
        self._kill()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def close(self) -> None:
        self._kill()
        self.executor.shutdown(wait=True, cancel_futures=True)


def chunk_size(batch_size: int, workers: int) -> int:
    """Files per worker task: enough to amortize a round trip, few enough to spread a batch over the workers."""
    return max(1, min(32, batch_size // max(1, workers)))


def _chunks(records: Iterable[FileRecord], size: int) -> Iterator[list[FileRecord]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _crashed(rec: FileRecord) -> Decoded:
    return Decoded(
        rec,
        error="the decoder crashed on this file (its worker process died when decoding it alone); "
        "the file is probably corrupt",
    )


def _stalled(rec: FileRecord, timeout: float) -> Decoded:
    return Decoded(rec, error=STALLED.format(timeout))


@dataclass
class _Chunk:
    """A chunk of files in flight on one lane (and its shared-memory slot, if any)."""

    records: list[FileRecord]
    lane: int
    slot: shared_memory.SharedMemory | None
    settled: dict[int, Decoded] = field(default_factory=dict)  # rows decided outside the pool: stalls, crashes
    rows: list[int] = field(default_factory=list)  # the rows of the task in flight
    future: Future | None = None


class _Decoder:
    """Chunks through the pool in order; a stall times out one file, a crash blames only a file that crashes
    again when decoded alone (a crash can also come from the machine: memory, /dev/shm)."""

    # Recoveries in a row that finish no chunk before the run gives up: workers that die whatever they do.
    MAX_FRUITLESS = 5

    def __init__(self, pool: _Pool, spec: ImageSpec, timeout: float):
        self.pool, self.spec, self.timeout = pool, spec, timeout
        self.poll = min(0.5, timeout / 4)
        self.fruitless = 0

    def submit(self, c: _Chunk) -> None:
        self.pool.board[c.lane * worker.LANE] = 0.0
        c.rows = [i for i in range(len(c.records)) if i not in c.settled]
        c.future = None
        if c.rows:
            try:
                c.future = self.pool.submit(
                    [c.records[i] for i in c.rows], c.rows, self.spec, c.slot and c.slot.name, c.lane
                )
            except (BrokenProcessPool, RuntimeError) as e:  # a worker died since the last look: recovered as any crash
                c.future = Future()
                c.future.set_exception(BrokenProcessPool(str(e)))

    def _running(self, c: _Chunk) -> tuple[float, int]:
        """(seconds on its current file, that file's row) for a chunk's worker; (0, -1) when none is running."""
        base, board = c.lane * worker.LANE, self.pool.board
        while True:  # the worker clears the start, writes the row, then the start: equal starts frame a true row
            start, row, again = board[base], board[base + 1], board[base]
            if start == again:
                return (time.monotonic() - start, int(row)) if start else (0.0, -1)

    def _fresh(self) -> None:
        """Restart the pool and check that a worker starts at all: when none can, the machine is at fault, and
        no file may be blamed for it."""
        self.pool.restart()
        try:
            self.pool.submit([], [], self.spec, None, -1).result(timeout=max(60.0, self.timeout))
        except Exception as e:
            raise RunError(
                f"decode worker processes die before decoding anything ({type(e).__name__}); "
                "free some memory, or decode in the main process with -j 0"
            ) from None

    def alone(self, rec: FileRecord) -> Decoded:
        """Decode one file by itself in a fresh worker, pixels by pipe: the test of whether the file is to blame."""
        try:
            return self.pool.submit([rec], [0], self.spec, None, -1).result(timeout=self.timeout)[0]
        except BrokenProcessPool:
            self._fresh()
            return _crashed(rec)
        except FutureTimeout:
            self._fresh()
            return _stalled(rec, self.timeout)
        except Exception as e:  # the result could not come back (a bug): one row, not the run
            return Decoded(rec, error=f"cannot decode: {type(e).__name__}: {e}")

    def result(self, head: _Chunk, inflight: list[_Chunk]) -> list[Decoded]:
        """The head chunk's items in order, recovering from stalled and crashed workers on the way."""
        while True:
            try:
                got = head.future.result(timeout=self.poll) if head.future else []
            except FutureTimeout:
                stuck = [(c, row) for c in inflight if c.future for s, row in [self._running(c)] if s > self.timeout]
                if stuck:
                    for c, row in stuck:
                        c.settled[row] = _stalled(c.records[row], self.timeout)
                    self._recover(inflight, [])
                continue
            except Exception as e:
                if isinstance(e, BrokenProcessPool):  # suspects: the file each worker was on
                    suspects = [(c, row) for c in inflight if c.future for _, row in [self._running(c)] if row >= 0]
                else:
                    suspects = [(head, row) for row in head.rows]
                self._recover(inflight, suspects)
                continue
            self.fruitless = 0
            items = dict(head.settled)
            items.update(zip(head.rows, got))
            return [items[i] for i in range(len(head.records))]

    def _recover(self, inflight: list[_Chunk], suspects: list[tuple[_Chunk, int]]) -> None:
        self.fruitless += 1
        if self.fruitless > self.MAX_FRUITLESS:
            raise RunError(
                "decode worker processes keep dying without finishing a file; "
                "free some memory, or decode in the main process with -j 0"
            )
        self._fresh()
        for c, row in suspects:
            if row not in c.settled:
                c.settled[row] = self.alone(c.records[row])
        for c in inflight:
            self.submit(c)


def decoded_chunks(
    records: Iterable[FileRecord],
    spec: ImageSpec,
    workers: int,
    chunk: int,
    timeout: float = 60.0,
    keep: dict | None = None,
) -> Iterator[list[Decoded]]:
    """Decoded files in input order, a chunk at a time, with at most 2*workers chunks in flight.

    The pixels of a yielded chunk may be views into shared memory, valid until the next chunk is asked for.
    `keep`: a dict that holds the worker pool (and its slots) from one call to the next with the same
    settings, instead of starting and stopping it each time (Ray's decode tasks); a call that does not run
    to its end stops it.
    """
    if workers <= 0:
        for part in _chunks(records, chunk):
            yield [decode(r, spec) for r in part]
        return
    shape = pixel_shape(spec)
    blocks, pool, views, whole, asked = None, None, None, False, (spec, workers, chunk)
    try:
        if keep and keep.get("for") == asked:
            chunk, blocks, board, pool = keep.pop("state")
        else:
            _close(keep)
            reap_stale_blocks()
            chunk, blocks = slots(workers, chunk, int(np.prod(shape)))
            if blocks is None:
                print(
                    f"siglip: note: too little room in {SHM_DIR} for decoded images; they travel by pipe instead "
                    "(slower; give the container more, e.g. docker run --shm-size=1g)",
                    file=sys.stderr,
                )
        window = len(blocks) if blocks else 2 * workers
        if pool is None:
            board = multiprocessing.get_context("spawn").RawArray("d", window * worker.LANE)
            pool = _Pool(workers, board)
        decoder = _Decoder(pool, spec, timeout)
        source = _chunks(records, chunk)
        free = list(range(window))
        inflight: list[_Chunk] = []

        def refill():
            while free and (part := next(source, None)) is not None:
                lane = free.pop()
                inflight.append(_Chunk(part, lane, blocks[lane] if blocks else None))
                decoder.submit(inflight[-1])

        refill()
        while inflight:
            head = inflight[0]
            items = decoder.result(head, inflight)
            inflight.pop(0)
            if head.slot is not None:
                views = np.ndarray((len(items), *shape), np.uint8, head.slot.buf)
                for j, d in enumerate(items):
                    if d.error is None and d.pixels is None:
                        d.pixels = views[j, : d.grid[0] * d.grid[1]] if spec.naflex else views[j]
            yield items
            for d in items:
                d.pixels = None  # the views must not outlive the slot's reuse
            views = None
            free.append(head.lane)
            refill()
        whole = True
    finally:
        views = None  # drop the last view, or closing its block fails
        if whole and keep is not None:
            keep.update({"for": asked, "state": (chunk, blocks, board, pool)})
        else:
            _stop(pool, blocks)


def _stop(pool: _Pool | None, blocks: list[shared_memory.SharedMemory] | None) -> None:
    if pool is not None:
        pool.close()
    free(blocks or [])


def _close(keep: dict | None) -> None:
    """Stop a pool kept by decoded_chunks."""
    if keep and "state" in keep:
        _, blocks, _, pool = keep.pop("state")
        _stop(pool, blocks)


def batches(
    records: Iterable[FileRecord],
    spec: ImageSpec,
    batch_size: int,
    workers: int,
    pin: bool = False,
    timeout: float = 60.0,
) -> Iterator[Batch]:
    """The whole input as batches of batch_size files, in order, decoded in parallel.

    Each image is copied once, from its worker's slot into the batch's (pinned, on CUDA) buffer.
    """
    chunk = chunk_size(batch_size, workers)
    shape = pixel_shape(spec)

    def new():  # NaFlex padding need not be zeroed: the encoder masks it
        return torch.empty((batch_size, *shape), dtype=torch.uint8, pin_memory=pin), [], [], []

    pixels, items, ok, grids = new()
    dst = pixels.numpy()
    for part in decoded_chunks(records, spec, workers, chunk, timeout):
        for d in part:
            if d.error is None:
                dst[len(ok), : len(d.pixels)] = d.pixels
                ok.append(len(items))
                grids.append(d.grid)
            items.append(d)
            if len(items) == batch_size:
                yield collate(spec, pixels, items, ok, grids)
                pixels, items, ok, grids = new()
                dst = pixels.numpy()
    if items:
        yield collate(spec, pixels, items, ok, grids)


def collate(spec: ImageSpec, pixels: torch.Tensor, items: list, ok: list, grids: list) -> Batch:
    if not ok:
        return Batch(items, ok, None)
    if not spec.naflex:
        return Batch(items, ok, pixels[: len(ok)])
    g = torch.tensor(grids, dtype=torch.int64)
    counts = g[:, 0] * g[:, 1]
    mask = (torch.arange(spec.max_patches)[None, :] < counts[:, None]).to(torch.int32)
    return Batch(items, ok, pixels[: len(ok)], mask, g)
