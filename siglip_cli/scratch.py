"""Scratch folders: where everything siglip writes is made before it is renamed into place, so that a killed
run leaves nothing behind for good.

A scratch folder is `.siglip-tmp-*` beside its destination (a cache entry, a converted model, a search sidecar,
an output file), locked with flock while its process lives. Making one first removes the scratch folders in the
same place that no live process holds and that nothing touched for a minute: what a kill -9, an OOM kill or a
power cut left there (a sidecar's is gigabytes). Where a file system has no locks the minute alone decides.
Standard library only: searches use it without numpy's friends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PREFIX = ".siglip-tmp-"
GRACE = 60.0  # seconds: covers the moment between making a folder and locking it


def _lock(fd: int) -> bool | None:
    """Take fd's exclusive lock: True, False when another open file holds it, None when there are no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _newest(path: str) -> float:
    newest = os.stat(path).st_mtime
    with os.scandir(path) as it:
        for e in it:
            try:
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
            except OSError:
                pass
    return newest


def _abandoned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if _lock(fd) is False:
            return False  # a live run is writing in it
        return time.time() - _newest(path) > GRACE
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the lock just taken


def sweep(parent: str) -> None:
    """Remove the scratch folders in parent that killed runs left."""
    try:
        with os.scandir(parent) as it:
            found = [e.path for e in it if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for path in found:
        if _abandoned(path):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch(parent: str):
    """A new, locked scratch folder in parent, removed when the block ends; what the block renames out of it
    (os.replace into parent) stays. Parent is not made here: a folder that vanished (an unmounted share) must
    fail the write, not be made again on the mount point. Raises OSError where parent cannot be written."""
    sweep(parent)
    path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
    try:
        fd = os.open(path, os.O_RDONLY)  # (Windows opens no folder: the minute alone protects it there)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            _lock(fd)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd >= 0:
            os.close(fd)
