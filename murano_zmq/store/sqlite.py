"""The SQLite store: WAL mode, synchronous=FULL, one transaction per commit().

Message bodies stay on disk; the relay keeps only a bounded window of each
mailbox in memory, so a million queued messages cost disk, not RAM.

Every method holds one lock, so the relay may run commit() (the fsync) in a
thread of its own while its loop goes on; a call made meanwhile waits for it.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from typing import Iterable

import msgpack

from ..protocol.errors import MuranoZmqError, StartupError
from .base import MailboxRow, StoredMessage

log = logging.getLogger("murano_zmq.store")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailboxes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    options BLOB NOT NULL,
    declared INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    mailbox INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (msg_id);
CREATE INDEX IF NOT EXISTS messages_by_mailbox ON messages (mailbox, seq);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (expires) WHERE expires IS NOT NULL;
"""

# Page cache per connection, KiB (negative = KiB in SQLite's pragma): bounded
# so the relay's memory does not grow with the queue.
CACHE_KIB = 16 * 1024

_COLUMNS = "seq, mailbox, msg_id, headers, body, created, expires, deliveries"

# Another process holding the write lock is transient (a backup, an operator's
# sqlite3 shell): each attempt waits BUSY_TIMEOUT seconds inside SQLite, then
# the store backs off up to BUSY_BACKOFF_MAX and tries again, logging every
# BUSY_LOG_EVERY seconds, for as long as it takes.
BUSY_TIMEOUT = 1.0
BUSY_BACKOFF_MAX = 1.0
BUSY_LOG_EVERY = 10.0

# Bytes the store must be able to allocate in the data directory before a
# relay that found its disk full accepts sends again.
SPACE_PROBE_BYTES = 1 << 20

# Space kept allocated in DATA_DIR/relay.reserve while the disk has room and
# given back when it fills, so acks (deletes) and dead-letter moves can still
# commit on a full disk.
RESERVE_BYTES = 4 << 20


class StoreError(MuranoZmqError):
    """A write or commit failed; the store rolled back every write since the
    last commit.  `full`: the cause is a full disk."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.full = is_disk_full(cause)


def is_disk_full(exc: BaseException) -> bool:
    return "full" in str(exc)  # SQLITE_FULL: "database or disk is full"


def startup_error(path: str, exc: BaseException) -> StartupError:
    """The one line an operator reads when the database cannot be opened."""
    if _is_corrupt(exc):
        return StartupError(
            f"{path} is damaged ({exc}): stop here, move the file aside with its -wal and -shm "
            "files and restore a backup, or start with an empty data directory "
            "(docs/operations.md, 'A corrupt database')")
    return StartupError(f"cannot open {path}: {exc}")


def _is_busy(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _is_corrupt(exc: BaseException) -> bool:
    text = str(exc)
    return "not a database" in text or "malformed" in text or "corrupt" in text


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def _writes(method):
    """A write in the open transaction: under the lock; a failure rolls the
    transaction back and becomes StoreError, so the caller knows every write
    since the last commit is gone."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                self.rollback()
                raise StoreError(exc) from exc

    return wrapper


class SQLiteStore:
    DB_NAME = "relay.db"

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, self.DB_NAME)
        self._lock = threading.RLock()
        self._in_tx = False
        self._seq_mark = self._seq_saved = 0  # highest seq inserted / recorded in meta
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise StartupError(f"cannot open {self.path}: {exc}") from None
        try:
            self._retry_busy("opening the database", self._open)
        except (sqlite3.DatabaseError, RuntimeError) as exc:
            self._db.close()
            raise startup_error(self.path, exc) from None

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {row[0]}, this relay reads {SCHEMA_VERSION}")

    def _retry_busy(self, what: str, action):
        """Run `action`; while another process holds the database locked, back
        off and retry (logged), however long it takes."""
        delay, since, logged = 0.05, None, 0.0
        while True:
            try:
                result = action()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                if since is None:
                    since = logged = now
                    log.warning("%s is locked by another process (%s: %s); retrying with backoff",
                                self.path, what, exc)
                elif now - logged >= BUSY_LOG_EVERY:
                    logged = now
                    log.warning("%s still locked after %.0fs (%s); retrying", self.path, now - since, what)
                time.sleep(delay)
                delay = min(delay * 2, BUSY_BACKOFF_MAX)
                continue
            if since is not None:
                log.warning("%s: lock released after %.1fs; going on", self.path, time.monotonic() - since)
            return result

    # --- reads ----------------------------------------------------------------

    @_locked
    def load_mailboxes(self) -> list[MailboxRow]:
        return [
            MailboxRow(i, name, msgpack.unpackb(opts), bool(declared))
            for i, name, opts, declared in self._db.execute(
                "SELECT id, name, options, declared FROM mailboxes ORDER BY id"
            )
        ]

    @_locked
    def mailbox_stats(self) -> dict[int, tuple[int, int]]:
        return {
            mb: (n, b or 0)
            for mb, n, b in self._db.execute(
                "SELECT mailbox, count(*), sum(length(body)) FROM messages GROUP BY mailbox"
            )
        }

    @_locked
    def max_seq(self) -> int:
        """The highest seq ever stored: tags are never reused after a restart,
        so a late ACK cannot hit a newer message."""
        stored = self._db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()[0]
        row = self._db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()
        return max(stored, row[0] if row else 0)

    @_locked
    def existing_ids(self, msg_ids: list[bytes]) -> set[bytes]:
        found = set()
        for msg_id in msg_ids:
            if self._db.execute("SELECT 1 FROM messages WHERE msg_id=?", (msg_id,)).fetchone():
                found.add(msg_id)
        return found

    @_locked
    def load_ready(self, mailbox_id: int, after_seq: int, limit: int) -> list[StoredMessage]:
        return [
            StoredMessage._make(r)
            for r in self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE mailbox=? AND seq>? ORDER BY seq LIMIT ?",
                (mailbox_id, after_seq, limit),
            )
        ]

    @_locked
    def expired(self, now: float, limit: int, skip: int = 0) -> list[tuple[int, int]]:
        return self._db.execute(
            "SELECT seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires<=? "
            "ORDER BY expires, seq LIMIT ? OFFSET ?",
            (now, limit, skip),
        ).fetchall()

    @_locked
    def next_expiry(self, after: float) -> float | None:
        return self._db.execute(
            "SELECT min(expires) FROM messages WHERE expires IS NOT NULL AND expires>?", (after,)
        ).fetchone()[0]

    # --- writes (inside the open transaction) -----------------------------------

    @property
    def in_transaction(self) -> bool:
        """True while writes wait for commit()."""
        return self._in_tx

    def _begin(self) -> sqlite3.Connection:
        if not self._in_tx:
            # IMMEDIATE: take the write lock now, so a busy database is met
            # here (and retried) before any write of the transaction.
            self._retry_busy("starting a write", lambda: self._db.execute("BEGIN IMMEDIATE"))
            self._in_tx = True
        return self._db

    @_locked
    def rollback(self) -> None:
        """Drop every write since the last commit (SQLite may have rolled
        back already: a full disk does that)."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback of %s failed: %s", self.path, exc)
        self._in_tx = False  # _seq_mark stays: the next commit records it

    def space_available(self, nbytes: int = SPACE_PROBE_BYTES) -> bool:
        """True if `nbytes` can be allocated in the data directory now."""
        probe = self.path + ".space-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            os.unlink(probe)

    @property
    def _reserve_path(self) -> str:
        return os.path.join(os.path.dirname(self.path), "relay.reserve")

    def hold_reserve(self) -> bool:
        """Allocate the reserve (RESERVE_BYTES) if it is not held; False if
        the disk has no room for it (then nothing is held)."""
        try:
            if os.path.getsize(self._reserve_path) >= RESERVE_BYTES:
                return True
        except OSError:
            pass
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
            return True
        except OSError:
            os.ftruncate(fd, 0)
            return False
        finally:
            os.close(fd)

    def drop_reserve(self) -> None:
        """Give the reserve back to the file system (for SQLite's use)."""
        try:
            os.unlink(self._reserve_path)
        except FileNotFoundError:
            pass

    @_writes
    def save_mailbox(self, row: MailboxRow) -> None:
        self._begin().execute(
            "INSERT OR REPLACE INTO mailboxes (id, name, options, declared) VALUES (?, ?, ?, ?)",
            (row.id, row.name, msgpack.packb(row.options), int(row.declared)),
        )

    @_writes
    def delete_mailbox(self, mailbox_id: int) -> None:
        db = self._begin()
        db.execute("DELETE FROM messages WHERE mailbox=?", (mailbox_id,))
        db.execute("DELETE FROM mailboxes WHERE id=?", (mailbox_id,))

    @_writes
    def insert(self, messages: list[StoredMessage]) -> int:
        if messages:
            self._seq_mark = max(self._seq_mark, messages[-1].seq)
        cur = self._begin().executemany(
            f"INSERT OR IGNORE INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", messages
        )
        return cur.rowcount

    @_locked
    def get(self, seq: int) -> StoredMessage | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM messages WHERE seq=?", (seq,)).fetchone()
        return StoredMessage._make(row) if row else None

    @_locked
    def mailboxes_of(self, msg_ids: list[bytes]) -> dict[bytes, int]:
        """Where stored ids are: msg_id -> mailbox id."""
        found = {}
        for msg_id in msg_ids:
            row = self._db.execute("SELECT mailbox FROM messages WHERE msg_id=?", (msg_id,)).fetchone()
            if row:
                found[msg_id] = row[0]
        return found

    @_locked
    def existing_seqs(self, seqs: list[int]) -> set[int]:
        found = set()
        for seq in seqs:
            if self._db.execute("SELECT 1 FROM messages WHERE seq=?", (seq,)).fetchone():
                found.add(seq)
        return found

    @_writes
    def delete(self, seqs: Iterable[int]) -> None:
        self._begin().executemany("DELETE FROM messages WHERE seq=?", ((s,) for s in seqs))

    @_writes
    def set_deliveries(self, counts: Iterable[tuple[int, int]]) -> None:
        self._begin().executemany("UPDATE messages SET deliveries=? WHERE seq=?", counts)

    @_locked
    def reserve_seq(self, seq: int) -> None:
        """Record, durably at once, that seqs up to `seq` may be in use.

        On a full disk the mark stays pending: nothing can be stored before
        a commit succeeds, and that commit writes it first."""
        self.commit()
        self._seq_mark = max(self._seq_mark, seq)
        try:
            self._begin()
            self.commit()
        except StoreError as exc:
            if not exc.full:
                raise

    @_writes
    def commit(self) -> None:
        if self._in_tx:
            mark = self._seq_mark
            if mark > self._seq_saved:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (mark,))
            self._retry_busy("committing", lambda: self._db.execute("COMMIT"))
            self._seq_saved = max(self._seq_saved, mark)
            self._in_tx = False

    @_locked
    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()
