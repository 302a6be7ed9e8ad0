"""Files of an index: atomic writes, durable renames, one-line write errors, leftovers of killed runs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
from typing import TYPE_CHECKING, Iterable

from ..config import ROW_GROUP_SIZE
from ..errors import RunError
from ..scratch import destination, scratch

if TYPE_CHECKING:  # pyarrow is imported where it is used: reading a search's sidecar needs only the file names
    import pyarrow as pa

METADATA_KEY = b"siglip"


def file_hash(path: str) -> str | None:
    """sha256 of a file's content, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


HINTS = {
    errno.ENOSPC: "the disk is full; free some space and rerun (the run resumes where it stopped)",
    errno.EDQUOT: "the disk quota is used up; free some space and rerun (the run resumes where it stopped)",
    errno.EFBIG: "the file is too large for this file system or for the limit set by ulimit -f",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "its folder has vanished (an unmounted share?)",
}


def write_error(path: str, e: OSError) -> RunError:
    """A failed write as one line that names the output and the cause."""
    parent = os.path.dirname(os.path.abspath(path))
    if e.errno == errno.ENOENT and not os.path.isdir(parent):  # never made, or a share not mounted
        return RunError(f"cannot write {path}: folder {parent} does not exist (an unmounted share?)")
    cause = HINTS.get(e.errno) or (os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0])
    return RunError(f"cannot write {path}: {cause}")


@contextlib.contextmanager
def stdout_errors():
    """A write to stdout that fails (`> file` on a full disk, /dev/full) is one line, not a traceback; stdout is
    then pointed at /dev/null, so that the exit's own flush fails no second time. A closed pipe (`| head`) is
    the caller's: it ends quietly."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise RunError(f"cannot write stdout: {os.strerror(e.errno) if e.errno else e}") from None


def fsync_dir(folder: str) -> None:
    """Make a rename or an unlink in folder durable (a power loss keeps the new name or the old, not neither)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def remove_leftovers(folder: str, name: str) -> None:
    """Remove the temporary files (`.NAME.PID.tmp`) that runs of earlier versions, killed, left in folder for the
    files named by the regex `name` (the caller holds the output's lock, so no live run is writing them). Files
    are written in scratch folders now (scratch.py), which the next write beside them removes."""
    pattern = re.compile(r"\." + name + r"\.\d+\.tmp")
    try:
        for entry in os.listdir(folder):
            if pattern.fullmatch(entry):
                os.unlink(os.path.join(folder, entry))
    except OSError:
        pass


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaf columns worth a dictionary: all but floating point. Vectors and scores gain nothing from
    one (float16 has few enough values that Parquet keeps trying, and its dictionary pages decode 3-4x slower
    than plain ones: most of the time `search` takes to read an index)."""
    out: list[str] = []

    import pyarrow as pa

    def walk(name: str, t: pa.DataType) -> None:
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            walk(f"{name}.list.element", t.value_type)
        elif pa.types.is_struct(t):
            for f in t:
                walk(f"{name}.{f.name}", f.type)
        elif not pa.types.is_floating(t):
            out.append(name)

    for f in schema:
        walk(f.name, f.type)
    return out


def write_atomic(path: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
    """Write tables into one Parquet file under a temporary name, then rename it into place. Returns rows.

    A failure to write (a full disk, ulimit -f, a read-only or vanished folder) is a RunError naming the file
    and the cause, and leaves no temporary file behind.
    """
    import pyarrow.parquet as pq

    rows, path = 0, destination(path)
    try:
        with scratch(os.path.dirname(path) or ".") as folder:
            tmp = os.path.join(folder, os.path.basename(path))
            with pq.ParquetWriter(tmp, schema, use_dictionary=dictionary_columns(schema)) as writer:
                for table in tables:
                    if table.num_rows:
                        # a cast only where a type differs (pyarrow 15 cannot cast a fixed-size list with nulls)
                        if not table.schema.equals(schema, check_metadata=False):
                            table = table.cast(schema)
                        writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
                        rows += table.num_rows
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except OSError as e:
        raise write_error(path, e) from None
    return rows


def write_json(path: str, value) -> bool:
    """Write a small JSON file atomically (a cache: failing to write it only costs time). True when written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with scratch(os.path.dirname(path)) as folder:
            tmp = os.path.join(folder, "value.json")
            with open(tmp, "w") as f:
                json.dump(value, f)
            os.replace(tmp, path)
        return True
    except OSError:
        return False
