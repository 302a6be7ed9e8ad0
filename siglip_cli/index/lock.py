"""One run at a time per output: an flock on a lock file, released by the kernel when its holder dies."""

from __future__ import annotations

import fcntl
import os

from ..errors import RunError


class Lock:
    """A held lock on an output. The lock file stays after release: removing it would race with a waiter."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    @classmethod
    def take(cls, lock_path: str, output: str, wait: bool) -> "Lock":
        """Take the lock, or raise a RunError naming the holder (unless wait: then block until it is free)."""
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(
                    f"{output} is in use by another siglip run (pid {holder}, lock {lock_path}); "
                    "wait for it to finish, or pass --wait"
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
