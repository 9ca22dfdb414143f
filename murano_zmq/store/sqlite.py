"""The SQLite store: WAL mode, synchronous=FULL, one transaction per commit().

Message bodies stay on disk; the relay keeps only a bounded window of each
mailbox in memory, so a million queued messages cost disk, not RAM.

Two connections: the writer runs only inside commit() (which the relay may
call from a committer thread), the reader serves the relay loop.  WAL lets
the reader go on while the writer syncs, and writes not committed yet are
seen through their batches (store/batch.py), so the loop never waits for
an fsync.

A failed write or commit is a StoreError (store/faults.py: full disk among
them); a busy database (another process holding the lock) is waited out.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from typing import Iterable

import msgpack

from ..protocol.errors import StartupError
from . import space
from .base import MailboxRow, StoredMessage
from .schema import CACHE_KIB, COLUMNS as _COLUMNS, ID_CHUNK, SCHEMA as _SCHEMA, SCHEMA_VERSION
from .faults import BUSY_TIMEOUT, StoreError, retry_busy, startup_error
from .batch import WriteBatch, cap, dropped_mailboxes, find, hidden_count, inserted_rows, replay, visible

__all__ = ["SQLiteStore", "StoreError", "startup_error"]

log = logging.getLogger("murano_zmq.store")



class SQLiteStore:
    DB_NAME = "relay.db"

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, self.DB_NAME)
        self._db = self._connect()  # the writer
        # The open batch is the last; those before it are sealed.  The list
        # is replaced, never changed in place, so a reader's copy stays valid.
        self._batches: list[WriteBatch] = [WriteBatch()]
        self._batches_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._read_lock = threading.RLock()  # one statement at a time on the reader
        self._seq_saved = 0  # highest seq recorded in meta by this store
        self._seq_before = 0  # ... before the open transaction
        self._tx_open = False  # a BEGIN of ours not yet committed or rolled back
        self._seq_owed = 0  # a reserve_seq() mark a full disk kept out: the next commit writes it
        self._reader = None
        try:
            retry_busy(self.path, "opening the database", self._open)
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only=1")
            # No stored id is above this: an id above it needs no lookup (ids
            # made by new_message_id() start with a clock, so most new ones are).
            self._id_ceiling: bytes = self._query("SELECT max(msg_id) FROM messages")[0][0] or b""
        except (sqlite3.DatabaseError, RuntimeError) as exc:
            if self._reader is not None:
                self._reader.close()
            self._db.close()
            raise startup_error(self.path, exc) from None

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise StartupError(f"cannot open {self.path}: {exc}") from None
        try:
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise startup_error(self.path, exc) from None
        return db

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {row[0]}, this relay reads {SCHEMA_VERSION}")

    def _pending(self) -> list[WriteBatch]:
        with self._batches_lock:
            return self._batches

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    # --- at start-up ------------------------------------------------------------

    def load_mailboxes(self) -> list[MailboxRow]:
        return [
            MailboxRow(i, name, msgpack.unpackb(opts), bool(declared))
            for i, name, opts, declared in self._query(
                "SELECT id, name, options, declared FROM mailboxes ORDER BY id")
        ]

    def mailbox_stats(self) -> dict[int, tuple[int, int]]:
        return {
            mb: (n, b or 0)
            for mb, n, b in self._query(
                "SELECT mailbox, count(*), sum(length(body)) FROM messages GROUP BY mailbox")
        }

    def max_seq(self) -> int:
        """The highest seq ever stored: tags are never reused after a restart,
        so a late ACK cannot hit a newer message."""
        stored = self._query("SELECT coalesce(max(seq), 0) FROM messages")[0][0]
        row = self._query("SELECT value FROM meta WHERE key='seq'")
        return max(stored, row[0][0] if row else 0)

    def reserve_seq(self, seq: int) -> None:
        """On a full disk the mark stays owed: nothing can be stored before
        a commit succeeds, and that commit writes it first."""
        with self._commit_lock:
            try:
                self._begin()
                self._save_seq_mark(seq)
                retry_busy(self.path, "committing", lambda: self._db.execute("COMMIT"))
                self._tx_open = False
            except sqlite3.Error as exc:
                self._rollback_tx()
                error = StoreError(exc)
                if not error.full:
                    raise error from exc
                self._seq_owed = max(self._seq_owed, seq)

    def _save_seq_mark(self, seq: int) -> None:
        if seq > self._seq_saved:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (seq,))
            self._seq_saved = seq

    # --- reads ------------------------------------------------------------------

    def get(self, seq: int) -> StoredMessage | None:
        found = self.get_many([seq])
        return found[0] if found else None

    def get_many(self, seqs: list[int]) -> list[StoredMessage]:
        batches = self._pending()
        on_disk = {}
        for i in range(0, len(seqs), ID_CHUNK):
            chunk = seqs[i:i + ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT {_COLUMNS} FROM messages WHERE seq IN ({marks})", tuple(chunk)):
                on_disk[r[0]] = StoredMessage._make(r)
        rows = (find(seq, on_disk.get(seq), batches) for seq in sorted(set(seqs)))
        return [r for r in rows if r is not None]

    def mailboxes_of(self, msg_ids: list[bytes]) -> dict[bytes, int]:
        batches = self._pending()
        found: dict[bytes, int] = {}
        ceiling = self._id_ceiling
        maybe = [m for m in msg_ids if m <= ceiling]
        for i in range(0, len(maybe), ID_CHUNK):
            chunk = maybe[i:i + ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            for seq, mailbox, msg_id in self._query(
                    f"SELECT seq, mailbox, msg_id FROM messages WHERE msg_id IN ({marks})", tuple(chunk)):
                if visible(seq, mailbox, batches):
                    found[msg_id] = mailbox
        for i, b in enumerate(batches):
            for msg_id in msg_ids:
                seq = b.ids.get(msg_id)
                if seq is not None:
                    row = replay(b.inserted[seq], batches[i:], own=True)
                    if row is not None:
                        found[msg_id] = row.mailbox_id
        return found

    def load_ready(self, mailbox_id: int, after_seq: int, limit: int,
                   max_bytes: int | None = None) -> list[StoredMessage]:
        batches = self._pending()
        rows: list[StoredMessage] = []
        stopped_at = None
        if mailbox_id not in dropped_mailboxes(batches):
            wanted = limit + hidden_count(batches)  # rows the batches hide make room for others
            with self._read_lock:
                cursor = self._reader.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE mailbox=? AND seq>? ORDER BY seq LIMIT ?",
                    (mailbox_id, after_seq, wanted))
                size = 0
                for r in cursor:  # stop early: bodies past max_bytes are never read
                    row = replay(StoredMessage._make(r), batches)
                    if row is None:
                        continue
                    rows.append(row)
                    size += len(row.body)
                    if len(rows) >= limit or (max_bytes is not None and size >= max_bytes):
                        stopped_at = row.seq  # rows after it were not read
                        break
                cursor.close()
        more = [r for r in inserted_rows(batches, mailbox_id) if r.seq > after_seq
                and (stopped_at is None or r.seq < stopped_at)]
        if more:
            rows = sorted(rows + more, key=lambda r: r.seq)
        return cap(rows, limit, max_bytes)

    def expired(self, now: float, limit: int, after: tuple[float, int] | None = None
                ) -> list[tuple[float, int, int]]:
        batches = self._pending()
        start = after or (float("-inf"), -1)
        dropped = dropped_mailboxes(batches)
        found = [
            (expires, seq, mailbox)
            for expires, seq, mailbox in self._query(
                "SELECT expires, seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires<=? "
                f"AND (expires, seq) > (?, ?) AND mailbox NOT IN ({','.join('?' * len(dropped))}) "
                "ORDER BY expires, seq LIMIT ?",
                (now, start[0], start[1], *dropped, limit + hidden_count(batches)))
            if visible(seq, mailbox, batches)
        ]
        found += [(r.expires, r.seq, r.mailbox_id) for r in inserted_rows(batches)
                  if r.expires is not None and r.expires <= now and (r.expires, r.seq) > start]
        found.sort()
        return found[:limit]

    def next_expiry(self, after: float) -> float | None:
        batches = self._pending()
        dropped = dropped_mailboxes(batches)
        found = None
        for expires, seq, mailbox in self._query(
                "SELECT expires, seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires>? "
                f"AND mailbox NOT IN ({','.join('?' * len(dropped))}) ORDER BY expires LIMIT ?",
                (after, *dropped, 1 + hidden_count(batches))):
            if visible(seq, mailbox, batches):
                found = expires
                break
        for r in inserted_rows(batches):
            if r.expires is not None and r.expires > after and (found is None or r.expires < found):
                found = r.expires
        return found

    # --- writes (into the open batch) --------------------------------------------

    def save_mailbox(self, row: MailboxRow) -> None:
        self._batches[-1].save_mailbox(row)

    def delete_mailbox(self, mailbox_id: int) -> None:
        self._batches[-1].delete_mailbox(mailbox_id)

    def insert(self, messages: list[StoredMessage]) -> None:
        for m in messages:
            if m.msg_id > self._id_ceiling:
                self._id_ceiling = m.msg_id
        self._batches[-1].insert(messages)

    def delete(self, seqs: Iterable[int]) -> None:
        self._batches[-1].delete(seqs)

    def set_deliveries(self, counts: Iterable[tuple[int, int]]) -> None:
        self._batches[-1].set_deliveries(counts)

    # --- commit -------------------------------------------------------------------

    def seal(self) -> None:
        """Close the open batch.  When no commit is running (the relay seals
        only then), its statements run now, in the caller's thread, so that
        commit() has only the COMMIT (the fsync) left to do: the committer
        thread then holds no GIL-bound work while the loop runs."""
        with self._batches_lock:
            if not self._batches[-1]:
                return
            self._batches = [*self._batches, WriteBatch()]
        if self._commit_lock.acquire(blocking=False):
            try:
                self._write_sealed(self._pending()[:-1])
            finally:
                self._commit_lock.release()

    @property
    def in_transaction(self) -> bool:
        """True while sealed writes wait for commit()."""
        return len(self._batches) > 1

    def commit(self) -> None:
        with self._commit_lock:
            sealed = self._pending()[:-1]
            if not sealed:
                return
            self._write_sealed(sealed)
            try:
                if self._tx_open:
                    retry_busy(self.path, "committing", lambda: self._db.execute("COMMIT"))
                    self._tx_open = False
            except sqlite3.Error as exc:
                self._rollback_tx()
                raise StoreError(exc) from exc
            if self._seq_saved >= self._seq_owed:
                self._seq_owed = 0
            with self._batches_lock:
                self._batches = self._batches[len(sealed):]

    def _write_sealed(self, sealed: list[WriteBatch]) -> None:
        """Run the statements of the sealed batches not written yet, in order,
        in the open transaction (under the commit lock).  A failure undoes
        the transaction and raises StoreError; the batches stay."""
        try:
            for batch in sealed:
                if not batch.written:
                    if not self._tx_open:
                        self._begin()
                        if self._seq_owed:
                            self._save_seq_mark(self._seq_owed)
                    self._write(batch)
                    batch.written = True
        except sqlite3.Error as exc:
            self._rollback_tx()
            raise StoreError(exc) from exc

    def _begin(self) -> None:
        # IMMEDIATE: take the write lock now, so a busy database is met (and
        # waited out) before any write of the transaction.
        retry_busy(self.path, "starting a write", lambda: self._db.execute("BEGIN IMMEDIATE"))
        self._tx_open = True
        self._seq_before = self._seq_saved

    def _rollback_tx(self) -> None:
        """Undo the open transaction (SQLite may have rolled back already: a
        full disk does that); its batches stay, to be written again."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback of %s failed: %s", self.path, exc)
        if self._tx_open:
            self._seq_saved = self._seq_before
            self._tx_open = False
        for batch in self._pending():
            batch.written = False

    def rollback(self) -> None:
        """Drop every write since the last commit, written or buffered (the
        relay does this after a StoreError, then starts over from the store)."""
        with self._commit_lock:
            self._rollback_tx()
            with self._batches_lock:
                self._batches = [WriteBatch()]

    # --- disk space (store/space.py) ---

    def space_available(self) -> bool:
        return space.space_available(os.path.dirname(self.path))

    def hold_reserve(self) -> bool:
        return space.hold_reserve(os.path.dirname(self.path))

    def drop_reserve(self) -> None:
        space.drop_reserve(os.path.dirname(self.path))

    def _write(self, batch: WriteBatch) -> None:
        db = self._db
        for kind, items in batch.statements():
            if kind == "insert":
                db.executemany(f"INSERT OR IGNORE INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               items)
            elif kind == "delete":
                db.executemany("DELETE FROM messages WHERE seq=?", ((s,) for s in items))
            elif kind == "deliveries":
                db.executemany("UPDATE messages SET deliveries=? WHERE seq=?", items)
            elif kind == "mailbox":
                db.execute("INSERT OR REPLACE INTO mailboxes (id, name, options, declared) VALUES (?, ?, ?, ?)",
                           (items.id, items.name, msgpack.packb(items.options), int(items.declared)))
            elif kind == "drop_mailbox":
                db.execute("DELETE FROM messages WHERE mailbox=?", (items,))
                db.execute("DELETE FROM mailboxes WHERE id=?", (items,))
        self._save_seq_mark(batch.top_seq)

    def close(self) -> None:
        try:
            self.seal()
            self.commit()
        finally:
            self._reader.close()
            self._db.close()

