"""Reading an index as it is now: one row per file, whatever a running or killed run has left half done."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layouts import is_file_output, _parts


def read_index(path: str, columns: list[str] | None = None) -> pa.Table:
    """The current rows of an output folder or file: for a path with rows in several parts (a run still
    going, or killed before it tidied up), the row of the newest part.

    A single-file output is always consistent (it is replaced whole), so it is read as it is.
    """
    if is_file_output(path) or not os.path.isdir(path):
        return pq.read_table(path, columns=columns)
    parts = _parts(path)
    if not parts:
        raise FileNotFoundError(f"{path} holds no siglip parts")
    need = None if columns is None else list(dict.fromkeys(columns + ["path", "path_bytes"]))
    tables = [pq.read_table(p, columns=need) for p in parts]
    schema = tables[-1].schema
    table = pa.concat_tables([t.cast(schema) for t in tables])
    order = pa.array(range(table.num_rows), pa.int64())
    keyed = pa.table({"path": table.column("path"), "path_bytes": table.column("path_bytes"), "n": order})
    last = keyed.group_by(["path", "path_bytes"], use_threads=False).aggregate([("n", "max")])
    rows = pc.sort_indices(last.column("n_max"))
    current = table.take(pc.take(last.column("n_max"), rows))
    return current if columns is None else current.select(columns)
