"""Scratch folders: where everything siglip writes is made before it is renamed into place, so that a killed
run leaves nothing behind for good.

A scratch folder is `.siglip-tmp-*` beside its destination (a cache entry, a converted model, a search sidecar,
an output file), locked with flock while its process lives. Making one first removes the scratch folders in the
same place that no live process holds and that were not touched for two minutes (a live one is touched every
15 s): what a kill -9, an OOM kill or a power cut left there (a sidecar's is gigabytes). Where a file system
has no locks, 15 minutes untouched decide.
Standard library only: searches use it without numpy's friends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PREFIX = ".siglip-tmp-"
BEAT = 15.0  # seconds between the touches of a live scratch folder
GRACE = 120.0  # untouched this long, an unlocked folder is abandoned (flock's gaps: the moment before the
# owner locks, and file systems shared across hosts, where a lock is only seen on its own host)
GRACE_NO_LOCKS = 900.0  # where there are no locks at all (and clocks of hosts sharing a folder may differ)


def destination(path: str) -> str:
    """The file a write to `path` replaces: where path is a symlink, its target (the link stays a link, and two
    names of one file are one output, with one lock); otherwise path itself. A device, pipe or socket there is
    refused: the rename that replaces an output would put a file in its place (/dev/null, run as root)."""
    target = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.exists(target) and not (os.path.isfile(target) or os.path.isdir(target)):
        from .errors import RunError

        raise RunError(f"cannot write {path}: not a file or a folder (siglip replaces its outputs whole)")
    return target


def _lock(fd: int, wait: bool = False) -> bool | None:
    """Take fd's exclusive lock: True, False when another open file holds it, None when there are no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _abandoned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        locked = _lock(fd)
        if locked is False:
            return False  # a live run is writing in it
        # its owner touches it every BEAT seconds while it lives
        return time.time() - os.stat(path).st_mtime > (GRACE if locked else GRACE_NO_LOCKS)
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
        fd = os.open(path, os.O_RDONLY)  # (Windows opens no folder: the touches alone protect it there)
    except OSError:
        fd = -1
    done = threading.Event()

    def beat() -> None:  # a conversion can write nothing for minutes, a build only into files further down
        while not done.wait(BEAT):
            try:
                os.utime(path)
            except OSError:
                return

    try:
        if fd >= 0:
            _lock(fd, wait=True)  # a sweep holds it only for a stat
        threading.Thread(target=beat, daemon=True).start()
        yield path
    finally:
        done.set()
        shutil.rmtree(path, ignore_errors=True)
        if fd >= 0:
            os.close(fd)
