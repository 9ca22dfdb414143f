"""One relay per data directory: an exclusive flock on DATA_DIR/relay.lock.

Two relays on one directory would both number mailboxes from the same
store and overwrite each other's rows.  The lock is held for the life of the
process (the kernel drops it when the process dies, even by kill -9), so a
stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os

from ..protocol.errors import StartupError

LOCK_NAME = "relay.lock"


class DataDirLock:
    """Holds the lock from acquire() until release() or the process's end."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "DataDirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"data directory {self.data_dir}: cannot open {self.path}: "
                               f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(f"data directory {self.data_dir} is in use by another relay (pid {holder}); "
                               "give each relay its own --data-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above
        except OSError:  # (a full disk: the lock holds without the pid)
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
