"""The decode worker process: its entry points and nothing else.

A spawned worker imports this module, `decode` (PIL, numpy) and the stdlib, never torch: a worker starts in
a fraction of a second and a few tens of MB, however many there are and however often the pool restarts.
A worker dies with the process that started it, even when that one is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from multiprocessing import shared_memory

import numpy as np

from .decode import Decoded, ImageSpec, decode
from .sources import FileRecord

# The progress board: one lane per chunk in flight, two numbers each. The worker writes when it started its
# current file (time.monotonic(), the same clock in every process; 0 when idle) and the file's row in the
# chunk, so the parent can time out one file, not a whole chunk, and knows which file a dead worker was on.
LANE = 2
_board = None
_slots: dict[str, shared_memory.SharedMemory] = {}


def pixel_shape(spec: ImageSpec) -> tuple[int, ...]:
    """The shape of one image's pixels as the model takes them (NaFlex: padded to max_patches)."""
    if spec.naflex:
        return (spec.max_patches, spec.patch_size * spec.patch_size * 3)
    return (spec.height, spec.width, 3)


def _die_with(parent: int) -> None:
    """Exit as soon as the parent is gone: PR_SET_PDEATHSIG on Linux, and a parent-pid check everywhere."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def init(board, parent: int) -> None:
    """Worker initializer: arm the parent-death exits, leave Ctrl-C to the parent (it reaches the whole process
    group; the parent ends the workers and says "interrupted" once, where each worker printed a traceback), and
    keep the progress board."""
    global _board
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # systemd signals the whole group: the parent ends them (SIGKILL)
    _die_with(parent)
    _board = board


def _attach(name: str) -> shared_memory.SharedMemory:
    # Spawned workers share the parent's resource tracker, so attaching registers nothing new and the parent
    # alone unlinks the block.
    if name not in _slots:
        _slots[name] = shared_memory.SharedMemory(name=name)
    return _slots[name]


def decode_into(
    records: list[FileRecord], rows: list[int], spec: ImageSpec, slot: str | None, lane: int
) -> list[Decoded]:
    """Worker task: decode files; put each one's pixels in its row of the shared slot (or, with no slot, in
    the returned record itself), and report progress on the board's lane.

    Never raises for one file: whatever goes wrong with a file becomes that file's error.
    """
    out = np.ndarray((max(rows, default=-1) + 1, *pixel_shape(spec)), np.uint8, _attach(slot).buf) if slot else None
    results = []
    board = _board if lane >= 0 else None
    base = lane * LANE
    for rec, row in zip(records, rows):
        if board is not None:
            board[base] = 0.0  # see _Decoder._running: start, row, start
            board[base + 1] = row
            board[base] = time.monotonic()
        d = decode(rec, spec)
        if out is not None and d.pixels is not None:
            try:
                out[row, : len(d.pixels)] = d.pixels
                d.pixels = None
            except (ValueError, IndexError) as e:  # pixels that do not fit the model's shape: a bug, one row
                d = Decoded(rec, d.sha256, d.width, d.height, error=f"cannot decode: {e}")
        results.append(d)
    if board is not None:
        board[base] = 0.0
    return results


def decode_bytes(data: bytes, spec: ImageSpec) -> Decoded:
    """Worker task for `siglip serve`: one received image, decoded as `embed` decodes a file."""
    return decode(FileRecord("<request>"), spec, data)
