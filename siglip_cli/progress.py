"""Progress on stderr while a run goes (only on a terminal), and the one-line summary at the end."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Summary:
    """What a run did: counted rows, wall time and where the output went."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    pruned: int = 0
    moved: int = 0
    missing: int = 0  # paths given that do not exist
    seconds: float = 0.0
    output: str = "-"

    @property
    def rate(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        done = f"{self.ok + self.failed:,} done ({self.ok:,} ok, {self.failed:,} failed)"
        skipped = f", {self.skipped:,} unchanged" if self.skipped else ""
        skipped += f", {self.moved:,} moved" if self.moved else ""
        skipped += f", {self.pruned:,} pruned" if self.pruned else ""
        where = "stdout" if self.output == "-" else self.output
        return f"siglip: {done}{skipped} in {self.seconds:.1f}s, {self.rate:.1f} images/s -> {where}"


class Progress:
    """A rich progress bar (done/total, images/s, ETA, failures) when stderr is a terminal, else nothing.

    The total comes from `count`, run in a background thread so that a long listing never delays the start.
    """

    def __init__(self, enabled: bool, count: Callable[[], int] | None = None, label: str = "images"):
        self.summary = Summary()
        self.start = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self.bar = RichProgress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f}/s"),
            TimeRemainingColumn(),
            TextColumn("failed: {task.fields[failed]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task(label, total=None, rate=0.0, failed=0)
        self.started = False
        if count is not None:
            threading.Thread(target=lambda: self.bar.update(self.task, total=count()), daemon=True).start()

    def begin(self) -> None:
        """Show the bar: once the model is loaded, so that it never garbles the Hub's download bars."""
        if self.bar is not None and not self.started:
            self.bar.start()
            self.started = True

    def advance(self, ok: int, failed: int, skipped: int = 0) -> None:
        """Count a finished batch; `skipped` is the running count of unchanged files passed over."""
        self.begin()
        s = self.summary
        s.ok, s.failed, s.skipped = s.ok + ok, s.failed + failed, skipped
        s.seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update(self.task, completed=s.ok + s.failed + s.skipped, rate=s.rate, failed=s.failed)

    def close(self) -> Summary:
        """Stop the bar and return the summary."""
        if self.bar is not None and self.started:
            self.bar.stop()
        self.summary.seconds = time.perf_counter() - self.start
        return self.summary


def progress_enabled(quiet: bool) -> bool:
    """Progress only for a person watching: never with --quiet, never when stderr is a file or a pipe."""
    return not quiet and sys.stderr.isatty()
