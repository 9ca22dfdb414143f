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
from typing import Iterable

import msgpack

from ..protocol.errors import StartupError
from . import space
from .base import MailboxRow, StoredMessage
from .faults import BUSY_TIMEOUT, StoreError, retry_busy, startup_error

__all__ = ["SQLiteStore", "StoreError", "startup_error"]

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
            retry_busy(self.path, "opening the database", self._open)
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
            retry_busy(self.path, "starting a write", lambda: self._db.execute("BEGIN IMMEDIATE"))
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

    def space_available(self) -> bool:
        return space.space_available(os.path.dirname(self.path))

    def hold_reserve(self) -> bool:
        return space.hold_reserve(os.path.dirname(self.path))

    def drop_reserve(self) -> None:
        space.drop_reserve(os.path.dirname(self.path))

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
            retry_busy(self.path, "committing", lambda: self._db.execute("COMMIT"))
            self._seq_saved = max(self._seq_saved, mark)
            self._in_tx = False

    @_locked
    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()
