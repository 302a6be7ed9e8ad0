"""Output: the Parquet schema, row groups and file metadata, atomic writes; JSON Lines to stdout."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .decode import Decoded
from .index import METADATA_KEY, write_atomic
from .index.files import stdout_errors
from .sources import FileRecord, display_path

# A part file is written at least this often, so a killed run redoes at most this much work.
FLUSH_ROWS = int(os.environ.get("SIGLIP_FLUSH_ROWS", 4096))
FLUSH_SECONDS = float(os.environ.get("SIGLIP_FLUSH_SECONDS", 60))

IMAGE_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("size", pa.int64()),
    pa.field("mtime", pa.timestamp("us", tz="UTC")),
    pa.field("sha256", pa.string()),
    pa.field("path_bytes", pa.binary()),  # the exact name, only when it is not valid UTF-8
]
TEXT_FIELDS = [
    pa.field("text", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
]


def vector_type(dim: int, float16: bool = False) -> pa.DataType:
    """fixed_size_list<float32>[dim], or float16 when asked."""
    return pa.list_(pa.float16() if float16 else pa.float32(), dim)


def to_arrow(type_: pa.DataType, values) -> pa.Array:
    """Column values (a pyarrow array, a numpy array or a list) as a pyarrow array of the given type."""
    if isinstance(values, pa.Array):
        return values
    if pa.types.is_fixed_size_list(type_):
        flat = np.ascontiguousarray(values, dtype=type_.value_type.to_pandas_dtype()).ravel()
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), type=type_)
    return pa.array(values, type=type_)


def scatter(field: pa.Field, values, ok: Sequence[int], n: int) -> pa.Array:
    """A column of n rows from the values of the ok rows (in order); every other row is null."""
    column = to_arrow(field.type, values)
    if len(ok) == n:
        return column
    where = [None] * n
    for j, i in enumerate(ok):
        where[i] = j
    return column.take(pa.array(where, pa.int32()))  # a null index gives a null row


def _fits(value: int | None, bits: int, signed: bool = False) -> int | None:
    """A size (never negative) or a time (before 1970 is negative) read from a file, or None when it is unknown
    or out of the column's range (a lying header)."""
    low = -(1 << (bits - 1)) if signed else 0
    return value if value is not None and low <= value < 1 << (bits - 1) else None


def utf8(text: str | None) -> str | None:
    """Text that Arrow can store: lone surrogates (from odd file names in messages) become U+FFFD."""
    if text is None:
        return None
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the name's bytes, shown as display_path does
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def _common(items: list) -> list[pa.Array]:
    """The columns every image row has, from the decoded items; raises on a value that cannot be stored."""
    recs = [d.record for d in items]
    shown, raw = zip(*(display_path(r.path) for r in recs))
    mtimes = [None if r.mtime_ns is None else _fits(r.mtime_ns // 1000, 64, signed=True) for r in recs]
    return [
        pa.array(shown, pa.string()),
        pa.array(["error" if d.error else "ok" for d in items], pa.string()),
        pa.array([utf8(d.error) for d in items], pa.string()),
        pa.array([_fits(d.width, 32) for d in items], pa.int32()),
        pa.array([_fits(d.height, 32) for d in items], pa.int32()),
        pa.array([_fits(r.size, 64) for r in recs], pa.int64()),
        pa.array(mtimes, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        pa.array([d.sha256 for d in items], pa.string()),
        pa.array(raw, pa.binary()),
    ]


def image_rows(schema: pa.Schema, items: list, ok: Sequence[int], payload: dict) -> pa.RecordBatch:
    """One row per decoded item, in order: the common columns, then the task's (payload: values of the ok
    items, in order; null on error).

    A file whose values cannot be stored (a bug, or a value no check foresaw) costs that file an error row
    with its path, never the batch.
    """
    try:
        common = _common(items)
    except Exception:
        items = list(items)
        for i, d in enumerate(items):
            try:
                _common([d])
            except Exception as e:
                error = f"cannot record this file: {type(e).__name__}: {e}"
                # of what came from the file, its size and time if they can be kept (a rerun then sees it unchanged,
                # and does not load the model to fail it again), else only the path
                for rec in (d.record, FileRecord(d.record.path)):
                    items[i] = dataclasses.replace(d, record=rec, width=-1, height=-1, sha256=None, error=error)
                    try:
                        _common([items[i]])
                        break
                    except Exception:
                        pass
        common = _common(items)
    n = len(items)
    rest = [scatter(f, payload[f.name], ok, n) if payload else pa.nulls(n, f.type) for f in list(schema)[len(common) :]]
    if payload and any(items[i].error for i in ok):  # encoded, but its row could not be recorded
        keep = pa.array([None if d.error else i for i, d in enumerate(items)], pa.int32())
        rest = [c.take(keep) for c in rest]
    return pa.RecordBatch.from_arrays(common + rest, schema=schema)


def copy_rows(table: pa.Table, rows: list[int], records: list[FileRecord]) -> pa.Table:
    """Rows of a segment, given to other files with the same content (moves): new path, size and mtime."""
    taken = table.take(pa.array(rows, pa.int64()))
    recs = [FileRecord(r.path, r.size, r.mtime_ns) for r in records]
    fresh = dict(zip([f.name for f in IMAGE_FIELDS], _common([Decoded(r) for r in recs])))
    for name in ("path", "path_bytes", "size", "mtime"):
        taken = taken.set_column(taken.schema.get_field_index(name), taken.schema.field(name), fresh[name])
    return taken


class PartSink:
    """Buffers rows and writes them as whole part files of the output store, atomically, as the run goes.

    A part is written every `flush_rows` rows or `flush_seconds` seconds, whichever comes first, so that a
    killed run loses at most that much work.
    """

    def __init__(self, store, schema: pa.Schema, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS):
        self.store, self.schema = store, schema
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0
        self.last = time.monotonic()

    def write(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.rows += batch.num_rows
        if self.rows >= self.flush_rows or time.monotonic() - self.last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        pending, self.pending, self.rows, self.last = self.pending, [], 0, time.monotonic()
        if pending:  # taken first: after a failed write, closing the sink does not try again
            write_atomic(self.store.next_part(), [pa.Table.from_batches(pending, self.schema)], self.schema)

    def close(self) -> None:
        self.flush()


def _json_default(value) -> str:
    if isinstance(value, bytes):  # path_bytes
        return base64.b64encode(value).decode()
    return value.isoformat()  # the mtime column's datetimes


class JsonLinesSink:
    """One JSON object a line on stdout, flushed per batch so that a pipeline sees results as they come."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, batch) -> None:
        with stdout_errors():
            for row in batch.to_pylist():
                self.stream.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            self.stream.flush()

    def close(self) -> None:
        with stdout_errors():
            self.stream.flush()


def make_schema(fields: list[pa.Field], metadata: dict) -> pa.Schema:
    """The output schema, with the run's metadata (JSON under the key `siglip`)."""
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(path: str) -> dict:
    """The siglip metadata of an output file (or of any part of an output folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, sorted(n for n in os.listdir(path) if n.endswith(".parquet"))[-1])
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])
