"""Building an index's sidecar (see vectors.py): its current ok rows' vectors as stored and in int8, their paths,
sizes and resolutions, and the index's metadata, streamed a row group at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import RunError
from .index import pages
from .index.files import METADATA_KEY
from .index.layouts import _parts, is_file_output
from .vectors import column_scales, index_files, quantize

ROW_COLUMNS = ["path", "width", "height", "size"]


def _settings(index: str) -> tuple[dict, bool]:
    """The index's metadata and whether it holds embeddings (from its newest file's schema)."""
    files = index_files(index)
    if not files:
        raise RunError(f"{index} holds no siglip index")
    schema = pq.read_schema(files[-1])
    try:
        return json.loads(schema.metadata[METADATA_KEY]), "embedding" in schema.names
    except (KeyError, TypeError, ValueError):
        raise RunError(f"{index} was not written by siglip (no settings in its metadata)") from None


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
    keys = ["path"] if names.null_count == len(names) else ["path", "path_bytes"]  # one key hashes faster
    last = keyed.group_by(keys, use_threads=True).aggregate([("n", "max")]).column("n_max")
    rows = np.sort(last.to_numpy())
    if len(rows):
        rows = rows[pc.equal(light.column("status").take(pa.array(rows)), "ok").to_numpy(zero_copy_only=False)]
    return rows, light.take(pa.array(rows, pa.int64())).select(ROW_COLUMNS)


class _CopyInstead(Exception):
    """A page the sidecar cannot point into after all: build it again with a copy of the vectors."""


def _groups(files: list[str], rows: np.ndarray, vector: pa.DataType, paged: bool):
    """(lo, hi, vectors, quantized, where) for the kept rows[lo:hi] of each row group of the files, in order;
    read, selected and quantized by one thread per usable CPU a few groups ahead (reading and quantizing are
    the slow part of a build; memory: those few groups). The first group with rows sets the column scales of
    all. paged: the vectors are read from the pages (pages.py) and `where` is (file number, the group's page
    spans, each kept row's first value among the group's pages); else (pyarrow) `where` is None."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    from .config import usable_cpus

    dim, dtype = vector.list_size, np.dtype(vector.value_type.to_pandas_dtype())
    metadata = {f: pq.ParquetFile(f).metadata for f in files}

    def read(number: int, file: str, group: int, offset: int, count: int):
        lo, hi = np.searchsorted(rows, [offset, offset + count])
        if hi == lo:
            return lo, hi, None, None
        kept = rows[lo:hi] - offset
        if paged:
            try:
                present, matrix, spans = pages.read_vectors(file, metadata[file], group, "embedding", dim, dtype)
                if not present[kept].all():
                    raise pages.Unsupported("a kept row without a vector")
            except pages.Unsupported as e:
                raise _CopyInstead(str(e)) from None
            at = (np.cumsum(present) - 1)[kept]  # each kept row's place among the rows with a vector
            where = (number, spans, at * dim)
            if at[-1] - at[0] + 1 == len(at):  # every row of the span kept (the usual case): a view, not a copy
                return lo, hi, matrix[at[0] : at[-1] + 1], where
            return lo, hi, np.ascontiguousarray(matrix[at]), where
        table = pq.ParquetFile(file, pre_buffer=False).read_row_group(group, columns=["embedding"], use_threads=False)
        column = table.column(0).combine_chunks().cast(vector)
        child = column.values  # every row's dim slots (null rows' too), from the array's own offset
        flat = np.frombuffer(child.buffers()[1], dtype, count=len(child), offset=child.offset * dtype.itemsize)
        matrix = flat[column.offset * dim : (column.offset + len(column)) * dim].reshape(-1, dim)
        if kept[-1] - kept[0] + 1 == len(kept):
            return lo, hi, matrix[kept[0] : kept[-1] + 1], None
        return lo, hi, np.ascontiguousarray(matrix[kept]), None

    def work(*job):
        lo, hi, block, where = read(*job)
        return lo, hi, block, None if block is None else quantize(block, columns), where

    jobs, offset = [], 0
    for number, f in enumerate(files):
        meta = metadata[f]
        for g in range(meta.num_row_groups):
            jobs.append((number, f, g, offset, meta.row_group(g).num_rows))
            offset += meta.row_group(g).num_rows
    columns = None
    while jobs and columns is None:
        lo, hi, block, where = read(*jobs.pop(0))
        if block is not None:
            columns = column_scales(block[:: max(1, len(block) // 4096)])
        yield lo, hi, block, None if block is None else quantize(block, columns), where
    ahead = max(1, usable_cpus())
    with ThreadPoolExecutor(ahead) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.submit(work, *job))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _fill(tmp: str, files: list[str], rows: np.ndarray, vector: pa.DataType, paged: bool) -> None:
    """fast.npy, bounds.npy and columns.npy; and either vectors.npy (a copy of the vectors as stored) or, paged,
    where they lie in the index's own pages (pages.npy, starts.npy, pages.json: see vectors.Paged)."""
    dim, dtype = vector.list_size, np.dtype(vector.value_type.to_pandas_dtype())
    bounds, columns = np.zeros((len(rows), 2), np.float32), np.ones(dim, np.float32)
    spans, starts, base = [], np.zeros(len(rows), np.int64), 0
    with contextlib.ExitStack() as stack:
        outs = [(stack.enter_context(open(os.path.join(tmp, "fast.npy"), "wb")), np.dtype(np.int8))]
        if not paged:
            outs.append((stack.enter_context(open(os.path.join(tmp, "vectors.npy"), "wb")), dtype))
        for f, t in outs:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(t),
                                                     "fortran_order": False, "shape": (len(rows), dim)})
        for lo, hi, block, q, where in _groups(files, rows, vector, paged):
            if hi == lo:
                continue
            outs[0][0].write(q.values.data)
            if paged:
                number, group_spans, first = where
                counts = group_spans[:, -1]
                spans.append(np.column_stack([np.full(len(counts), number), group_spans, base + np.cumsum(counts) - counts]))
                starts[lo:hi], base = base + first, base + int(counts.sum())
            else:
                outs[1][0].write(block.data)
            bounds[lo:hi, 0], bounds[lo:hi, 1], columns = q.scale, q.error, q.columns
    np.save(os.path.join(tmp, "bounds.npy"), bounds)
    np.save(os.path.join(tmp, "columns.npy"), columns)
    if paged:
        np.save(os.path.join(tmp, "pages.npy"), np.concatenate(spans) if spans else np.zeros((0, 8), np.int64))
        np.save(os.path.join(tmp, "starts.npy"), starts)


def _readable(files: list[str], dtype: np.dtype, dim: int) -> bool:
    """Whether every file's vectors can be read from its pages later (pages.readable), and with one codec."""
    return all(pages.readable(pq.ParquetFile(f).metadata, "embedding", dtype, dim) for f in files)


def build(index: str, place: str, key: dict) -> None:
    """The sidecar of an index, streamed a row group at a time with plain writes (memory: a few row groups,
    whatever the index's size): fast.npy (int8; scales and error bounds in bounds.npy), the rows' paths and
    sizes, the metadata, and the vectors as stored: where the index's pages hold them plainly (as siglip
    writes them), where they lie there (a third of the bytes to write); else a copy, vectors.npy. The folder
    appears whole (renamed into place) or not at all."""
    meta, embeddings = _settings(index)
    if not embeddings:
        raise RunError(f"{index} holds no embeddings (made by `siglip {meta.get('task')}`); search an index "
                       "made by `siglip embed` or `siglip tag --with-embeddings`")
    files = _sources(index)
    rows, light = _current(files)
    vector = pq.read_schema(files[-1]).field("embedding").type
    dtype = np.dtype(vector.value_type.to_pandas_dtype())
    parent = os.path.dirname(place)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".vectors-", dir=parent)
    try:
        paged = _readable(files, dtype, vector.list_size)
        try:
            _fill(tmp, files, rows, vector, paged)
        except _CopyInstead:
            paged = False
            _fill(tmp, files, rows, vector, paged)
        if paged:
            where = os.path.realpath(index)
            names = ["" if f == index else os.path.relpath(os.path.realpath(f), where) for f in files]
            codecs = [pages.codec(pq.ParquetFile(f).metadata, "embedding") for f in files]
            with open(os.path.join(tmp, "pages.json"), "w") as f:
                json.dump({"files": names, "codecs": codecs, "dtype": dtype.name, "dim": vector.list_size}, f)
        _write_rows(light, tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(tmp, "key.json"), "w") as f:  # the last file: a folder with it is whole
            json.dump(key, f)
        if os.path.exists(place):
            shutil.rmtree(place)
        os.replace(tmp, place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_rows(light: pa.Table, folder: str) -> None:
    """paths.bin (the paths' UTF-8 bytes, one after another), ends.npy (where each ends), ints.npy (width,
    height and size; -1 for none): what vectors.Rows reads, without pyarrow."""
    paths = light.column("path").combine_chunks().cast(pa.large_string())
    n, ends = len(paths), np.zeros(len(paths) + 1, np.int64)
    with open(os.path.join(folder, "paths.bin"), "wb") as f:
        _, offsets, data = paths.buffers() if n else (None, None, None)
        if data is not None:
            ends = np.frombuffer(offsets, np.int64)[paths.offset : paths.offset + n + 1]
            f.write(memoryview(data)[ends[0] : ends[-1]])
    np.save(os.path.join(folder, "ends.npy"), ends[1:] - ends[0])
    ints = [light.column(c).fill_null(-1).to_numpy().astype(np.int64) for c in ("width", "height", "size")]
    np.save(os.path.join(folder, "ints.npy"), np.stack(ints, axis=1))
