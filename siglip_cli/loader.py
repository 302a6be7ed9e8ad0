"""Decode in worker processes with bounded prefetch, and collate results into batches of uint8 pixels."""

from __future__ import annotations

import collections
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
import torch

from .decode import Decoded, ImageSpec, decode_chunk
from .sources import FileRecord


@dataclass
class Batch:
    """Decoded items in input order, and the pixels of those that decoded, ready to ship to the device."""

    items: list[Decoded]
    ok: list[int]  # indices into items of the images in `pixels`
    pixels: torch.Tensor | None  # uint8: (n, H, W, 3), or (n, max_patches, p*p*3) for NaFlex
    patch_mask: torch.Tensor | None = None  # NaFlex: (n, max_patches) int32
    grids: torch.Tensor | None = None  # NaFlex: (n, 2) int64 patch rows, columns


def _chunks(records: Iterable[FileRecord], size: int) -> Iterator[list[FileRecord]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def decoded_stream(records: Iterable[FileRecord], spec: ImageSpec, workers: int, chunk: int) -> Iterator[Decoded]:
    """Decoded files in input order; at most 2*workers chunks are in flight, so memory stays bounded."""
    if workers <= 0:
        for part in _chunks(records, chunk):
            yield from decode_chunk(part, spec)
        return
    # spawn, not fork: the parent holds torch threads (and maybe CUDA) that a forked child must not inherit.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: collections.deque[Future] = collections.deque()
        for part in _chunks(records, chunk):
            pending.append(pool.submit(decode_chunk, part, spec))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def collate(items: list[Decoded], spec: ImageSpec, pin: bool) -> Batch:
    """Stack the good images of a batch into one uint8 tensor (pinned for an async copy when asked)."""
    ok = [i for i, d in enumerate(items) if d.error is None]
    if not ok:
        return Batch(items, ok, None)
    if not spec.naflex:
        pixels = torch.empty((len(ok), spec.height, spec.width, 3), dtype=torch.uint8, pin_memory=pin)
        dst = pixels.numpy()
        for j, i in enumerate(ok):
            dst[j] = items[i].pixels
        return Batch(items, ok, pixels)
    p = spec.patch_size
    pixels = torch.zeros((len(ok), spec.max_patches, p * p * 3), dtype=torch.uint8, pin_memory=pin)
    mask = np.zeros((len(ok), spec.max_patches), dtype=np.int32)
    grids = np.zeros((len(ok), 2), dtype=np.int64)
    dst = pixels.numpy()
    for j, i in enumerate(ok):
        n = len(items[i].pixels)
        dst[j, :n] = items[i].pixels
        mask[j, :n] = 1
        grids[j] = items[i].grid
    return Batch(items, ok, pixels, torch.from_numpy(mask), torch.from_numpy(grids))


def batches(
    records: Iterable[FileRecord], spec: ImageSpec, batch_size: int, workers: int, pin: bool = False
) -> Iterator[Batch]:
    """The whole input as batches of batch_size files, in order, decoded in parallel."""
    chunk = max(1, min(32, batch_size // max(1, workers)))
    stream = decoded_stream(records, spec, workers, chunk)
    while items := list(islice(stream, batch_size)):
        yield collate(items, spec, pin)
