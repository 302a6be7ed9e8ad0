"""Output: the Parquet schema, row groups and file metadata, atomic writes; JSON Lines to stdout."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ROW_GROUP_SIZE
from .errors import RunError

METADATA_KEY = b"siglip"

IMAGE_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]
TEXT_FIELDS = [
    pa.field("text", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
]


def vector_type(dim: int, float16: bool = False) -> pa.DataType:
    """fixed_size_list<float32>[dim], or float16 when asked."""
    return pa.list_(pa.float16() if float16 else pa.float32(), dim)


def scatter(field: pa.Field, values, ok: Sequence[int], n: int) -> pa.Array:
    """A column of n rows from the values of the ok rows; every other row is null."""
    if pa.types.is_fixed_size_list(field.type):
        values = np.asarray(values)
        full = np.zeros((n, field.type.list_size), dtype=field.type.value_type.to_pandas_dtype())
        mask = np.ones(n, dtype=bool)
        full[list(ok)] = values
        mask[list(ok)] = False
        return pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), type=field.type, mask=pa.array(mask))
    column = [None] * n
    for j, i in enumerate(ok):
        column[i] = values[j]
    return pa.array(column, type=field.type)


def check_writable(path: str) -> None:
    """Fail before any work (and before loading a model) when the output cannot be written."""
    if path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RunError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RunError(f"cannot write {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise RunError(f"cannot write {path}: it is a folder")


class ParquetSink:
    """Writes row groups to a temporary file as the run goes; close() renames it into place."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path = path
        self.schema = schema
        fd, self.tmp = tempfile.mkstemp(prefix=".siglip-", suffix=".parquet.tmp", dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffer a batch; a row group is written whenever ROW_GROUP_SIZE rows are buffered."""
        self.pending.append(batch)
        self.rows += batch.num_rows
        if self.rows >= ROW_GROUP_SIZE:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending, self.schema), row_group_size=max(self.rows, 1))
            self.pending, self.rows = [], 0

    def close(self) -> None:
        """Finish the file and move it into place in one rename: readers see the old file or the new one."""
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file: an interrupted run leaves the old output (if any) untouched."""
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


class JsonLinesSink:
    """One JSON object a line on stdout, flushed per batch so that a pipeline sees results as they come."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, batch: pa.RecordBatch) -> None:
        for row in batch.to_pylist():
            self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()

    def abort(self) -> None:
        self.close()


def open_sink(path: str, fields: list[pa.Field], metadata: dict):
    """A sink for the output path ('-' is JSON Lines on stdout) with the run's metadata in the schema."""
    schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    if path == "-":
        return JsonLinesSink(), schema
    return ParquetSink(path, schema), schema


def read_metadata(path: str) -> dict:
    """The siglip metadata of an output file."""
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])
