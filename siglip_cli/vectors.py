"""The embeddings of an index as one memory-mapped matrix (the sidecar), for `search` and `dedup`.

The first query over an index copies its current ok rows' vectors (float16 or float32, as stored) into
`vectors.npy` and their paths, sizes and resolutions into `rows.parquet`, in a hidden folder beside the
index (or, where that is not writable, in the cache). A later query maps them in well under a second. The
sidecar remembers the index's parts (names, sizes, times): any change to the index rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import RunError
from .index.files import METADATA_KEY
from .index.layouts import _parts, is_file_output

SIDECAR_VERSION = 2
# bfloat16 keeps 8 significant bits: a dot product of two unit vectors rounded to it is off by at most
# (2u + u^2) with u = 2^-8, under 0.008. The first pass keeps every row within twice a generous 2^-6 of the
# k-th best approximate score; that holds the true top k (see top_k), rechecked in float32.
FAST_ERROR = 2.0**-6
ROW_COLUMNS = ["path", "width", "height", "size"]


@dataclass
class Vectors:
    """An index's ok rows: vectors (n, D) memory-mapped, their rows, and the index's metadata."""

    matrix: np.ndarray
    rows: pa.Table
    meta: dict
    fast: np.ndarray | None = None  # the same vectors rounded to bfloat16 (int16 bits), for a first pass


def _state(index: str) -> list:
    """What identifies the index's contents now: its files' names, sizes and times."""
    files = [index] if is_file_output(index) or not os.path.isdir(index) else _parts(index)
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return out


def _meta(index: str) -> dict:
    files = [index] if is_file_output(index) or not os.path.isdir(index) else _parts(index)
    if not files:
        raise RunError(f"{index} holds no siglip index")
    try:
        return json.loads(pq.read_schema(files[-1]).metadata[METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        raise RunError(f"{index} was not written by siglip (no settings in its metadata)") from None


def _places(index: str) -> list[str]:
    real = os.path.realpath(index)
    folder, name = os.path.split(real)
    beside = os.path.join(real, ".siglip-vectors") if os.path.isdir(real) else os.path.join(folder, f".{name}.vectors")
    from .vocab import cache_dir

    cached = os.path.join(cache_dir(), "vectors", hashlib.sha256(real.encode()).hexdigest()[:24])
    return [beside, cached]


def load(index: str) -> Vectors:
    """The sidecar of an index, built or rebuilt when missing or out of date."""
    if not os.path.exists(index):
        raise RunError(f"no index at {index}")
    meta = _meta(index)
    if not _has_embeddings(index):
        raise RunError(f"{index} holds no embeddings (made by `siglip {meta.get('task')}`); search an index "
                       "made by `siglip embed` or `siglip tag --with-embeddings`")
    key = {"version": SIDECAR_VERSION, "state": _state(index)}
    for place in _places(index):
        try:
            with open(os.path.join(place, "key.json")) as f:
                if json.load(f) == key:
                    return _open(place, meta)
        except (OSError, ValueError):
            continue
    for place in _places(index):
        try:
            _build(index, place, key)
            return _open(place, meta)
        except PermissionError:
            continue
        except OSError as e:
            if e.errno not in (13, 30):  # EACCES, EROFS: try the cache
                raise
    raise RunError(f"cannot write the vectors of {index} beside it or in the cache")


def _has_embeddings(index: str) -> bool:
    files = [index] if is_file_output(index) or not os.path.isdir(index) else _parts(index)
    return "embedding" in pq.read_schema(files[-1]).names


def _open(place: str, meta: dict) -> Vectors:
    matrix = np.load(os.path.join(place, "vectors.npy"), mmap_mode="r")
    fast = np.load(os.path.join(place, "fast.npy"), mmap_mode="r")
    return Vectors(matrix, pq.read_table(os.path.join(place, "rows.parquet")), meta, fast)


def _sources(index: str) -> list[str]:
    """The files holding the index's current rows, oldest first (reader.read_index's rules: parts of other
    settings than the newest are left out)."""
    from .index.reader import _signature

    if is_file_output(index) or not os.path.isdir(index):
        return [index]
    parts, newest = [], None
    for part in reversed(_parts(index)):
        try:
            sig = _signature(pq.read_schema(part))
        except FileNotFoundError:
            continue
        if parts and sig != newest:
            continue
        newest = newest if parts else sig
        parts.append(part)
    return parts[::-1]


def _path_bytes(file: str) -> pa.ChunkedArray:
    """A file's path_bytes column (the exact names that are not UTF-8), or nulls where it has none."""
    pf = pq.ParquetFile(file)
    if "path_bytes" in pf.schema_arrow.names:
        return pf.read(columns=["path_bytes"]).column(0)
    return pa.chunked_array([pa.nulls(pf.metadata.num_rows, pa.binary())])


def _current(files: list[str]) -> tuple[np.ndarray, pa.Table]:
    """Row numbers (across the files, in order) of each path's newest ok row, and those rows' small columns."""
    light = pa.concat_tables([pq.read_table(f, columns=ROW_COLUMNS + ["status"]) for f in files])
    names = pa.concat_arrays([c for f in files for c in _path_bytes(f).chunks]) if files else pa.array([], pa.binary())
    n = pa.array(np.arange(light.num_rows), pa.int64())
    keyed = pa.table({"path": light.column("path"), "path_bytes": names, "n": n})
    last = keyed.group_by(["path", "path_bytes"], use_threads=False).aggregate([("n", "max")]).column("n_max")
    rows = np.sort(last.to_numpy())
    if len(rows):
        rows = rows[pc.equal(light.column("status").take(pa.array(rows)), "ok").to_numpy(zero_copy_only=False)]
    return rows, light.take(pa.array(rows, pa.int64())).select(ROW_COLUMNS)


def _row_groups(files: list[str]):
    """The embedding column of the files, a row group at a time and in order, decoded by one thread per usable
    CPU a few groups ahead (Parquet's list decoding is the slow part of a build; memory: those few groups)."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    from .config import usable_cpus

    def read(file: str, group: int) -> pa.Table:
        return pq.ParquetFile(file, pre_buffer=False).read_row_group(group, columns=["embedding"], use_threads=False)

    jobs = [(f, g) for f in files for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    ahead = max(1, usable_cpus())
    with ThreadPoolExecutor(ahead) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.submit(read, *job))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _build(index: str, place: str, key: dict) -> None:
    """Stream the current rows' vectors into vectors.npy (as stored) and fast.npy (bfloat16 bits), one batch at a
    time, with plain writes: memory stays at one batch whatever the index's size."""
    import torch

    files = _sources(index)
    rows, light = _current(files)
    vector = pq.read_schema(files[-1]).field("embedding").type
    dim, dtype = vector.list_size, np.dtype(vector.value_type.to_pandas_dtype())
    parent = os.path.dirname(place)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".vectors-", dir=parent)
    try:
        with open(os.path.join(tmp, "vectors.npy"), "wb") as out, open(os.path.join(tmp, "fast.npy"), "wb") as fast:
            for f, t in ((out, dtype), (fast, np.dtype(np.int16))):
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(t),
                                                         "fortran_order": False, "shape": (len(rows), dim)})
            offset = 0
            for batch in _row_groups(files):
                lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
                if hi > lo:
                    column = batch.column(0).combine_chunks().cast(vector)
                    values = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
                    block = np.ascontiguousarray(values[rows[lo:hi] - offset], dtype)
                    out.write(block.data)
                    fast.write(torch.from_numpy(block).to(torch.bfloat16).view(torch.int16).numpy().data)
                offset += batch.num_rows
        pq.write_table(light, os.path.join(tmp, "rows.parquet"))
        with open(os.path.join(tmp, "key.json"), "w") as f:
            json.dump(key, f)
        if os.path.exists(place):
            shutil.rmtree(place)
        os.replace(tmp, place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def as_tensor(rows: np.ndarray):
    """A block of the read-only memory map as a torch tensor (read, never written: torch's warning does not apply)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(rows))


def _blocks(matrix: np.ndarray, block: int):
    """(start, rows) of a matrix in blocks. A memory-mapped .npy is read into one reused buffer (the page cache
    keeps the file, the process does not: scanning a 2 GB sidecar costs one block of memory)."""
    if not isinstance(matrix, np.memmap) or matrix.filename is None:
        for start in range(0, len(matrix), block):
            yield start, matrix[start : start + block]
        return
    width = int(np.prod(matrix.shape[1:]))
    buf = np.empty((min(block, len(matrix)), width), matrix.dtype)
    with open(matrix.filename, "rb", buffering=0) as f:
        f.seek(matrix.offset)
        for start in range(0, len(matrix), block):
            n = min(block, len(matrix) - start)
            view = memoryview(buf[:n]).cast("B")
            got = 0
            while got < len(view):
                more = f.readinto(view[got:])
                if not more:
                    raise RunError(f"{matrix.filename} is shorter than its header says; delete it to rebuild it")
                got += more
            yield start, buf[:n]


def _scores(matrix: np.ndarray, q, block: int, bf16: bool) -> np.ndarray:
    """matrix @ q for every row, in blocks: float32 from the stored dtype, or bfloat16 from int16 bits."""
    import torch

    out = np.empty(len(matrix), np.float32)
    for start, rows in _blocks(matrix, block):
        part = as_tensor(rows)
        part = part.view(torch.bfloat16) if bf16 else part.float()
        out[start : start + len(part)] = (part @ q).float().numpy()
    return out


def top_k(matrix: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray | None = None,
          block: int = 1 << 16, fast: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact k best rows by dot product with a unit query: (indices, cosines), best first; `keep` masks
    rows out (path filters).

    With `fast` (the rows in bfloat16), a first pass scores every row in bfloat16 (about 9x faster on a CPU,
    memory-bound); then every row within 2 * FAST_ERROR of the k-th best approximate score is scored again in
    float32 from the stored vectors. Each approximate score is within FAST_ERROR of the exact one, so the k-th
    approximate score is at most FAST_ERROR above the k-th exact one, and every row of the true top k passes.
    """
    import torch

    q = torch.from_numpy(np.ascontiguousarray(query, np.float32))
    if fast is not None:
        approx = _scores(fast, q.to(torch.bfloat16), block, bf16=True)
    else:
        approx = _scores(matrix, q, block, bf16=False)
    if keep is not None:
        approx[~keep] = -np.inf
    if fast is not None:
        kth = np.partition(approx, len(approx) - k)[len(approx) - k] if len(approx) > k else -np.inf
        rows = np.flatnonzero((approx >= kth - 2 * FAST_ERROR) & np.isfinite(approx))
        exact = as_tensor(matrix[rows]).float() @ q
        scores = np.full(len(approx), -np.inf, np.float32)
        scores[rows] = exact.numpy()
        approx = scores
    pick = np.argpartition(-approx, k - 1)[:k] if len(approx) > k else np.arange(len(approx))
    order = np.lexsort((pick, -approx[pick]))
    best_i, best_s = pick[order], approx[pick][order]
    finite = np.isfinite(best_s)
    return best_i[finite], best_s[finite]
