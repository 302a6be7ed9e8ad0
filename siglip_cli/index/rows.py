"""The index proper: which rows an output holds, keyed by canonical path; what a run must do; moves; prune."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import RunError
from ..sources import FileRecord, stored_path
from .files import file_hash

COLUMNS = ["path", "path_bytes", "status", "error", "width", "height", "size", "mtime", "sha256"]


@dataclass(slots=True)  # one per row of the index: millions
class Entry:
    """What the output holds for one path: where its newest row is and what the file looked like then."""

    segment: int
    size: int | None
    mtime_us: int | None
    sha256: str | None
    ok: bool
    error: str | None = None
    pixels: int | None = None  # of an error row, when the file's size was read


@dataclass(frozen=True)
class Root:
    """A folder given on the command line: the rows under it are this run's to prune."""

    given: str  # as typed, for messages
    key: str  # canonical
    exists: bool


@dataclass(frozen=True)
class Move:
    """A new path whose content is already in the index under another path: its row is copied, not redone."""

    record: FileRecord
    source: str  # the path whose row holds the results
    segment: int


def paths_of(table: pa.Table) -> list[str]:
    """The OS paths of a table's rows (path_bytes where the name is not UTF-8)."""
    return [stored_path(p, b) for p, b in zip(table.column("path").to_pylist(), table.column("path_bytes").to_pylist())]


def without(table: pa.Table, paths: set) -> pa.Table:
    """The table less the rows of the given paths."""
    if not paths:
        return table
    return table.filter(pa.array([p not in paths for p in paths_of(table)]))


def under(path: str, root: str) -> bool:
    """Whether path is root or inside it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class Index:
    """Rows by canonical path, newest segment winning; what is stale (superseded or pruned) per segment."""

    entries: dict[str, Entry] = field(default_factory=dict)
    stale: dict[int, set[str]] = field(default_factory=dict)
    content: dict[tuple[int, str], tuple[str, int]] = field(default_factory=dict)  # (size, sha256) -> a good row
    sizes: set[int] = field(default_factory=set)
    moves: list[Move] = field(default_factory=list)
    skipped: int = 0
    absent: int = 0  # files with a good row that are not there now, or cannot be checked: their rows are kept
    seen: dict[str, int] = field(default_factory=dict)  # files met this run under each root

    def add(self, segment: int, table: pa.Table) -> None:
        """Take in one segment's rows (segments in order, oldest first)."""
        # in microseconds whatever unit the column was written in (another tool may have rewritten it in ns: every
        # file then looked changed)
        mtimes = pc.cast(pc.cast(table.column("mtime"), pa.timestamp("us", tz="UTC")), pa.int64()).to_pylist()
        failures = {}  # row -> (message, width, height) of the error rows
        if table.column("error").null_count < len(table):
            rows = np.flatnonzero(pc.is_valid(table.column("error")).to_numpy(zero_copy_only=False))
            failures = dict(
                zip(rows.tolist(), zip(*(table.column(c).take(rows).to_pylist() for c in ("error", "width", "height"))))
            )
        for i, (path, status, size, mtime, sha) in enumerate(
            zip(
                paths_of(table),
                table.column("status").to_pylist(),
                table.column("size").to_pylist(),
                mtimes,
                table.column("sha256").to_pylist(),
            )
        ):
            old = self.entries.get(path)
            # a row a killed run replaced but did not get to remove; not one of the same segment (a file another
            # tool wrote a path twice into): removing "the old row" there removed both, and the path's row was lost
            if old is not None and old.segment != segment:
                self.stale.setdefault(old.segment, set()).add(path)
            entry = self.entries[path] = Entry(segment, size, mtime, sha, status == "ok")
            if i in failures:
                entry.error, w, h = failures[i]
                entry.pixels = w * h if w and h and w > 0 and h > 0 else None
            if status == "ok" and size is not None and sha:
                self.content[(size, sha)] = (path, segment)  # that row, in that segment, holds this content
                self.sizes.add(size)

    # -- during the run -----------------------------------------------------------------------------
    def pending(
        self,
        records: Iterable[FileRecord],
        roots: list[Root],
        rehash: bool = False,
        retry: Callable[[str, Entry], bool] = lambda path, entry: False,
    ) -> Iterator[FileRecord]:
        """The records that need work: new, changed, or failed before and `retry(path, entry)` says to try again
        (a record that fails now as its row did, say a folder still unreadable, is not). Each path once.

        A new file whose size and content hash match a good row is a move: collected in `moves`, not yielded.
        """
        done: set[str] = set()
        for rec in records:
            if rec.path in done:
                continue
            done.add(rec.path)
            for root in roots:
                if rec.error is None and under(rec.path, root.key):  # an unreadable root is not a seen one
                    self.seen[root.key] = self.seen.get(root.key, 0) + 1
            old = self.entries.get(rec.path)
            if old is not None and old.ok and rec.error is not None:  # a listed file on a share not mounted, say:
                self.absent += 1  # its row stays, as --prune would keep it (an error row would replace it)
                continue
            if old is None:
                if (move := self._move(rec)) is not None:
                    self.moves.append(move)
                    continue
            elif _unchanged(old, rec, rehash) and (old.ok or rec.error == old.error or not retry(rec.path, old)):
                self.skipped += 1
                continue
            else:
                self.stale.setdefault(old.segment, set()).add(rec.path)
            yield rec
        for path, old in self.entries.items():  # a folder that could not be listed then, walked now: its files
            if not old.ok and path not in done and any(under(path, r.key) for r in roots) and _listable(path):
                self.stale.setdefault(old.segment, set()).add(path)  # have rows of their own

    def _move(self, rec: FileRecord) -> Move | None:
        if rec.error or rec.size not in self.sizes:
            return None  # no good row of that size: no hash to compute
        found = self.content.get((rec.size, file_hash(rec.path)))
        if found is None or found[0] == rec.path:
            return None
        return Move(rec, *found)

    # -- at the end ---------------------------------------------------------------------------------
    def check_roots(self, roots: list[Root]) -> None:
        """Refuse to prune under a root that is missing, or that this run found empty, while rows live there."""
        for root in roots:
            if self.seen.get(root.key, 0) and root.exists:
                continue
            held = sum(1 for p in self.entries if under(p, root.key))
            if held:
                state = "is missing" if not root.exists else "holds no images"
                raise RunError(
                    f"not pruning: {root.given} {state}, but the index has {held:,} rows under it "
                    "(an unmounted share?); rows kept. Pass --prune-anyway if those photos are gone"
                )

    def prune(self, roots: list[Root], anyway: bool = False) -> int:
        """Mark for removal the rows under this run's roots whose files are gone; returns how many.

        Refuses (RunError, nothing marked), unless `anyway`, when a root is missing or empty, when a folder
        that held rows is now empty (a share mounted inside a root), or when more than half of the rows under
        a root would go. Moved files' old rows go without counting towards that half.
        """
        if not anyway:
            self.check_roots(roots)
        moved = {m.source for m in self.moves}
        gone: list[str] = []
        for root in roots:
            held = [p for p in self.entries if under(p, root.key)]
            lost = [p for p in held if _gone(p)]
            if not anyway:
                lost_here = [p for p in lost if p not in moved]
                _check_empty_folders(lost_here, root)
                if lost_here and len(lost_here) * 2 > len(held):
                    raise RunError(
                        f"not pruning: {len(lost_here):,} of the {len(held):,} rows under {root.given} "
                        "would go, more than half (a missing mount?); rows kept. Pass --prune-anyway "
                        "if those photos are gone"
                    )
            gone += lost
        for p in set(gone):
            self.stale.setdefault(self.entries[p].segment, set()).add(p)
        return len(set(gone))


def _listable(path: str) -> bool:
    try:
        os.listdir(path)
        return True
    except OSError:
        return False


def _gone(path: str) -> bool:
    """Whether a file is certainly gone: no longer there, or now a folder (a row of the file it was, or an error
    row of a folder that could not be listed then and is walked now). A file that cannot be checked (EACCES,
    EIO, a stale NFS handle) is not."""
    try:
        st = os.stat(path) if os.path.islink(path) else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode)


# An emptied folder that held this many rows is treated as a share that is not mounted (fewer: an album whose
# photos were deleted). A mountpoint named in /etc/fstab that is empty and not mounted is refused at any size.
EMPTY_FOLDER_ROWS = 100


def _fstab_mountpoints(fstab: str = "/etc/fstab") -> set[str]:
    try:
        with open(fstab) as f:
            return {
                fields[1]
                for line in f
                if (fields := line.split()) and not fields[0].startswith("#") and len(fields) > 1
            }
    except OSError:
        return set()


def _check_empty_folders(lost: list[str], root: Root) -> None:
    """An empty folder that held many rows, or an empty fstab mountpoint, is what an unmounted share inside a
    root looks like: refuse."""
    checked: set[str] = set()
    mountpoints = None
    for path in lost:
        folder = os.path.dirname(path)
        while not os.path.isdir(folder) and under(folder, root.key) and folder != root.key:
            folder = os.path.dirname(folder)  # the nearest folder still there
        if folder in checked:
            continue
        checked.add(folder)
        try:
            empty = not os.listdir(folder)
        except OSError:
            continue
        if not empty:
            continue
        held = sum(1 for p in lost if under(p, folder))
        if mountpoints is None:
            mountpoints = _fstab_mountpoints()
        if held >= EMPTY_FOLDER_ROWS or (folder in mountpoints and not os.path.ismount(folder)):
            raise RunError(
                f"not pruning: {folder} is empty, but the index has {held:,} rows under it "
                "(an unmounted share?); rows kept. Pass --prune-anyway if those photos are gone"
            )


def _unchanged(old: Entry, rec: FileRecord, rehash: bool) -> bool:
    """By content with rehash (of a file whose content was read before: an error row of a file that could not
    be read has no hash, and is compared by size and time), else by size and time."""
    if rehash and rec.error is None and (old.ok or old.sha256 is not None):
        return old.sha256 is not None and old.sha256 == file_hash(rec.path)
    mtime_us = None if rec.mtime_ns is None else rec.mtime_ns // 1000
    return (old.size, old.mtime_us) == (rec.size, mtime_us)  # (None, None) for a path that cannot be stat-ed
