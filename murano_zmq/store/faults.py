"""What can go wrong under the SQLite store, sorted into what the relay does
about it: a busy database is waited out (retry_busy), a failed write is a
StoreError (a full disk among them), a damaged file at start-up is one line
for the operator (startup_error).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time

from ..protocol.errors import MuranoZmqError, StartupError

log = logging.getLogger("murano_zmq.store")

# Another process holding the write lock is transient (a backup, an operator's
# sqlite3 shell): each attempt waits BUSY_TIMEOUT seconds inside SQLite, then
# the store backs off up to BUSY_BACKOFF_MAX and tries again, logging every
# BUSY_LOG_EVERY seconds, for as long as it takes.
BUSY_TIMEOUT = 1.0
BUSY_BACKOFF_MAX = 1.0
BUSY_LOG_EVERY = 10.0

class StoreError(MuranoZmqError):
    """A write or commit failed; the store rolled back every write since the
    last commit.  `full`: the cause is a full disk.  `unsynced`: the cause
    is a failed sync of what was already COMMITted (SyncFailed).
    `lock_lost`: another relay holds the database now (LockLost)."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.full = is_disk_full(cause)
        self.unsynced = isinstance(cause, SyncFailed)
        self.lock_lost = isinstance(cause, LockLost)


class LockLost(Exception):
    """(PostgreSQL) The relay's session, which held the relay lock, ended
    under it, and another relay (a standby) took the lock meanwhile: this
    relay must stop serving, or both would deliver the same messages."""


class SyncFailed(OSError):
    """The sync (fdatasync) of COMMITted writes failed.  Nothing written
    since the last good sync can be trusted to be on disk, whatever a later
    sync returns: after a writeback error Linux reports it once, and may
    have marked the pages clean or dropped them (PostgreSQL's "fsyncgate").
    A WAL frame lost under later ones would also hide those from SQLite's
    recovery.  So the relay stops rather than confirm anything more
    (relay/server.py, docs/operations.md "A failed sync")."""


def is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL ("database or disk is full"), or a file write's ENOSPC or
    EDQUOT (a segment's direct write says "No space left on device")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "full" in str(exc)


def startup_error(path: str, exc: BaseException) -> StartupError:
    """The one line an operator reads when the database cannot be opened."""
    if _is_corrupt(exc):
        return StartupError(
            f"{path} is damaged ({exc}): stop here, move the file aside with its -wal and -shm "
            "files and restore a backup, or start with an empty data directory "
            "(docs/operations.md, 'A corrupt database')")
    return StartupError(f"cannot open {path}: {exc}")


def is_busy(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _is_corrupt(exc: BaseException) -> bool:
    text = str(exc)
    return "not a database" in text or "malformed" in text or "corrupt" in text



def retry_busy(path: str, what: str, action):
    """Run `action`; while another process holds the database locked, back
    off and retry (logged), however long it takes."""
    delay, since, logged = 0.05, None, 0.0
    while True:
        try:
            result = action()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            now = time.monotonic()
            if since is None:
                since = logged = now
                log.warning("%s is locked by another process (%s: %s); retrying with backoff",
                            path, what, exc)
            elif now - logged >= BUSY_LOG_EVERY:
                logged = now
                log.warning("%s still locked after %.0fs (%s); retrying", path, now - since, what)
            time.sleep(delay)
            delay = min(delay * 2, BUSY_BACKOFF_MAX)
            continue
        if since is not None:
            log.warning("%s: lock released after %.1fs; going on", path, time.monotonic() - since)
        return result
