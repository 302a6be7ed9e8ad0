"""Decode in worker processes with bounded prefetch, and collate the results into batches of uint8 pixels.

Workers write pixels straight into shared-memory slots (one per chunk in flight) and send back only the
small per-file records, so the main process does one copy per image into the batch buffer and no pickling
of pixels. A worker that crashes (a decoder segfault, the OOM killer) or stalls (a hung network mount)
costs the files it was holding an error row each: the pool is restarted and the chunk is redone one file at a
time to find the culprit.
"""

from __future__ import annotations

import collections
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from multiprocessing import shared_memory
from typing import Iterable, Iterator

import numpy as np
import torch

from .decode import Decoded, ImageSpec, decode, decode_chunk
from .sources import FileRecord


@dataclass
class Batch:
    """Decoded items in input order, and the pixels of those that decoded, ready to ship to the device."""

    items: list[Decoded]
    ok: list[int]  # indices into items of the images in `pixels`
    pixels: torch.Tensor | None  # uint8: (n, H, W, 3), or (n, max_patches, p*p*3) for NaFlex
    patch_mask: torch.Tensor | None = None  # NaFlex: (n, max_patches) int32
    grids: torch.Tensor | None = None  # NaFlex: (n, 2) int64 patch rows, columns


def pixel_shape(spec: ImageSpec) -> tuple[int, ...]:
    """The shape of one image's pixels as the model takes them (NaFlex: padded to max_patches)."""
    if spec.naflex:
        return (spec.max_patches, spec.patch_size * spec.patch_size * 3)
    return (spec.height, spec.width, 3)


# -- worker side --------------------------------------------------------------------------------------
_slots: dict[str, shared_memory.SharedMemory] = {}


def _attach(name: str) -> shared_memory.SharedMemory:
    # Spawned workers share the parent's resource tracker, so attaching here registers nothing new and the
    # parent alone unlinks the block.
    if name not in _slots:
        _slots[name] = shared_memory.SharedMemory(name=name)
    return _slots[name]


def _decode_into(records: list[FileRecord], spec: ImageSpec, slot: str, offset: int) -> list[Decoded]:
    """Worker task: decode files, put their pixels in rows offset.. of a shared slot, return the records."""
    shape = pixel_shape(spec)
    rows = np.ndarray((offset + len(records), *shape), np.uint8, _attach(slot).buf)
    out = decode_chunk(records, spec)
    for j, d in enumerate(out):
        if d.pixels is not None:
            rows[offset + j, : len(d.pixels)] = d.pixels
            d.pixels = None
    return out


# -- main side ----------------------------------------------------------------------------------------
class _Pool:
    """A spawn-context process pool that can be killed and restarted when a worker dies or hangs."""

    def __init__(self, workers: int):
        self.workers = workers
        # spawn, not fork: the parent holds torch threads (and maybe CUDA) that a forked child must not inherit.
        self.ctx = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=self.ctx)

    def submit(self, *args):
        return self.executor.submit(_decode_into, *args)

    def restart(self) -> None:
        for p in list(getattr(self.executor, "_processes", {}).values()):
            p.kill()  # a worker stuck in a read or a decoder loop: nothing else would stop it
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.ctx)

    def close(self) -> None:
        for p in list(getattr(self.executor, "_processes", {}).values()):
            p.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)


def chunk_size(batch_size: int, workers: int) -> int:
    """Files per worker task: enough to amortize a round trip, few enough to spread a batch over the workers."""
    return max(1, min(32, batch_size // max(1, workers)))


def _chunks(records: Iterable[FileRecord], size: int) -> Iterator[list[FileRecord]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _isolate(pool: _Pool, part: list[FileRecord], spec: ImageSpec, slot: str, timeout: float) -> list[Decoded]:
    """Redo a chunk that broke the pool, one file at a time; the file that breaks it again gets an error row."""
    out = []
    for j, rec in enumerate(part):
        try:
            out.append(pool.submit([rec], spec, slot, j).result(timeout=timeout)[0])
        except BrokenProcessPool:
            pool.restart()
            out.append(Decoded(rec, error="the decoder crashed on this file (its worker process died); "
                                          "the file is probably corrupt"))
        except FutureTimeout:
            pool.restart()
            out.append(Decoded(rec, error=f"reading or decoding took over {timeout:g}s (a stalled disk or network "
                                          "mount?); raise --timeout if the file is just huge"))
    return out


def decoded_chunks(
    records: Iterable[FileRecord], spec: ImageSpec, workers: int, chunk: int, timeout: float = 60.0
) -> Iterator[list[Decoded]]:
    """Decoded files in input order, a chunk at a time, with at most 2*workers chunks in flight.

    The pixels of a yielded chunk are views into shared memory, valid until the next chunk is asked for.
    """
    if workers <= 0:
        for part in _chunks(records, chunk):
            yield [decode(r, spec) for r in part]
        return
    window = 2 * workers
    shape = pixel_shape(spec)
    nbytes = chunk * int(np.prod(shape))
    free = [shared_memory.SharedMemory(create=True, size=nbytes) for _ in range(window)]
    blocks = list(free)
    pool = _Pool(workers)
    rows = None
    try:
        source = _chunks(records, chunk)
        pending: collections.deque = collections.deque()

        def refill():
            while free and (part := next(source, None)) is not None:
                slot = free.pop()
                pending.append((part, slot, pool.submit(part, spec, slot.name, 0)))

        refill()
        while pending:
            part, slot, future = pending.popleft()
            try:
                items = future.result(timeout=timeout)
            except (BrokenProcessPool, FutureTimeout):
                lost = [(p, s) for p, s, _ in pending]
                pending.clear()
                pool.restart()
                items = _isolate(pool, part, spec, slot.name, timeout)
                pending.extend((p, s, pool.submit(p, spec, s.name, 0)) for p, s in lost)
            rows = np.ndarray((len(part), *shape), np.uint8, slot.buf)
            for j, d in enumerate(items):
                if d.error is None:
                    d.pixels = rows[j, : d.grid[0] * d.grid[1]] if spec.naflex else rows[j]
            yield items
            for d in items:
                d.pixels = None  # the views must not outlive the slot's reuse
            free.append(slot)
            refill()
    finally:
        rows = None  # drop the last view, or closing its block fails
        pool.close()
        for b in blocks:
            b.close()
            b.unlink()


def batches(
    records: Iterable[FileRecord], spec: ImageSpec, batch_size: int, workers: int, pin: bool = False,
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
                yield _batch(spec, pixels, items, ok, grids)
                pixels, items, ok, grids = new()
                dst = pixels.numpy()
    if items:
        yield _batch(spec, pixels, items, ok, grids)


def _batch(spec: ImageSpec, pixels: torch.Tensor, items: list, ok: list, grids: list) -> Batch:
    if not ok:
        return Batch(items, ok, None)
    if not spec.naflex:
        return Batch(items, ok, pixels[: len(ok)])
    g = torch.tensor(grids, dtype=torch.int64)
    counts = g[:, 0] * g[:, 1]
    mask = (torch.arange(spec.max_patches)[None, :] < counts[:, None]).to(torch.int32)
    return Batch(items, ok, pixels[: len(ok)], mask, g)
