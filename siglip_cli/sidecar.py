"""Building an index's sidecar (see vectors.py): its current ok rows' vectors as stored and in int8, their paths,
sizes and resolutions, and the index's metadata, streamed a row group at a time."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import RunError, first_line
from .index import pages
from .index.files import METADATA_KEY
from .index.layouts import index_files, is_file_output, part_files
from .quantized import column_scales, quantize
from .scratch import scratch

ROW_COLUMNS = ["path", "width", "height", "size"]


def _settings(index: str) -> tuple[dict, bool]:
    """The index's metadata and whether it holds embeddings (from its newest file's schema)."""
    files = index_files(index)
    if not files:
        raise RunError(f"{index} holds no siglip index")
    try:
        schema = pq.read_schema(files[-1])
    except pa.ArrowException:
        where = "" if files[-1] == index else f"{files[-1]}: "
        raise RunError(f"{index} is not a siglip index ({where}not a Parquet file, or one cut short)") from None
    try:
        return json.loads(schema.metadata[METADATA_KEY]), "embedding" in schema.names
    except (KeyError, TypeError, ValueError):
        raise RunError(f"{index} was not written by siglip (no settings in its metadata)") from None


def _sources(index: str) -> list[str]:
    """The files holding the index's current rows, oldest first (reader.read_index's rules: parts of other
    settings than the newest are left out)."""
    from .index.reader import schema_signature

    if is_file_output(index) or not os.path.isdir(index):
        return [index]
    parts, newest = [], None
    for part in reversed(part_files(index)):
        try:
            sig = schema_signature(pq.read_schema(part))
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


def _int64(values: np.ndarray) -> pa.Array:
    """An Arrow int64 array over numpy's buffer (pa.array of a numpy array imports pandas: 0.7 s)."""
    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _codes(column) -> np.ndarray:
    """A number per distinct value (-1 for null), as int64."""
    if pa.types.is_string(column.type) or pa.types.is_binary(column.type):  # offsets past 2 GB when combined
        column = column.cast(pa.large_binary())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    indices = pc.dictionary_encode(column).indices
    return indices.fill_null(-1).to_numpy().astype(np.int64)


def _current(files: list[str]) -> tuple[np.ndarray, pa.Table]:
    """Row numbers (across the files, in order) of each path's newest ok row, and those rows' small columns."""
    # ParquetFile, not read_table: that imports pyarrow.dataset, and with it pandas (0.7 s)
    light = pa.concat_tables([pq.ParquetFile(f).read(columns=ROW_COLUMNS + ["status"]) for f in files])
    names = pa.concat_arrays([c for f in files for c in _path_bytes(f).chunks]) if files else pa.array([], pa.binary())
    key = _codes(light.column("path"))
    if names.null_count < len(names):  # names that are not UTF-8 (rare) are told apart by their bytes
        exact = _codes(names) + 1  # 0 for null
        key = key * (int(exact.max(initial=0)) + 1) + exact
    # each key's last row: its first in reverse (a stable sort; Arrow's group_by would import pandas, 0.7 s)
    _, first = np.unique(key[::-1], return_index=True)
    rows = np.sort(len(key) - 1 - first)
    if len(rows):
        rows = rows[pc.equal(light.column("status").take(_int64(rows)), "ok").to_numpy(zero_copy_only=False)]
    taken = _int64(rows)
    return rows, light.take(taken).select(ROW_COLUMNS).append_column("path_bytes", names.take(taken))


def _groups(files: list[str], rows: np.ndarray, vector: pa.DataType):
    """(lo, hi, vectors, quantized) for the kept rows[lo:hi] of each row group of the files, in order; read,
    selected and quantized by one thread per usable CPU a few groups ahead (Parquet's list decoding and the
    quantization are the slow part of a build; memory: those few groups). The first group with rows sets the
    column scales of all."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    from .config import usable_cpus

    dim, dtype = vector.list_size, np.dtype(vector.value_type.to_pandas_dtype())

    metadata = {f: pq.ParquetFile(f).metadata for f in files}

    def read(file: str, group: int, offset: int, count: int):
        lo, hi = np.searchsorted(rows, [offset, offset + count])
        if hi == lo:
            return lo, hi, None
        try:  # straight from the pages (a third of the time, or less), where they are as siglip writes them
            present, matrix = pages.read_vectors(file, metadata[file], group, "embedding", dim, dtype)
            if not present[rows[lo:hi] - offset].all():
                raise pages.Unsupported("a kept row without a vector")
            at = np.cumsum(present) - 1  # each row's place among the rows with a vector
            a, b = at[rows[lo] - offset], at[rows[hi - 1] - offset] + 1
            if b - a == hi - lo:
                return lo, hi, matrix[a:b]
            return lo, hi, np.ascontiguousarray(matrix[at[rows[lo:hi] - offset]])
        except pages.Unsupported:
            pass
        table = pq.ParquetFile(file, pre_buffer=False).read_row_group(group, columns=["embedding"], use_threads=False)
        column = table.column(0).combine_chunks().cast(vector)
        child = column.values  # every row's dim slots (null rows' too), from the array's own offset
        flat = np.frombuffer(child.buffers()[1], dtype, count=len(child), offset=child.offset * dtype.itemsize)
        matrix = flat[column.offset * dim : (column.offset + len(column)) * dim].reshape(-1, dim)
        a, b = rows[lo] - offset, rows[hi - 1] - offset + 1
        if b - a == hi - lo:  # every row of the span kept (the usual case): a view, not a copy (0.3 s a group)
            return lo, hi, matrix[a:b]
        return lo, hi, np.ascontiguousarray(matrix[rows[lo:hi] - offset])

    def work(*job):
        lo, hi, block = read(*job)
        return lo, hi, block, None if block is None else quantize(block, columns)

    jobs, offset = [], 0
    for f in files:
        meta = metadata[f]
        for g in range(meta.num_row_groups):
            jobs.append((f, g, offset, meta.row_group(g).num_rows))
            offset += meta.row_group(g).num_rows
    columns = None
    while jobs and columns is None:
        lo, hi, block = read(*jobs.pop(0))
        if block is not None:
            columns = column_scales(block[:: max(1, len(block) // 4096)])
        yield lo, hi, block, None if block is None else quantize(block, columns)
    ahead = max(1, usable_cpus())
    with ThreadPoolExecutor(ahead) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.submit(work, *job))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build(index: str, place: str, key: dict) -> None:
    """Stream the current rows' vectors into vectors.npy (as stored) and fast.npy (int8; scales and error bounds
    in bounds.npy), a row group at a time, with plain writes: memory stays at a few row groups whatever the
    index's size. The folder appears whole (renamed into place) or not at all. An index file that Arrow cannot
    read (cut short, not Parquet) is one line."""
    try:
        _build(index, place, key)
    except pa.ArrowException as e:
        first = first_line(e)
        raise RunError(f"cannot read the index {index}: {first}") from None


def _build(index: str, place: str, key: dict) -> None:
    meta, embeddings = _settings(index)
    if not embeddings:
        raise RunError(
            f"{index} holds no embeddings (made by `siglip {meta.get('task')}`); search an index "
            "made by `siglip embed` or `siglip tag --with-embeddings`"
        )
    files = _sources(index)
    rows, light = _current(files)
    vector = pq.read_schema(files[-1]).field("embedding").type
    if not pa.types.is_fixed_size_list(vector) or not pa.types.is_floating(vector.value_type):
        raise RunError(
            f"{index}: its embedding column is {vector}, not the fixed-size list of floats siglip writes "
            "(rewritten by another tool?); rebuild it with `siglip embed ... --overwrite`"
        )
    dim, dtype = vector.list_size, np.dtype(vector.value_type.to_pandas_dtype())
    parent = os.path.dirname(place)
    os.makedirs(parent, exist_ok=True)  # beside the index (there already) or in the cache
    with scratch(parent) as work:
        tmp = os.path.join(work, "vectors")
        os.mkdir(tmp)
        bounds, columns = np.zeros((len(rows), 2), np.float32), np.ones(dim, np.float32)
        with open(os.path.join(tmp, "vectors.npy"), "wb") as out, open(os.path.join(tmp, "fast.npy"), "wb") as fast:
            for f, t in ((out, dtype), (fast, np.dtype(np.int8))):
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(t), "fortran_order": False, "shape": (len(rows), dim)}
                )
            for lo, hi, block, q in _groups(files, rows, vector):
                if hi > lo:
                    out.write(block.data)
                    fast.write(q.values.data)
                    bounds[lo:hi, 0], bounds[lo:hi, 1], columns = q.scale, q.error, q.columns
        np.save(os.path.join(tmp, "bounds.npy"), bounds)
        np.save(os.path.join(tmp, "columns.npy"), columns)
        _write_rows(light, tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(tmp, "key.json"), "w") as f:  # the last file: a folder with it is whole
            json.dump(key, f)
        if os.path.exists(place):
            shutil.rmtree(place)
        os.replace(tmp, place)


def _write_rows(light: pa.Table, folder: str) -> None:
    """paths.bin (the paths' exact bytes, one after another: path_bytes where the name is not UTF-8), ends.npy
    (where each ends), ints.npy (width, height and size; -1 for none): what vectors.Rows reads, without pyarrow."""
    exact = light.column("path_bytes").combine_chunks().cast(pa.large_binary())
    paths = pc.if_else(pc.is_null(exact), light.column("path").combine_chunks().cast(pa.large_binary()), exact)
    n, ends = len(paths), np.zeros(len(paths) + 1, np.int64)
    with open(os.path.join(folder, "paths.bin"), "wb") as f:
        _, offsets, data = paths.buffers() if n else (None, None, None)
        if data is not None:
            ends = np.frombuffer(offsets, np.int64)[paths.offset : paths.offset + n + 1]
            f.write(memoryview(data)[ends[0] : ends[-1]])
    np.save(os.path.join(folder, "ends.npy"), ends[1:] - ends[0])
    ints = [light.column(c).fill_null(-1).to_numpy().astype(np.int64) for c in ("width", "height", "size")]
    np.save(os.path.join(folder, "ints.npy"), np.stack(ints, axis=1))
