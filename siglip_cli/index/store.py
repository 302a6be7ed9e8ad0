"""An output opened for a run: the lock, the layout, the index, and the settings check."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import RunError, first_line
from ..sources import display_path
from .files import METADATA_KEY, write_atomic, write_error
from .layouts import layout_for
from .lock import Lock
from .rows import COLUMNS, Index, paths_of, without

MOVE_BATCH = 4096


class Store:
    """A locked output and what it holds. `images`: rows keyed by path (the index); else a text output,
    rewritten whole by each run."""

    def __init__(self, path: str, signature: dict, images: bool = True, same=None):
        self.path, self.signature, self.images = path, signature, images
        self.same = same or (lambda theirs: theirs)  # an older output's signature as this version writes it
        self.layout = layout_for(path)
        self.segments: list[str] = []
        self.foreign: set[int] = set()  # segments of other settings, dropped at the end (--overwrite)
        self.made_with: dict = {}  # the package versions that made the newest segment (metadata `versions`)
        self.index = Index()
        self._lock: Lock | None = None

    @classmethod
    def open(
        cls, path: str, signature: dict, overwrite: bool = False, wait: bool = False, images: bool = True, same=None
    ) -> "Store":
        """Create the output folder if needed, take the lock, read what is there and check it fits this run
        (`same`: an older output's signature as this version would record the same settings)."""
        store = cls(path, signature, images, same)
        check_parent(path)
        try:
            store.layout.prepare()
            store._lock = Lock.take(store.layout.lock_path, path, wait)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            store.layout.clean()
            store._load(overwrite)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Release the lock."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _load(self, overwrite: bool) -> None:
        self.segments = self.layout.segments()
        signatures = []
        for seg in self.segments:
            try:
                meta = json.loads(pq.read_schema(seg).metadata[METADATA_KEY])
                signatures.append(meta.get("signature"))
                self.made_with = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
            except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
                raise RunError(f"{seg} is not a siglip output; move it away or choose another output") from None
        fits = [theirs == self.signature or self.same(theirs) == self.signature for theirs in signatures]
        if not overwrite and not all(fits):
            theirs = signatures[fits.index(False)]
            if any(fits):  # an --overwrite stopped before its end: the rows of both are there
                raise RunError(
                    f"{self.path} holds rows made with these settings and rows made with others "
                    f"({differences(theirs, self.signature)}): an --overwrite that was stopped? Rerun with "
                    f"--overwrite to finish it (the rows it made are kept), or choose another output"
                )
            pin = ""
            old = (theirs or {}).get("weights", "")
            if re.fullmatch(r"[0-9a-f]{40}", old or "") and old != self.signature.get("weights"):
                pin = f" (--revision {old} keeps the weights it was made with)"
            raise RunError(
                f"{self.path} was made with different settings ({differences(theirs, self.signature)}); "
                f"rerun with those settings{pin}, choose another output, or pass --overwrite to start afresh"
            )
        for i, (seg, fit) in enumerate(zip(self.segments, fits)):
            if not fit:
                self.foreign.add(i)
            elif self.images:
                try:
                    rows = pq.read_table(seg, columns=COLUMNS)
                except (OSError, pa.ArrowException) as e:  # a column gone (another tool rewrote it), a cut file
                    if not overwrite:
                        first = first_line(e)
                        raise RunError(
                            f"{seg} cannot be read as a siglip output ({first}): edited by another "
                            "tool? Pass --overwrite to rebuild it, or move it away"
                        ) from None
                    self.foreign.add(i)
                    continue
                self.index.add(i, rows)

    # -- during and after the run --------------------------------------------------------------------
    def pending(self, records, roots, rehash: bool = False, retry=lambda path, entry: False):
        """The records that need work (see Index.pending)."""
        return self.index.pending(records, roots, rehash, retry)

    @property
    def skipped(self) -> int:
        return self.index.skipped

    def next_part(self) -> str:
        return self.layout.next_part()

    def copy_moves(self) -> int:
        """Write the rows of moved files, copied from their old rows with the new path, size and mtime.

        Each segment is read once, a batch at a time, keeping only the rows wanted: memory stays bounded
        however big the index and however many files moved.
        """
        from ..sink import copy_rows

        by_segment = defaultdict(list)
        for m in self.index.moves:
            by_segment[m.segment].append(m)
        pending: list[pa.Table] = []
        rows = 0
        for seg, group in sorted(by_segment.items()):
            wanted = defaultdict(list)
            for m in group:
                wanted[m.source].append(m)
            shown = pa.array(sorted({display_path(p)[0] for p in wanted}), pa.string())
            for batch in pq.ParquetFile(self.segments[seg]).iter_batches(batch_size=1024):
                hits = batch.filter(pc.is_in(batch.column("path"), value_set=shown))
                if not hits.num_rows:
                    continue
                table = pa.Table.from_batches([hits])
                take = [(i, m) for i, p in enumerate(paths_of(table)) for m in wanted.get(p, [])]
                if take:
                    pending.append(copy_rows(table, [i for i, _ in take], [m.record for _, m in take]))
                    rows += len(take)
                if rows >= MOVE_BATCH:
                    write_atomic(self.next_part(), pending, pending[-1].schema)
                    pending, rows = [], 0
        if pending:
            write_atomic(self.next_part(), pending, pending[-1].schema)
        return len(self.index.moves)

    def prune(self, roots, anyway: bool = False) -> int:
        return self.index.prune(roots, anyway)

    def finish(self) -> None:
        """Make the output whole: every path once, nothing of other settings, one file if asked."""
        self.layout.finish(self.segments, self.index.stale, self.foreign, without)

    def replace(self, table: pa.Table) -> None:
        """A text output: the run's table becomes the whole output."""
        self.layout.replace(table)


def check_parent(path: str) -> None:
    """An output's folder must exist (it is never created: a typo should not make a tree of folders)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise RunError(f"cannot write {path}: folder {parent} does not exist")


def differences(theirs: dict | None, ours: dict) -> str:
    """The settings that differ, named, as a person reads them."""
    if not theirs:
        return "no settings recorded"
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in keys)
