"""Reading an index as it is now: one row per file, whatever a running or killed run has left half done."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import METADATA_KEY
from .layouts import is_file_output, part_files


def schema_signature(schema: pa.Schema):
    """The settings a part was made with: parts of other settings do not belong with the newest."""
    try:
        return json.loads(schema.metadata[METADATA_KEY]).get("signature")
    except (KeyError, TypeError, ValueError):
        return None


def read_index(path: str, columns: list[str] | None = None) -> pa.Table:
    """The current rows of an output folder or file: for a path with rows in several parts (a run still
    going, or killed before it tidied up), the row of the newest part.

    A single-file output is always consistent (it is replaced whole), so it is read as it is.
    """
    if is_file_output(path) or not os.path.isdir(path):
        return pq.read_table(path, columns=columns)
    tables = []
    for part in reversed(part_files(path)):  # newest first: it decides the settings that count
        try:
            schema = pq.read_schema(part)
            if tables and schema_signature(schema) != tables[0][1]:
                continue  # a part of other settings, left by a rebuild (--overwrite) still going or killed
            if "path" not in schema.names:  # a text output: rewritten whole, its newest part is all of it
                return pq.read_table(part, columns=columns)
            need = None if columns is None else list(dict.fromkeys(columns + ["path", "path_bytes"]))
            tables.append((pq.read_table(part, columns=need), schema_signature(schema)))
        except FileNotFoundError:  # removed by a run finishing meanwhile: it held only superseded rows
            continue
    if not tables:
        raise FileNotFoundError(f"{path} holds no siglip parts")
    tables = [t for t, _ in reversed(tables)]
    schema = tables[-1].schema
    table = pa.concat_tables([t if t.schema.equals(schema, check_metadata=False) else t.cast(schema) for t in tables])
    order = pa.array(range(table.num_rows), pa.int64())
    keyed = pa.table({"path": table.column("path"), "path_bytes": table.column("path_bytes"), "n": order})
    last = keyed.group_by(["path", "path_bytes"], use_threads=False).aggregate([("n", "max")])
    rows = pc.sort_indices(last.column("n_max"))
    current = table.take(pc.take(last.column("n_max"), rows))
    return current if columns is None else current.select(columns)
