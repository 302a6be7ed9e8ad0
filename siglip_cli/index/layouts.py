"""The two ways an output is laid out on disk, behind one small interface.

An output is a list of Parquet *segments*, oldest first; when a path has rows in several, the newest wins.
- `FolderLayout` (`-o library/`): the segments are `part-NNNNNNNN.parquet`. A run adds parts; at the end it
  rewrites (atomically, one by one) the older parts that hold rows it replaced or pruned. Readers that apply
  "newest part wins" (`read_index`) see consistent rows at every moment, even after a kill.
- `FileLayout` (`-o out.parquet`): segment 0 is the file, the others are parts staged in a hidden folder
  beside it; at the end everything is merged into a new file renamed over the old one, so readers of the file
  see the old rows or the new, never a mix.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import TYPE_CHECKING, Iterator

from ..scratch import destination
from .files import fsync_dir, remove_leftovers, write_atomic, write_error

if TYPE_CHECKING:
    import pyarrow as pa

PART = re.compile(r"part-(\d{8})\.parquet")


def is_file_output(path: str) -> bool:
    """`-o x.parquet` is one file; anything else (but `-`) is a folder of parts."""
    return path.lower().endswith(".parquet") and not os.path.isdir(path)


def part_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if PART.fullmatch(n))


def index_files(index: str) -> list[str]:
    """An index's files: itself, or its folder's parts."""
    return [index] if is_file_output(index) or not os.path.isdir(index) else part_files(index)


def state(index: str) -> list:
    """What identifies an index's contents now: its files' names, sizes and times (OSError where it is gone)."""
    out = []
    for f in index_files(index):
        st = os.stat(f)
        out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return out


class FolderLayout:
    """A folder of part files (see the module docstring)."""

    def __init__(self, path: str):
        self.path = self.parts_dir = path
        self.lock_path = os.path.join(path, ".siglip.lock")

    def prepare(self) -> None:
        """Create the folder (before the lock can be taken in it)."""
        os.makedirs(self.path, exist_ok=True)

    def clean(self) -> None:
        """Remove what killed runs left half-written (the caller holds the lock)."""
        remove_leftovers(self.parts_dir, PART.pattern)

    def segments(self) -> list[str]:
        return part_files(self.parts_dir)

    def next_part(self) -> str:
        """The path of a new part, numbered after every part already there."""
        try:
            if not os.path.isdir(self.parts_dir):
                if self.parts_dir == self.path:  # the output folder, made at the start, is gone: never made again
                    raise FileNotFoundError(errno.ENOENT, "vanished", self.path)
                os.mkdir(self.parts_dir)  # a file's staging folder, beside it (mkdir: not if the folder is gone)
            numbers = [int(m.group(1)) for n in os.listdir(self.parts_dir) if (m := PART.fullmatch(n))]
        except OSError as e:
            raise write_error(self.path, e) from None
        return os.path.join(self.parts_dir, f"part-{max(numbers, default=-1) + 1:08d}.parquet")

    def finish(self, segments: list[str], drop: dict[int, set], foreign: set[int], keep) -> None:
        """Drop the rows `keep(table, drop[i])` removes from each old segment, and the foreign segments."""
        import pyarrow.parquet as pq

        try:
            for i, seg in enumerate(segments):
                if i in foreign:
                    os.unlink(seg)
                elif drop.get(i):
                    kept = keep(pq.read_table(seg), drop[i])
                    if kept.num_rows:
                        write_atomic(seg, [kept], kept.schema)
                    else:
                        os.unlink(seg)
            fsync_dir(self.path)
        except OSError as e:
            raise write_error(self.path, e) from None

    def replace(self, table: pa.Table) -> None:
        """Make the output hold exactly this table (a text output is rewritten whole)."""
        old = self.segments()
        write_atomic(self.next_part(), [table], table.schema)
        try:
            for seg in old:
                os.unlink(seg)
            fsync_dir(self.path)
        except OSError as e:
            raise write_error(self.path, e) from None


class FileLayout:
    """One Parquet file, with the parts of a run staged in a hidden folder beside it."""

    def __init__(self, path: str):
        self.path = path = destination(path)  # through a symlink: the file it names, locked as that file
        head, name = os.path.split(os.path.abspath(path))
        self.folder, self.name = head, name
        self.parts_dir = os.path.join(head, f".{name}.parts")
        self.lock_path = os.path.join(head, f".{name}.lock")

    def prepare(self) -> None:
        pass

    def clean(self) -> None:
        remove_leftovers(self.parts_dir, PART.pattern)
        remove_leftovers(self.folder, re.escape(self.name))  # a merge cut short

    def segments(self) -> list[str]:
        return ([self.path] if os.path.exists(self.path) else []) + part_files(self.parts_dir)

    next_part = FolderLayout.next_part

    def finish(self, segments: list[str], drop: dict[int, set], foreign: set[int], keep) -> None:
        """Merge the old file (less dropped rows) and every part into a new file, renamed over the old."""
        try:
            self._merge(segments, drop, foreign, keep)
        except OSError as e:
            raise write_error(self.path, e) from None

    def _merge(self, segments: list[str], drop: dict[int, set], foreign: set[int], keep) -> None:
        import pyarrow.parquet as pq

        current = self.segments()
        if current == segments[:1] and not drop and not foreign:
            return  # nothing new, nothing to drop
        sources = [(i, s) for i, s in enumerate(segments) if i not in foreign]
        sources += [(None, p) for p in current if p not in segments]
        if not sources:
            if os.path.exists(self.path):
                os.unlink(self.path)
        else:
            schema = pq.read_schema(sources[-1][1])

            def tables() -> Iterator[pa.Table]:
                for i, seg in sources:
                    f = pq.ParquetFile(seg)
                    for g in range(f.num_row_groups):  # a row group at a time: memory stays bounded
                        yield keep(f.read_row_group(g), drop.get(i, set()) if i is not None else set())

            write_atomic(self.path, tables(), schema)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def replace(self, table: pa.Table) -> None:
        write_atomic(self.path, [table], table.schema)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def layout_for(path: str):
    """The layout an output path asks for."""
    return FileLayout(path) if is_file_output(path) else FolderLayout(path)
