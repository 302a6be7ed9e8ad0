"""Output: the Parquet schema, row groups and file metadata, atomic writes; JSON Lines to stdout."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .state import METADATA_KEY, write_atomic

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
        if self.pending:
            write_atomic(self.store.next_part(), [pa.Table.from_batches(self.pending, self.schema)], self.schema)
        self.pending, self.rows, self.last = [], 0, time.monotonic()

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
        for row in batch.to_pylist():
            self.stream.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()



def make_schema(fields: list[pa.Field], metadata: dict) -> pa.Schema:
    """The output schema, with the run's metadata (JSON under the key `siglip`)."""
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(path: str) -> dict:
    """The siglip metadata of an output file (or of any part of an output folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, sorted(n for n in os.listdir(path) if n.endswith(".parquet"))[-1])
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])
