"""What an output already holds: the lock, resume and incremental runs, and making it whole at the end.

An output is a list of Parquet *segments*, oldest first; when a path has rows in several, the newest wins.
- A folder (`-o library/`): the segments are `part-NNNNNNNN.parquet`; each run adds parts, and at the end
  rewrites (atomically, one by one) the older parts that hold rows it replaced or pruned.
- A file (`-o out.parquet`): segment 0 is the file, the others are parts staged in a hidden folder beside it;
  at the end everything is merged into a new file that is renamed over the old one.
Parts are written under a temporary name and renamed into place, so a killed run leaves whole parts only;
the next run counts their rows as done and finishes the job.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import ROW_GROUP_SIZE
from .errors import RunError
from .sources import FileRecord, stored_path

METADATA_KEY = b"siglip"
PART = re.compile(r"part-(\d{8})\.parquet")


def is_file_output(path: str) -> bool:
    """`-o x.parquet` is one file; anything else (but `-`) is a folder of parts."""
    return path.lower().endswith(".parquet") and not os.path.isdir(path)


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
    cause = HINTS.get(e.errno) or (os.strerror(e.errno) if e.errno else str(e).splitlines()[0])
    return RunError(f"cannot write {path}: {cause}")


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


def tmp_name(path: str) -> str:
    """The temporary name a file is written under before it is renamed into place."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def remove_leftovers(folder: str, name: str) -> None:
    """Remove the temporary files that killed runs left in folder for the files named by the regex `name`
    (the caller holds the output's lock, so no live run is writing them)."""
    pattern = re.compile(r"\." + name + r"\.\d+\.tmp")
    try:
        for entry in os.listdir(folder):
            if pattern.fullmatch(entry):
                os.unlink(os.path.join(folder, entry))
    except OSError:
        pass


def write_atomic(path: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
    """Write tables into one Parquet file under a temporary name, then rename it into place. Returns rows.

    A failure to write (a full disk, ulimit -f, a read-only or vanished folder) is a RunError naming the file
    and the cause, and leaves no temporary file behind.
    """
    tmp = tmp_name(path)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in tables:
                if table.num_rows:
                    writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_SIZE)
                    rows += table.num_rows
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    return rows


@dataclass
class Entry:
    """What the output holds for one path: where its newest row is and what the file looked like then."""

    segment: int
    size: int | None
    mtime_us: int | None
    sha256: str | None
    ok: bool


@dataclass
class Store:
    """A locked output and its state; see the module docstring for the layouts."""

    path: str
    signature: dict
    single: bool
    segments: list[str] = field(default_factory=list)
    entries: dict[str, Entry] = field(default_factory=dict)
    stale: dict[int, set[str]] = field(default_factory=dict)  # segment -> paths whose rows are superseded
    foreign: list[int] = field(default_factory=list)  # segments of another configuration (--overwrite)
    skipped: int = 0
    _lock: object = None

    # -- opening ------------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> str:
        if self.single:
            head, name = os.path.split(os.path.abspath(self.path))
            return os.path.join(head, f".{name}.parts")
        return self.path

    @property
    def lock_path(self) -> str:
        if self.single:
            head, name = os.path.split(os.path.abspath(self.path))
            return os.path.join(head, f".{name}.lock")
        return os.path.join(self.path, ".siglip.lock")

    @classmethod
    def open(cls, path: str, signature: dict, overwrite: bool = False, wait: bool = False) -> "Store":
        """Create the output folder if needed, take the lock, read what is there and check it fits this run."""
        store = cls(path, signature, is_file_output(path))
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise RunError(f"cannot write {path}: folder {parent} does not exist")
        try:
            if not store.single:
                os.makedirs(path, exist_ok=True)
            store._take_lock(wait)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            remove_leftovers(store.parts_dir, PART.pattern)
            if store.single:
                remove_leftovers(parent, re.escape(os.path.basename(path)))
            store._load(overwrite)
        except BaseException:
            store.close()
            raise
        return store

    def _take_lock(self, wait: bool) -> None:
        """An flock on a lock file: the kernel releases it when the holder dies, so a stale lock is no lock."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(
                    f"{self.path} is in use by another siglip run (pid {holder}, lock {self.lock_path}); "
                    "wait for it to finish, or pass --wait"
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would race with a waiting run)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _list_segments(self) -> list[str]:
        parts = []
        if os.path.isdir(self.parts_dir):
            parts = sorted(os.path.join(self.parts_dir, n) for n in os.listdir(self.parts_dir) if PART.fullmatch(n))
        return ([self.path] if self.single and os.path.exists(self.path) else []) + parts

    def _load(self, overwrite: bool) -> None:
        self.segments = self._list_segments()
        for i, seg in enumerate(self.segments):
            try:
                theirs = json.loads(pq.read_schema(seg).metadata[METADATA_KEY]).get("signature")
            except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
                raise RunError(f"{seg} is not a siglip output; move it away or choose another output") from None
            if theirs != self.signature:
                if not overwrite:
                    raise RunError(f"{self.path} was made with different settings ({_differences(theirs, self.signature)}); "
                                   "rerun with those settings, choose another output, or pass --overwrite to start afresh")
                self.foreign.append(i)
                continue
            table = pq.read_table(seg, columns=["path", "path_bytes", "status", "size", "mtime", "sha256"])
            paths = _paths(table)
            mtimes = pc.cast(table.column("mtime"), pa.int64()).to_pylist()
            for path, status, size, mtime, sha in zip(paths, table.column("status").to_pylist(),
                                                      table.column("size").to_pylist(), mtimes, table.column("sha256").to_pylist()):
                old = self.entries.get(path)
                if old is not None:  # a row a killed run replaced but did not get to remove
                    self.stale.setdefault(old.segment, set()).add(path)
                self.entries[path] = Entry(i, size, mtime, sha, status == "ok")

    # -- during the run -----------------------------------------------------------------------------
    def pending(self, records: Iterable[FileRecord], rehash: bool = False, retry_errors: bool = False) -> Iterator[FileRecord]:
        """The records that need work: new, changed, or (with retry_errors) failed before. Each path once."""
        seen: set[str] = set()
        for rec in records:
            if rec.path in seen:
                continue
            seen.add(rec.path)
            old = self.entries.get(rec.path)
            if old is not None and (old.ok or not retry_errors) and self._unchanged(old, rec, rehash):
                self.skipped += 1
                continue
            if old is not None:
                self.stale.setdefault(old.segment, set()).add(rec.path)
            yield rec

    @staticmethod
    def _unchanged(old: Entry, rec: FileRecord, rehash: bool) -> bool:
        if rehash and rec.error is None:
            return old.sha256 is not None and old.sha256 == file_hash(rec.path)
        mtime_us = None if rec.mtime_ns is None else rec.mtime_ns // 1000
        return (old.size, old.mtime_us) == (rec.size, mtime_us)  # (None, None) for a path that cannot be stat-ed

    def next_part(self) -> str:
        """The path of a new part, numbered after every part already there."""
        try:
            os.makedirs(self.parts_dir, exist_ok=True)
            numbers = [int(m.group(1)) for n in os.listdir(self.parts_dir) if (m := PART.fullmatch(n))]
        except OSError as e:
            raise write_error(self.path, e) from None
        return os.path.join(self.parts_dir, f"part-{max(numbers, default=-1) + 1:08d}.parquet")

    # -- at the end ---------------------------------------------------------------------------------
    def prune(self) -> int:
        """Mark the rows of files that no longer exist for removal; returns how many."""
        gone = [p for p in self.entries if not os.path.lexists(p)]
        for p in gone:
            self.stale.setdefault(self.entries[p].segment, set()).add(p)
        return len(gone)

    def finish(self) -> None:
        """Make the output whole: every path once, nothing of another configuration, one file if asked."""
        try:
            if self.single:
                self._merge()
                return
            for i, seg in enumerate(self.segments):
                if i in self.foreign:
                    os.unlink(seg)
                elif self.stale.get(i):
                    kept = _without(pq.read_table(seg), self.stale[i])
                    if kept.num_rows:
                        write_atomic(seg, [kept], kept.schema)
                    else:
                        os.unlink(seg)
            fsync_dir(self.path)
        except OSError as e:
            raise write_error(self.path, e) from None

    def _merge(self) -> None:
        parts = self._list_segments()[1 if os.path.exists(self.path) else 0:]
        if not parts and not self.stale and not self.foreign:
            return
        new_parts = [p for p in parts if p not in self.segments]
        sources = [(i, s) for i, s in enumerate(self.segments) if i not in self.foreign] + [(None, p) for p in new_parts]
        if not sources:
            os.unlink(self.path)
        else:
            schema = pq.read_schema(sources[-1][1])

            def tables():
                for i, seg in sources:
                    drop = self.stale.get(i, set()) if i is not None else set()
                    f = pq.ParquetFile(seg)
                    for g in range(f.num_row_groups):  # a row group at a time: memory stays bounded
                        yield _without(f.read_row_group(g), drop)

            write_atomic(self.path, tables(), schema)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def _paths(table: pa.Table) -> list[str]:
    """The OS paths of a table's rows (path_bytes where the name is not UTF-8)."""
    return [stored_path(p, b) for p, b in zip(table.column("path").to_pylist(), table.column("path_bytes").to_pylist())]


def _without(table: pa.Table, paths: set[str]) -> pa.Table:
    if not paths:
        return table
    return table.filter(pa.array([p not in paths for p in _paths(table)]))


def _differences(theirs: dict | None, ours: dict) -> str:
    if not theirs:
        return "no settings recorded"
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in keys)
