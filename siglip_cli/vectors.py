"""The embeddings of an index as one memory-mapped matrix (the sidecar), for `search` and `dedup`.

The first query over an index copies its current ok rows' vectors (float16 or float32, as stored) into
`vectors.npy`, the same vectors in int8 into `fast.npy` (for a first pass that reads a quarter or half of the
bytes; exact results all the same, see top_k), and their paths, sizes and resolutions into `paths.bin`,
`ends.npy` and `ints.npy`, with the index's metadata in `meta.json`, in a hidden folder beside the index (or,
where that is not writable, in the cache); sidecar.py builds it. Searching needs numpy only: no torch, and no
pyarrow (which imports pandas; the two are 0.6 s of a search on a slow CPU). The sidecar remembers the index's
parts (names, sizes, times): any change to the index rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import RunError
from .index.layouts import state as _state
from .quantized import ROUNDING, Quantized, to_float32

SIDECAR_VERSION = 6  # 6: paths.bin holds the exact bytes of names that are not UTF-8


@dataclass
class Vectors:
    """An index's ok rows: vectors (n, D) memory-mapped, their rows, and the index's metadata."""

    matrix: np.ndarray
    rows: "Rows"
    meta: dict
    fast: "Quantized | None" = None  # the same vectors in int8, for a first pass


@dataclass
class Rows:
    """The rows' paths (their exact bytes, one after another: UTF-8, or what a name that is not UTF-8 holds),
    where each path ends, and width, height and size (-1: none)."""

    text: bytes
    ends: np.ndarray  # (n,) int64
    ints: np.ndarray  # (n, 3) int64

    def __len__(self) -> int:
        return len(self.ends)

    def raw(self, i: int) -> bytes:
        return self.text[int(self.ends[i - 1]) if i else 0 : int(self.ends[i])]

    def path(self, i: int) -> str:
        """The path as the index's `path` column shows it (U+FFFD for bytes that are not UTF-8)."""
        return self.raw(i).decode(errors="replace")

    def paths(self) -> list[str]:
        ends = self.ends.tolist()
        return [self.text[a:b].decode(errors="replace") for a, b in zip([0] + ends[:-1], ends)]

    def find(self, path: str) -> int:
        """The row of exactly this path (a name that is not UTF-8 as os.fsdecode gives it), or -1."""
        try:
            want = os.fsencode(path)
        except UnicodeEncodeError:  # not a name a file can have
            return -1
        at = self.text.find(want) if want else -1
        while at >= 0:
            i = int(np.searchsorted(self.ends, at, side="right"))  # the row whose bytes hold position `at`
            if (self.ends[i - 1] if i else 0) == at and self.ends[i] == at + len(want):
                return i
            at = self.text.find(want, at + 1)
        return -1

    def record(self, i: int) -> dict:
        """path, width, height, size, and path_bytes: the exact name where it is not UTF-8 (as in the index)."""
        raw = self.raw(i)
        try:
            path, exact = raw.decode(), None
        except UnicodeDecodeError:
            path, exact = raw.decode(errors="replace"), raw
        width, height, size = (None if x < 0 else x for x in self.ints[i].tolist())
        return {"path": path, "width": width, "height": height, "size": size, "path_bytes": exact}


def _places(index: str) -> list[str]:
    real = os.path.realpath(index)
    folder, name = os.path.split(real)
    beside = os.path.join(real, ".siglip-vectors") if os.path.isdir(real) else os.path.join(folder, f".{name}.vectors")
    from .vocab import cache_dir

    cached = os.path.join(cache_dir(), "vectors", hashlib.sha256(real.encode()).hexdigest()[:24])
    return [beside, cached]


def load(index: str, resident: bool = False) -> Vectors:
    """The sidecar of an index, built or rebuilt when missing or out of date. `resident`: its int8 copy, which
    every search reads whole, stays mapped after a scan (for a server that searches it again and again: each scan
    then takes half the time, and the process's resident memory includes that file)."""
    if not os.path.exists(index):
        raise RunError(f"no index at {index}")
    key = {"version": SIDECAR_VERSION, "state": _state(index)}
    for place in _places(index):
        try:
            with open(os.path.join(place, "key.json")) as f:
                if json.load(f) == key:
                    return _open(place, resident)
        except (OSError, ValueError):
            continue
    from .sidecar import build

    for place in _places(index):
        try:
            build(index, place, key)
            return _open(place, resident)
        except PermissionError:
            continue
        except OSError as e:
            if e.errno not in (13, 30):  # EACCES, EROFS: try the cache
                raise
    raise RunError(f"cannot write the vectors of {index} beside it or in the cache")


def _open(place: str, resident: bool = False) -> Vectors:
    def at(name: str) -> str:
        return os.path.join(place, name)

    _read_ahead(at("fast.npy"))
    matrix = np.load(at("vectors.npy"), mmap_mode="r")
    bounds = np.load(at("bounds.npy"))
    values = np.load(at("fast.npy"), mmap_mode="r")
    fast = Quantized(_resident(values) if resident else values, bounds[:, 0], bounds[:, 1], np.load(at("columns.npy")))
    with open(at("paths.bin"), "rb") as f, open(at("meta.json")) as m:
        rows, meta = Rows(f.read(), np.load(at("ends.npy")), np.load(at("ints.npy"))), json.load(m)
    n, d = matrix.shape
    whole = (
        fast.values.shape == (n, d)
        and bounds.shape == (n, 2)
        and fast.columns.shape == (d,)
        and rows.ends.shape == (n,)
        and rows.ints.shape == (n, 3)
        and len(rows.text) == (rows.ends[-1] if n else 0)
    )
    if not whole:  # a file cut short or replaced by hand: load() builds the sidecar again
        raise ValueError(f"the sidecar in {place} is not whole")
    return Vectors(matrix, rows, meta, fast)


def _resident(values: np.memmap) -> np.ndarray:
    """A mapped .npy as a plain array (which _scan reads in place), its pages mapped now, in a thread
    (MADV_POPULATE_READ, Linux 5.14+; 0.12 s for 1.15 GB cached) and kept: the first scan is as fast as the next."""
    import mmap
    import threading

    if not values.size:
        return values
    with open(values.filename, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def populate():
        try:
            mapping.madvise(22)  # MADV_POPULATE_READ
        except (OSError, AttributeError, ValueError):  # an older kernel or no madvise: the first scan maps them
            pass

    threading.Thread(target=populate, daemon=True).start()
    return np.frombuffer(mapping, values.dtype, values.size, values.offset).reshape(values.shape)


def _read_ahead(path: str) -> None:
    """Have the kernel read a file the scan reads whole into the page cache, in a thread, now: while the query
    is embedded (a model load, a server's answer) rather than during the scan. Where it is cached already
    (the usual case) this costs nothing."""
    import threading

    def run():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:  # in steps: Linux reads no more than the device's read-ahead window (128 KB-8 MB) per call
                for at in range(0, os.fstat(fd).st_size, 8 << 20):
                    os.posix_fadvise(fd, at, 8 << 20, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):  # no posix_fadvise (macOS, Windows): the scan reads it as before
            pass

    threading.Thread(target=run, daemon=True).start()


def _scan(matrix: np.ndarray, q: np.ndarray, block: int = 256) -> np.ndarray:
    """matrix @ q in float32, for every row: blocks of `block` rows converted to float32 in a buffer, by one thread
    per usable CPU (256 rows of 1152: the buffer stays in cache, and BLAS keeps each product on its caller's thread;
    at 512 a 1M-row scan takes 2.5x as long on a 2-core EPYC). A memory-mapped .npy is read with pread, not mapped (the
    page cache keeps the file, the process does not: scanning a 1 GB sidecar costs a few blocks of memory). Mapping
    it afresh instead, and letting its pages go behind the scan, was no faster in a new process. Any other array
    is read in place: a sidecar opened `resident` (its pages stay mapped) is scanned in half the time."""
    from concurrent.futures import ThreadPoolExecutor

    from .config import usable_cpus

    n = len(matrix)
    width = int(np.prod(matrix.shape[1:]))
    out = np.empty(n, np.float32)
    mapped = isinstance(matrix, np.memmap) and matrix.filename is not None
    # a whole .npy only: a slice of a memmap keeps its parent's offset
    mapped = mapped and matrix.offset + matrix.nbytes == os.path.getsize(matrix.filename)
    fd = os.open(matrix.filename, os.O_RDONLY) if mapped else -1

    def part(lo: int, hi: int) -> None:
        raw = np.empty((block, width), matrix.dtype)
        buf = np.empty((block, width), np.float32)
        for start in range(lo, hi, block):
            m = min(block, hi - start)
            if mapped:
                view = memoryview(raw[:m]).cast("B")
                at, got = matrix.offset + start * width * matrix.itemsize, 0
                while got < len(view):
                    more = os.preadv(fd, [view[got:]], at + got)
                    if not more:
                        raise RunError(f"{matrix.filename} is shorter than its header says; delete it to rebuild it")
                    got += more
                to_float32(raw[:m], buf[:m])
            else:
                to_float32(matrix[start : start + m], buf[:m])
            np.matmul(buf[:m], q, out=out[start : start + m])

    try:
        threads = max(1, min(usable_cpus(), n // (16 * block)))
        cuts = [n * i // threads // block * block for i in range(threads)] + [n]
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(part, a, b) for a, b in zip(cuts, cuts[1:])]:
                f.result()
    finally:
        if fd >= 0:
            os.close(fd)
    return out


def top_k(
    matrix: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray | None = None, fast: Quantized | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k best rows by dot product with a unit query, in float32: (indices, cosines), best first; `keep`
    masks rows out (path filters).

    With `fast` (the rows in int8), a first pass scores every row from a quarter or half of the bytes (the query
    times the column scales c, against the int8 values, times each row's scale). Each approximate score a_i is
    within w_i = |q| e_i + 3 d u 127 s_i sum_j |c_j q_j| of the exact one: e_i is the row's stored error bound,
    and the second term covers float32 rounding (u = 2^-24) of the first pass's sum of d products, each at most
    127 s_i |c_j q_j|, of its scaling, and of the recheck's own sum. Let L be the k-th largest a_i - w_i: at
    least k rows score at least L, so every row of the true top k scores at least L, hence has a_i + w_i >= L.
    Those candidates (about 150 of a million random rows) are scored again in float32 from the stored vectors;
    where they are over a sixteenth of the rows, every row is.
    """
    q = np.ascontiguousarray(query, np.float32)
    n = len(matrix)
    if fast is None or n <= k:
        scores = _scan(matrix, q)
        scores[~np.isfinite(scores)] = -np.inf  # rows that are not finite are never results
        if keep is not None:
            scores[~keep] = -np.inf
    else:
        qc = q * fast.columns
        approx = _scan(fast.values, qc) * fast.scale
        spread = np.float32(3 * 127 * matrix.shape[1] * ROUNDING * np.abs(qc.astype(np.float64)).sum())
        width = np.float32(np.linalg.norm(q)) * fast.error + fast.scale * spread
        low, high = approx - width, approx + width
        low[~np.isfinite(low)] = -np.inf  # rows that are not finite are never results
        if keep is not None:
            low[~keep] = high[~keep] = -np.inf
        kth = np.partition(low, n - k)[n - k]
        rows = np.flatnonzero((high >= kth) & np.isfinite(high))
        if len(rows) > n // 16:  # rows too much alike for int8 to tell apart: one float32 scan, bounded memory
            scores = _scan(matrix, q)
            scores[~np.isfinite(scores)] = -np.inf
            if keep is not None:
                scores[~keep] = -np.inf
        else:
            scores = np.full(n, -np.inf, np.float32)
            scores[rows] = np.asarray(matrix[rows], np.float32) @ q
    pick = np.argpartition(-scores, k - 1)[:k] if n > k else np.arange(n)
    order = np.lexsort((pick, -scores[pick]))
    best_i, best_s = pick[order], scores[pick][order]
    finite = np.isfinite(best_s)
    return best_i[finite], best_s[finite]


def as_tensor(rows: np.ndarray):
    """A block of the read-only memory map as a torch tensor (read, never written: torch's warning does not apply)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(rows))
