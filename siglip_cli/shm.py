"""Shared memory for the decode workers' pixels: slots sized to the room in /dev/shm, reserved up front, and the
removal of blocks that killed runs left behind."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import time
from multiprocessing import shared_memory

SHM_DIR = "/dev/shm"
SHM_PREFIX = "siglip-"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def reap_stale_blocks(min_age: float = 60.0) -> int:
    """Unlink the shared-memory blocks of siglip runs that died without cleaning up (kill -9 with the resource
    tracker, the OOM killer); returns how many.

    A live run holds a shared flock on each of its blocks, so a block nobody holds is a dead run's, even when
    the runs share /dev/shm but not a PID namespace (docker --ipc=host). A block is only taken when, besides,
    the pid in its name is not alive here or it is older than min_age: a run may not have locked a block it is
    creating this very moment.
    """
    reaped = 0
    try:
        names = [
            (n, int(m.group(1)))
            for n in os.listdir(SHM_DIR)
            if (m := re.fullmatch(re.escape(SHM_PREFIX) + r"(\d+)-[0-9a-f]+", n))
        ]
    except OSError:
        return 0
    for name, pid in names:
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if alive(pid) and time.time() - os.fstat(fd).st_ctime < min_age:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            reaped += 1
        except OSError:  # held by a live run (BlockingIOError), or gone already
            pass
        finally:
            os.close(fd)
    return reaped


def shm_budget() -> int:
    """Bytes of shared memory the slots may take: half of what is free in /dev/shm, capped by $SIGLIP_SHM_BYTES."""
    budget = int(os.environ.get("SIGLIP_SHM_BYTES", 1 << 62))
    try:
        st = os.statvfs(SHM_DIR)
        budget = min(budget, st.f_bavail * st.f_frsize // 2)
    except OSError:
        pass
    return budget


def free(blocks: list[shared_memory.SharedMemory]) -> None:
    for b in blocks:
        b.close()
        try:
            b.unlink()
        except FileNotFoundError:  # removed by someone else: nothing left to free
            pass


def allocate(count: int, nbytes: int) -> list[shared_memory.SharedMemory] | None:
    """count blocks of nbytes, reserved up front (an overfull /dev/shm fails here, not with SIGBUS in a worker)."""
    blocks: list[shared_memory.SharedMemory] = []
    try:
        for _ in range(count):
            blocks.append(shared_memory.SharedMemory(f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}", True, nbytes))
            fcntl.flock(blocks[-1]._fd, fcntl.LOCK_SH)  # "in use", for the reaper of other runs
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(blocks[-1]._fd, 0, nbytes)
    except OSError:
        free(blocks)
        return None
    return blocks


def largest_file() -> int:
    """The largest file this process may make (ulimit -f); a bigger block fails inside SharedMemory itself."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return 1 << 62 if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        return 1 << 62


def slots(workers: int, chunk: int, image_bytes: int) -> tuple[int, list[shared_memory.SharedMemory] | None]:
    """Shared-memory slots for 2*workers chunks in flight, with chunks shrunk (then halved in number) until
    they fit the space there is. Returns the chunk size and the slots, or None: pixels then travel by pipe."""
    budget, largest = shm_budget(), largest_file()
    for window in (2 * workers, workers):
        size = chunk
        while size >= 1:
            nbytes = size * image_bytes
            if window * nbytes <= budget and nbytes <= largest and (blocks := allocate(window, nbytes)):
                return size, blocks
            size //= 2
    return chunk, None
