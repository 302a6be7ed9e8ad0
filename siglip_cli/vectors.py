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
from .index.reader import read_index

SIDECAR_VERSION = 1
ROW_COLUMNS = ["path", "width", "height", "size"]


@dataclass
class Vectors:
    """An index's ok rows: vectors (n, D) memory-mapped, their rows, and the index's metadata."""

    matrix: np.ndarray
    rows: pa.Table
    meta: dict


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
    return Vectors(matrix, pq.read_table(os.path.join(place, "rows.parquet")), meta)


def _build(index: str, place: str, key: dict) -> None:
    table = read_index(index, ["path", "status", "embedding", "width", "height", "size"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim) if len(column) else np.zeros((0, dim))
    parent = os.path.dirname(place)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".vectors-", dir=parent)
    try:
        out = np.lib.format.open_memmap(os.path.join(tmp, "vectors.npy"), "w+", values.dtype, values.shape)
        for i in range(0, len(values), 1 << 16):
            out[i : i + (1 << 16)] = values[i : i + (1 << 16)]
        out.flush()
        del out
        pq.write_table(table.select(ROW_COLUMNS), os.path.join(tmp, "rows.parquet"))
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


def top_k(matrix: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray | None = None,
          block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """The exact k best rows by dot product with a unit query: (indices, cosines), best first. In float32
    blocks over the stored vectors (float16 or float32); `keep` masks rows out (path filters)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(query, np.float32))
    best_i, best_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start in range(0, len(matrix), block):
        part = as_tensor(matrix[start : start + block]).float()
        s = (part @ q).numpy()
        if keep is not None:
            s = np.where(keep[start : start + len(s)], s, -np.inf)
        if len(s) > k:
            pick = np.argpartition(-s, k - 1)[:k]
        else:
            pick = np.arange(len(s))
        best_i = np.concatenate([best_i, pick + start])
        best_s = np.concatenate([best_s, s[pick]])
        if len(best_s) > k:
            keep_top = np.argpartition(-best_s, k - 1)[:k]
            best_i, best_s = best_i[keep_top], best_s[keep_top]
    order = np.lexsort((best_i, -best_s))
    best_i, best_s = best_i[order], best_s[order]
    finite = np.isfinite(best_s)
    return best_i[finite], best_s[finite]
