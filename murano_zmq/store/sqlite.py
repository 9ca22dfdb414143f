"""The SQLite store: WAL mode, synced commits, one transaction per commit().

Message bodies stay on disk; the relay keeps only a bounded window of each
mailbox in memory, so a million queued messages cost disk, not RAM.

Two connections: the writer runs only inside commit() (which the relay may
call from a committer thread), the reader serves the relay loop.  WAL lets
the reader go on while the writer syncs, and writes not committed yet are
seen through their batches (store/batch.py), so the loop never waits for
an fsync.

Bodies of segments.THRESHOLD bytes and up live in append-only segment
files beside the database (store/segments.py), synced before the commit of
the rows that point at them; the rows keep (seg, seg_off, seg_len).

A run of a SEND's messages is stored as one row (store/packs.py): half the
CPU of a row per message to store and to settle.

The WAL is checkpointed by a thread of its own (store/checkpoint.py), not
inside a commit.

Every commit is synced (the WAL's fdatasync) before commit() returns, but a
commit of acks alone (see _sync_commits_ourselves()) and the rows of lone
sends that the lone-send journal made durable (store/journal.py).

A failed write or commit is a StoreError (store/faults.py: full disk among
them); a busy database (another process holding the lock) is waited out.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from operator import itemgetter

import msgpack

from ..protocol.errors import StartupError
from . import space
from .base import StoredMessage, field_body, field_msg_id
from .batched import BatchedStore
from .dbcheck import foreign_tables, unusable_database
from .sqlite_reads import SQLiteReads
from .schema import CACHE_KIB, COLUMNS as _COLUMNS, ID_CHUNK, SCHEMA as _SCHEMA, SCHEMA_VERSION
from .schema import MIGRATE_1_2, MIGRATE_3_4, PAGE_SIZE, SEGMENT_COLUMNS, SEGMENT_INDEX
from .segments import DIRECT_MIN, PRIVATE_DIR, THRESHOLD, EarlySync, Segments, sync_path
from .packs import MIN_ROWS, Packs
from .checkpoint import Checkpointer
from .faults import BUSY_TIMEOUT, StoreError, SyncFailed, is_busy, is_disk_full, retry_busy, startup_error
from .ids import IdCeiling
from .journal import FILE_NAME as JOURNAL_FILE, ID_SIZE, OWED_LARGE_ROWS, Journal, check_file, read_records
from .batch import WriteBatch, runs

__all__ = ["SQLiteStore", "StoreError", "startup_error"]

log = logging.getLogger("murano_zmq.store")

# sqlite3 binds int, float, str and bytearray parameters as they are, but
# looks for an adapter for every bytes one (ids, bodies), and that lookup
# raises and formats an AttributeError inside before it gives up: about
# 6,500 instructions per stored message, 12 % of the relay's on pipelined
# sends (`python bench/callgrind_lone.py pipe`), 0.35 µs per parameter.
# An adapter that hands the value back is found at once and binds the same
# BLOB: bytes.__bytes__ (a method in C, 90 ns a parameter; bytes() itself
# looks that method up first, 310 ns).  Process-wide, as sqlite3's adapters
# are; bytes is not one of the base types whose adapting turns sqlite3's
# fast path off.
sqlite3.register_adapter(bytes, bytes.__bytes__)

_INSERT_PLACED = f"{_COLUMNS}, {SEGMENT_COLUMNS}"


class MultiRowInsert:
    """One INSERT of many rows: VALUES (...), (...), ... of up to MAX_ROWS
    rows per statement, its parameters flat, instead of executemany().

    executemany() runs the statement once per row: Python's loop binds,
    steps and resets it, and SQLite opens the table's and each index's
    cursor again every time.  A statement of 64 rows does that once:
    ~2 µs less CPU per 1 KiB row (4.5-5.2 against 2.3-3.4 µs, rows of
    500 per transaction), on the relay loop's thread, where seal() runs
    the inserts.  Runs of 2**k rows keep the statements few (one per k,
    compiled once and kept in sqlite3's statement cache)."""

    MAX_ROWS = 64

    def __init__(self, head: str, values: str, width: int):
        """head: "INSERT ... (columns) VALUES "; values: one row's "(?, ...)",
        with `width` parameters."""
        self.width = width
        self._sql = {}
        k = 1
        while k <= self.MAX_ROWS:
            self._sql[k] = head + ", ".join([values] * k)
            k *= 2

    def run(self, db: sqlite3.Connection, params: list) -> int:
        """Insert the rows whose parameters `params` holds, row after row;
        how many were stored (a row an OR IGNORE skipped is not counted)."""
        width, sql, top = self.width, self._sql, self.MAX_ROWS
        rows, stored, at = len(params) // width, 0, 0
        if rows <= top and not rows & (rows - 1):  # one statement (a lone send's row): no slice
            return db.execute(sql[rows], params).rowcount if rows else 0
        while rows:
            k = top if rows >= top else 1 << (rows.bit_length() - 1)
            end = at + k * width
            stored += db.execute(sql[k], params[at:end]).rowcount
            at, rows = end, rows - k
        return stored


_INSERT_HEAD = f"INSERT OR IGNORE INTO messages ({_COLUMNS}) VALUES "
_INSERT = MultiRowInsert(_INSERT_HEAD, "(?, ?, ?, ?, ?, ?, ?, ?)", 8)
# The usual row (no headers, no expiry) with those two as constants: fewer
# parameters to bind, and None still goes through sqlite3's failing adapter
# lookup (bytes no longer does: the adapter above).
_INSERT_PLAIN = MultiRowInsert(_INSERT_HEAD, "(?, ?, ?, X'', ?, ?, NULL, ?)", 6)
_PLAIN_FIELDS = itemgetter(0, 1, 2, 4, 5, 7)  # a StoredMessage's, in _INSERT_PLAIN's parameters
_EXTRAS = itemgetter(3, 6)  # headers, expires
_PLAIN_EXTRAS = (b"", None)  # a usual row's
# (never lower: a record at or below the mark is not written in again)
_SET_JOURNAL_MARK = ("INSERT INTO meta VALUES ('journal', ?) "
                     "ON CONFLICT(key) DO UPDATE SET value=max(value, excluded.value)")
_INSERT_PLACED_ROWS = MultiRowInsert(f"INSERT OR IGNORE INTO messages ({_INSERT_PLACED}) VALUES ",
                                     "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", 12)


class SQLiteStore(SQLiteReads, BatchedStore):
    DB_NAME = "relay.db"

    _EXPIRED_SQL = ("SELECT expires, seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires<=? "
                    "AND (expires, seq) > (?, ?) AND mailbox {not_dropped} ORDER BY expires, seq LIMIT ?")
    _NEXT_EXPIRY_SQL = ("SELECT expires, seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires>? "
                        "AND mailbox {not_dropped} ORDER BY expires LIMIT ?")

    # A WAL that a burst grew past this is cut back to it when it restarts.
    WAL_SIZE_LIMIT = 16 << 20

    def __init__(self, data_dir: str, segment_threshold: int = THRESHOLD, checkpoint: dict | None = None,
                 pack_min_rows: int = MIN_ROWS):
        """checkpoint: Checkpointer's thresholds (commits=, nbytes=), for tests.
        pack_min_rows: the shortest run stored as a pack (store/packs.py)."""
        super().__init__()
        os.makedirs(data_dir, mode=PRIVATE_DIR, exist_ok=True)
        self.path = os.path.join(data_dir, self.DB_NAME)
        self._threshold = segment_threshold
        # (before a connection creates the file)
        refusal = unusable_database(data_dir, self.DB_NAME) or check_file(os.path.join(data_dir, JOURNAL_FILE))
        if refusal is not None:
            raise StartupError(refusal)
        # The messages are for the relay's user alone, as its segment files
        # are: a new database is made 0600 here (SQLite gives its -wal and
        # -shm files the database's mode); an existing one keeps its mode.
        try:
            os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StartupError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            self._segments = Segments(data_dir)
        except OSError as exc:
            raise StartupError(f"cannot open the segment directory in {data_dir}: {exc.strerror}") from None
        self._db = self._connect()  # the writer
        self._seq_before = 0  # ... before the open transaction
        # The highest seq inserted by a written batch (committed or in the
        # open transaction), and its value before the open transaction.
        self._seq_top = self._seq_top_before = 0
        self._tx_open = False  # a BEGIN of ours not yet committed or rolled back
        self._seq_owed = 0  # a reserve_seq() mark a full disk kept out: the next commit writes it
        self._reader = None
        self._packs = None
        self._checkpoints = None  # (started last: the writes at start-up need none)
        self._wal_bytes = 0  # row bytes the open transaction puts in the WAL
        self._wal_fd: int | None = None  # set once the writer runs at NORMAL (see _sync_wal)
        self._tx_synced = True  # the open transaction ends with a sync of the WAL
        self._journal: Journal | None = None
        # Journaled rows not yet in the database, their ids, and the held
        # deletes the first of them took (write_owed())
        self._owed: list[StoredMessage] = []
        self._owed_ids: set[bytes] = set()
        self._owed_held: list[WriteBatch] = []
        # ... their large bodies still to write into a segment (after the
        # CONFIRM: write_owed()), where those written went (seq -> place),
        # and the seqs of those a segment would not take (kept in the database)
        self._owed_early: list[StoredMessage] = []
        self._owed_places: dict[int, tuple[int, int, int]] = {}
        self._owed_inline: set[int] = set()
        self._early_warned = False  # (its warning said once, until a write succeeds)
        # The sync of those bodies running in a thread while the loop goes
        # on (_write_owed_behind()), and the thread's pool (made at first use)
        self._early_sync: tuple[EarlySync, Future] | None = None
        self._early_pool: ThreadPoolExecutor | None = None
        self._early_pool_warned = False  # (a thread it could not start: said once)
        try:
            retry_busy(self.path, "opening the database", self._open)
            self._replay_journal(data_dir)
            self._packs = Packs(self._db, pack_min_rows)
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only=1")
            self._seq_top = self.max_seq()
            # Which new ids need no lookup in the id index (store/ids.py).
            self._ids = IdCeiling(Packs.top_id(self._db))
            self._start_segments()
            self._sync_commits_ourselves()
            self._checkpoints = Checkpointer(self.path, self._commit_lock, self._db, **(checkpoint or {}))
        except (sqlite3.DatabaseError, RuntimeError, OSError, StartupError) as exc:
            if self._reader is not None:
                self._reader.close()
            self._db.close()
            self._segments.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
            if isinstance(exc, StartupError):
                raise
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
        refusal = foreign_tables(self._db, self.path)  # (before WAL mode and the relay's tables go into it)
        if refusal is not None:
            raise StartupError(refusal)
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # (a no-op on a database that has pages)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # store/checkpoint.py does it, off the commit path
        self._db.execute(f"PRAGMA journal_size_limit={self.WAL_SIZE_LIMIT}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and row[0] == 1:  # the same rows, and no body in a segment yet
            self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATE_1_2} "
                                   "UPDATE meta SET value=2 WHERE key='schema'; COMMIT;")
            row = (2,)
        if row is not None and row[0] == 2:  # the same rows; the packs' tables are new (and empty)
            self._db.execute("UPDATE meta SET value=3 WHERE key='schema'")
            row = (3,)
        if row is not None and row[0] == 3:  # the same rows, none with a checksum
            self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATE_3_4} "
                                   "UPDATE meta SET value=4 WHERE key='schema'; COMMIT;")
        self._check_schema(self._db.execute, "?", SCHEMA_VERSION, RuntimeError)
        self._db.execute(SEGMENT_INDEX)
        # Everything the WAL holds, into the database and synced (at FULL)
        # before anything is served: after a failed sync stopped the relay
        # (relay/server.py Relay._halt) the WAL's frames may sit in the page
        # cache only, and a resend found in them would be confirmed.  (A
        # reader in another process may leave part of it, and a full disk all
        # of it: it stays in the WAL, as at any other time.)
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            log.warning("%s: the WAL could not be copied into the database at start (%s); it stays "
                        "in the WAL until a checkpoint succeeds", self.path, exc)

    def _start_segments(self) -> None:
        """Count the rows of each segment; rows whose bytes are not all in
        their segment (a file lost or cut short outside the relay), or not
        what their checksum says (_torn_rows), are logged one by one and
        deleted, so the relay starts from rows it can deliver."""
        files = self._segments.on_disk()
        counts, lost = {}, []
        for seg, n, extent in self._query(
                "SELECT seg, count(*), max(seg_off + seg_len) FROM messages WHERE seg IS NOT NULL GROUP BY seg"):
            counts[seg] = n
            if extent > files.get(seg, -1):
                lost += self._query("SELECT seq, mailbox, msg_id, seg FROM messages "
                                    "WHERE seg=? AND seg_off + seg_len > ?", (seg, files.get(seg, 0)))
        for seq, mailbox, msg_id, seg in lost[:1000]:
            log.error("message %s (seq %d, mailbox id %d) is lost: its body is not in %s "
                      "(missing or cut short)", msg_id.hex(), seq, mailbox, self._segments.path(seg))
        torn = self._torn_rows(files)
        for seq, mailbox, msg_id, seg in torn:
            log.error("message %s (seq %d, mailbox id %d) was never confirmed: the relay stopped before "
                      "its body was on disk in %s; it is dropped", msg_id.hex(), seq, mailbox,
                      self._segments.path(seg))
        lost += torn
        if lost:
            try:
                retry_busy(self.path, "starting a write", lambda: self._db.execute("BEGIN IMMEDIATE"))
                self._db.executemany("DELETE FROM messages WHERE seq=?", [(r[0],) for r in lost])
                # The top rows may go: the mark keeps max_seq() from falling below them.
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (self._seq_top,))
                retry_busy(self.path, "committing", lambda: self._db.execute("COMMIT"))
            except sqlite3.Error as exc:  # (a full disk): they stay, and reads skip them
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if torn:  # (reads would not: their bytes are there)
                    raise StartupError(f"{self.path}: {len(torn)} message(s) whose bodies did not reach the "
                                       f"disk could not be deleted ({exc}): free space, then start again") from None
                log.error("%d message(s) whose bodies are not in their segment files could not be "
                          "deleted (%s): they are skipped", len(lost), exc)
            else:
                for r in lost:
                    counts[r[3]] -= 1
                log.error("%d message(s) whose bodies were not in their segment files are deleted "
                          "(docs/operations.md, 'Segment files')", len(lost))
        self._segments.start(counts, files)

    def _torn_rows(self, files: dict[int, int]) -> list[tuple]:
        """(at start) The rows of the last commit whose bodies were to be
        made durable by the WAL's flush (store/writeback.py) but whose bytes
        do not match their checksum: the WAL's frames reached the disk and
        the bodies did not, and no confirm went out.  Only the last commit
        can be such: each one waits for the flush of the one before.  Its
        bodies are the newest segment's last, under DIRECT_MIN bytes.  Those
        that match are written again, to be synced (Segments.rewrite_if_whole:
        after a failed sync the page cache may hold what the disk does not)."""
        top = self._query("SELECT max(seg) FROM messages WHERE seg IS NOT NULL")[0][0]
        if top is None:
            return []
        extent = self._query("SELECT max(seg_off + seg_len) FROM messages WHERE seg=?", (top,))[0][0]
        return [(seq, mailbox, msg_id, seg) for seq, mailbox, msg_id, seg, off, length, crc in self._query(
                    "SELECT seq, mailbox, msg_id, seg, seg_off, seg_len, seg_crc FROM messages "
                    "WHERE seg=? AND seg_crc IS NOT NULL AND seg_off + seg_len > ?", (top, extent - DIRECT_MIN))
                if off + length <= files.get(seg, 0) and not self._segments.rewrite_if_whole(seg, off, length, crc)]

    def reserve_seq(self, seq: int) -> None:
        """On a full disk the mark stays owed: nothing can be stored before
        a commit succeeds, and that commit writes it first."""
        with self._commit_lock:
            try:
                self._begin()
                self._save_seq_mark(seq)
                self._commit_tx()
            except (sqlite3.Error, OSError) as exc:  # (OSError: its sync failed, SyncFailed)
                self._rollback_tx()
                error = StoreError(exc)
                if not error.full:
                    raise error from exc
                self._seq_owed = max(self._seq_owed, seq)

    def _save_seq_mark(self, seq: int) -> None:
        if seq > self._seq_saved:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (seq,))
            self._seq_saved = seq

    # --- commit -------------------------------------------------------------------

    def seal(self) -> None:
        """Close the open batch.  When no commit holds the writer (none in
        flight, or one that only syncs), its statements run now, in the
        caller's thread, so that commit() has only the COMMIT (and the
        fsync) left to do: the committer thread then holds no GIL-bound
        work while the loop runs."""
        if self._owed:
            self.write_owed()
        if self._seal_open() and self._commit_lock.acquire(blocking=False):
            try:
                self._write_sealed(self._pending()[:-1])
            finally:
                self._commit_lock.release()

    def commit_insert(self, messages: list[StoredMessage]) -> None:
        """With nothing else to write, no batch: BEGIN, INSERT, COMMIT (what
        seal() and commit() would run for these rows, without their
        bookkeeping: a lone send's path).  A large body goes to a segment,
        written and synced before the COMMIT, as in any commit: a second
        fsync, but SQLite's copies of it (into the WAL, then the database at
        a checkpoint, one that grows it while messages pile up) would cost
        the sends behind it several times that (docs/performance.md,
        "Session 18").  Where there is a journal, a lone row is made durable
        by it instead, a large body with it, and written here by
        write_owed() (store/journal.py)."""
        # Batches of deletes alone (held for a later commit by relay/turn.py,
        # sealed and written ahead or still open) go into this one: a lone
        # send after an ack keeps its one sync.  Anything else takes the
        # general path.
        held = self._held_batches()
        if held and self.held_deletes() is None:
            super().commit_insert(messages)
            return
        with self._commit_lock:
            ids = [m.msg_id for m in messages]
            # (only packs need it: the table's unique index skips a repeated id)
            recheck = self._ids.maybe_stored(ids) if self._packs else None
            self._ids.stored(ids)
            if not recheck and self._journaled(messages, held):
                return
            if self._owed:  # (the journal's rows first, in seq order, with any deletes held)
                self._write_owed_locked()
                held = self._held_batches()
            self._committed(lambda: self._write_lone(messages, held, recheck))
        if held:
            with self._batches_lock:  # committed: reads need them no more
                self._batches = [WriteBatch()]

    def _held_batches(self) -> list[WriteBatch]:
        batches = self._batches
        return [] if len(batches) == 1 and not batches[0] else [b for b in batches if b]

    def _write_lone(self, messages: list[StoredMessage], held: list[WriteBatch], recheck: list | None,
                    journaled: bool = False, synced: bool = False) -> None:
        """(commit_insert's transaction, or write_owed's) The held deletes
        and the rows, in a transaction of their own; `journaled`: not
        synced, and its top seq the journal's mark; `synced`: their bodies
        written early are synced already (others written early since are not)."""
        self._packs.reload_if_stale(self._db)
        if not self._tx_open:  # (else the held deletes' statements ran in it already)
            self._begin()
            if self._seq_owed:
                self._save_seq_mark(self._seq_owed)
        self._tx_synced = not journaled
        for batch in held:
            if not batch.written:
                self._write(batch)
        top = max(m.seq for m in messages)
        skipped = 0
        if recheck:  # ids that may be in a pack already: looked up there, skipped if found
            messages, skipped, _ = self._packs.store(self._db, messages, self._threshold, set(recheck))
        # Bodies that fit where the last sync left durable blocks
        # are made durable by the WAL's flush (store/writeback.py),
        # their rows checksummed; else the bodies first, synced: a
        # row never points at bytes not on disk.
        large = sum(len(m.body) for m in messages if len(m.body) >= self._threshold
                    and m.seq not in self._owed_places and m.seq not in self._owed_inline)
        unsynced = self._wal_fd is not None and self._segments.fits_unsynced(large)
        stored = self._store_rows(messages, checksums=unsynced)
        if unsynced:
            self._segments.write_unsynced()
        elif self._segments.unwritten and not synced:
            self._segments.sync(drop_cached=True)
        if top > self._seq_top:
            self._seq_top = top
        if skipped or stored != len(messages):  # (see _write: the mark covers a skipped row)
            self._save_seq_mark(self._seq_top)
        if journaled:
            self._db.execute(_SET_JOURNAL_MARK, (top,))

    # --- the lone-send journal (store/journal.py) ---

    def _journaled(self, messages: list[StoredMessage], held: list[WriteBatch]) -> bool:
        """(under the commit lock) A lone row whose body fits the ring,
        nothing owed to a sync: append it to the journal, synced, and owe
        its row (and a large body's segment write) to write_owed().  False:
        not that case, nothing done."""
        if (self._journal is None or len(messages) != 1 or self._wal_fd is None or self._seq_owed
                or self._sync_failed is not None or self._segments.unsynced
                or not self._journal.fits(len(messages[0].body) + len(messages[0].headers))
                or (held and held != self._owed_held and (self._owed or self._segments.holds_any()))):
            return False
        row = messages[0]
        record = self._journal.record(row.seq, list(row))
        try:
            if not self._journal.room(record):
                # Before the ring is written over: every record's row in the
                # database, and one sync of the WAL makes their marks durable.
                self._write_owed_locked()
                held = self._held_batches()  # (none: they went in with the rows)
                self._committed_gen += 1  # (their COMMITs, not synced: count them for the sync)
                self._sync_owed(self._committed_gen)
                self._journal.wrap()
            try:
                self._journal.append(record)
            except OSError as exc:
                with self._sync_lock:  # (its record may be on the disk in part: as a failed sync)
                    raise self._sync_fails(exc, "syncing the lone-send journal failed") from exc
        except SyncFailed as exc:
            raise StoreError(exc) from exc
        self._owed_held = held  # (deletes held for a later commit go in with the rows: acks need no sync)
        self._owed.append(row)
        self._owed_ids.add(row.msg_id)
        if len(row.body) >= self._threshold:
            self._owed_early.append(row)
        return True

    def write_owed(self, at_least: int = 1) -> None:
        """Write the journaled rows into the database, if at least
        `at_least` wait, in one transaction that is not synced.  The relay
        loop asks after each lone send's CONFIRM, with OWED_ROWS (one
        transaction for that many rows: its CPU per row a fraction of one
        each, its WAL frames too), and first thing in any turn that is not
        a lone send's (reads and other writes then find the rows where they
        look).  Its failure is a failed sync's (the rows are only in the
        journal now, which a restart writes in), but for a full disk's: the
        rows stay owed, and the relay's start-over writes them (rollback())."""
        if self._owed_early or len(self._owed) >= at_least > 0 or self._early_sync is not None:
            with self._commit_lock:
                if self._owed_early:
                    self._write_early()
                if at_least > 1 and (self._owed_places or self._early_sync is not None):
                    self._write_owed_behind(at_least)
                elif len(self._owed) >= at_least > 0:
                    self._write_owed_locked()

    def _write_owed_behind(self, at_least: int) -> None:
        """(write_owed() after a lone send's CONFIRM, with bodies written
        early) Their segment's sync runs in a thread, begun once `at_least`
        rows are owed (OWED_LARGE_ROWS at most), and the rows whose bodies it made durable are
        written by a later call, with no sync of their own: the loop never
        waits out the segment's sync (~250 µs for 16 bodies of 64 KiB,
        which the next lone send waited for; docs/performance.md,
        "Session 32")."""
        if self._early_sync is not None:
            if not self._early_sync[1].done():
                return  # (the rows wait for a later CONFIRM)
            self._early_synced()
            durable = self._segments.durable
            places = self._owed_places
            n = 0
            for row in self._owed:
                place = places.get(row.seq)
                if place is not None and not durable(place):
                    break
                n += 1
            if n:
                self._write_owed_locked(n)
            return
        if len(self._owed) < min(at_least, OWED_LARGE_ROWS):
            return
        job = self._segments.early_sync()
        if job is not None:
            try:
                if self._early_pool is None:
                    self._early_pool = ThreadPoolExecutor(1, thread_name_prefix="relay-segment-sync")
                self._early_sync = (job, self._early_pool.submit(job.run))
                return
            except RuntimeError as exc:  # (no thread to be had: the sync runs here, as before)
                job.close()
                if not self._early_pool_warned:
                    self._early_pool_warned = True
                    log.warning("lone sends' segment bodies are synced in the relay's loop: %s", exc)
        self._write_owed_locked()

    def _early_synced(self) -> None:
        """(under the commit lock) Wait for the thread's sync of bodies
        written early, and take its outcome; a failure is raised as that
        sync's in a commit would be (_write_owed_locked()): the rows stay
        owed on a full disk, and any other error is a failed sync's."""
        job, done = self._early_sync
        self._early_sync = None
        try:
            done.result()
            error = None
        except OSError as exc:
            error = exc
        failure = self._segments.early_synced(job, error)
        if failure is not None:
            exc = StoreError(failure)
            if exc.full:
                raise exc from failure
            raise self._owed_lost(exc) from failure

    def _write_early(self) -> None:
        """(under the commit lock) The large bodies of journaled rows, into
        a segment, not synced: the transaction that writes their rows
        syncs them first, so its commit has the sync alone left (an
        append's, 16 bodies at a time) and none waits before a CONFIRM.
        Bodies a segment will not take (a full disk, a directory the relay
        may not write) go into the database with their rows: confirmed
        already, they must not wait on the segments."""
        rows, self._owed_early = self._owed_early, []
        for i, row in enumerate(rows):
            try:
                self._owed_places[row.seq] = self._segments.write_early(row.body)
            except OSError as exc:
                self._owed_inline.update(r.seq for r in rows[i:])
                if not self._early_warned:
                    self._early_warned = True
                    log.warning("%s: lone sends' bodies go into the database until a segment takes them", exc)
                return
            self._early_warned = False

    def _write_owed_locked(self, first: int | None = None) -> None:
        """The rows owed into the database; `first`: only that many, whose
        bodies (if written early) are synced already (_write_owed_behind())."""
        if first is None and self._early_sync is not None:
            self._early_synced()
        owed, held = self._owed, self._owed_held
        if not owed:
            return
        if self._owed_early:
            self._write_early()
        rest = [] if first is None else owed[first:]
        owed = owed if first is None else owed[:first]
        self._owed, self._owed_held = rest, []
        if rest:
            self._owed_ids.difference_update(m.msg_id for m in owed)
        else:
            self._owed_ids.clear()
        if self._segments.early_failed:  # (another commit's segment sync failed over them)
            self._untrust_places()
        try:
            self._committed(lambda: self._write_lone(owed, held, None, journaled=True, synced=first is not None))
        except StoreError as exc:
            if self._segments.early_failed:  # (a failed COMMIT alone leaves them good, and synced)
                self._untrust_places()
            if exc.full:  # (they stay owed, durable in the journal: rollback() writes them, with the reserve)
                self._owed, self._owed_held = owed + self._owed, held
                self._owed_ids.update(m.msg_id for m in owed)
                raise
            raise self._owed_lost(exc) from exc
        if self._owed_places or self._owed_inline:
            places, inline = self._owed_places, self._owed_inline
            for m in owed:
                places.pop(m.seq, None)
                inline.discard(m.seq)
            self._segments.early_taken(list(places.values()))
        if held:
            with self._batches_lock:
                self._batches = [WriteBatch()]

    def _untrust_places(self) -> None:
        """A segment write or sync failed after bodies were written early:
        their bytes are not to be trusted, their rows keep the bodies."""
        self._owed_inline.update(self._owed_places)
        self._owed_places.clear()
        self._segments.early_taken()

    def mailboxes_of(self, msg_ids: list[bytes], every: bool = False) -> dict[bytes, int]:
        """As BatchedStore's; an id among the rows owed is looked up once
        they are written (an idempotent id sent again, one send at a time)."""
        if self._owed_ids and not self._owed_ids.isdisjoint(msg_ids):
            self.write_owed()
        return super().mailboxes_of(msg_ids, every)

    def rollback(self) -> bool:
        """As BatchedStore's; then the journaled rows still owed are written,
        since the relay starts over from what the database holds.  A full
        disk gets the reserve for them (then True: the relay refuses sends
        as on a full disk); a write that still fails is a failed sync's
        (they are in the journal alone: a restart writes them in)."""
        super().rollback()
        self._owed_held = []  # (rolled back with the batches: those acks come again)
        try:
            self.write_owed()
            return False
        except StoreError as exc:
            if not exc.full:
                raise
        # (not drop_reserve(): the checkpoint it wakes could take the room first)
        self._give_back_reserve()
        try:
            self.write_owed()
        except StoreError as exc:
            if not exc.full:
                raise
            raise self._owed_lost(exc) from exc
        self.retry_checkpoint()
        return True

    def _owed_lost(self, exc: StoreError) -> StoreError:
        """The journaled rows could not be written into the database: a
        failed sync's error (they are in the journal alone: the relay stops,
        and its restart writes them in)."""
        with self._sync_lock:
            return StoreError(self._sync_fails(exc, "writing journaled sends into the database failed"))

    def _replay_journal(self, data_dir: str) -> None:
        """(at start, at synchronous=FULL, before anything reads the store)
        Write in the journal's records above the durable mark
        (store/journal.py), synced, and open the ring to write from its
        start again.  A database without a journal id gets one: a journal
        found beside it holds nothing of its."""
        path = os.path.join(data_dir, JOURNAL_FILE)  # (a regular file, or none: checked at __init__)
        meta = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN ('journal', 'journal_id')"))
        mark = meta.get("journal", 0)
        owner = meta.get("journal_id")
        if owner is not None and mark and not os.path.exists(path):
            log.warning("%s is missing: lone sends the relay confirmed just before it last stopped, if it did "
                        "not stop cleanly, were in it (docs/operations.md, 'Data and durability')", path)
        # (a database with a mark and no id: the journal's first records, whose CRC covered no id)
        gaps: list[tuple[int, int, int]] = []
        records = [] if owner is None and not mark else read_records(path, b"" if owner is None else bytes(owner),
                                                                     gaps, mark)
        if gaps:
            _say_damage(path, records, gaps, mark)
        records = sorted((r for r in records if r[0] > mark), key=itemgetter(0))
        if records:
            self._write_in(records, data_dir)
        if owner is None:
            owner = os.urandom(ID_SIZE)
            try:
                self._db.execute("INSERT INTO meta VALUES ('journal_id', ?)", (owner,))
            except sqlite3.OperationalError as exc:
                if not is_disk_full(exc):
                    raise
                _no_room_for_journal(data_dir, exc)
                return
        # The mark read here must be durable before the ring is written
        # over: a start's checkpoint that could not copy the WAL left it
        # there, perhaps in the page cache alone.
        try:
            sync_path(self.path + "-wal", 0, os.fdatasync)
        except FileNotFoundError:
            pass
        try:
            self._journal = Journal(data_dir, owner)
        except OSError as exc:
            if not is_disk_full(exc):
                raise StartupError(f"cannot open {path}: {exc.strerror}") from None
            _no_room_for_journal(data_dir, exc.strerror)

    def _write_in(self, records: list[tuple[int, list]], data_dir: str) -> None:
        """(_replay_journal) Insert the records' rows, and move the mark to
        the last; on a full disk, once more with the reserve given back."""
        known = {r[0] for r in self._db.execute("SELECT id FROM mailboxes")}
        rows = [fields for _, fields in records if fields[1] in known]
        for _, fields in records:
            if fields[1] not in known:  # (not expected: a lone send's mailbox was committed before it)
                log.error("message %s (seq %d) in the lone-send journal is lost: its mailbox (id %d) "
                          "is not in the database", bytes(fields[2]).hex(), fields[0], fields[1])

        def write() -> int:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stored = _INSERT.run(self._db, [x for fields in rows for x in fields]) if rows else 0
                self._db.execute(_SET_JOURNAL_MARK, (records[-1][0],))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return stored

        try:
            stored = retry_busy(self.path, "writing in the lone-send journal", write)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            self._give_back_reserve()
            try:
                stored = retry_busy(self.path, "writing in the lone-send journal", write)
            except sqlite3.OperationalError as again:
                if not is_disk_full(again):
                    raise
                raise StartupError(f"{self.path}: no room to write in {len(rows)} message(s) from the lone-send "
                                   f"journal ({again}): free space, then start again") from None
        log.warning("%d message(s) from the lone-send journal were written into the database (the relay stopped "
                    "before it did; %d were there already)", len(rows), len(rows) - stored)

    def insert(self, messages: list[StoredMessage]) -> None:
        """As BatchedStore's, and the batch learns which ids may be stored
        already: a pack has no unique index to skip them (store/packs.py)."""
        ids = list(map(field_msg_id, messages))
        maybe = self._ids.maybe_stored(ids)
        self._ids.stored(ids)
        batch = self._batches[-1]
        if maybe:
            if batch.recheck is None:
                batch.recheck = set(maybe)
            else:
                batch.recheck.update(maybe)
        batch.insert(messages)

    def _commit_sealed(self, sealed: list[WriteBatch]) -> None:
        self._write_sealed(sealed)
        if self._tx_open:
            # the bodies first: a row never points at bytes not on disk
            self._committed(self._segments.sync, sync_later=True)

    def _committed(self, write, sync_later: bool = False) -> None:
        """(holding the commit lock) `write`, then COMMIT; a failure of
        either rolls back and raises StoreError.  sync_later: the WAL's
        sync may be left to commit(), after the lock (see _commit_tx)."""
        try:
            write()
            self._commit_tx(sync_later)
        except (sqlite3.Error, OSError) as exc:
            self._rollback_tx()
            raise StoreError(exc) from exc
        if self._seq_saved >= self._seq_owed:
            self._seq_owed = 0

    def _write_sealed(self, sealed: list[WriteBatch]) -> None:
        """Run the statements of the sealed batches not written yet, in order,
        in the open transaction (under the commit lock).  A failure undoes
        the transaction and raises StoreError; the batches stay."""
        try:
            self._packs.reload_if_stale(self._db)
            for batch in sealed:
                if not batch.written:
                    if not self._tx_open:
                        self._begin()
                        # Not synced until a batch writes more than acks (or the owed mark).
                        self._tx_synced = bool(self._seq_owed)
                        if self._seq_owed:
                            self._save_seq_mark(self._seq_owed)
                    if not self._tx_synced and (self._segments.holds_any()
                                                or any(kind != "delete" for kind, _ in batch.ops)):
                        self._tx_synced = True
                    self._write(batch)
                    batch.written = True
        except (sqlite3.Error, OSError) as exc:
            self._rollback_tx()
            raise StoreError(exc) from exc

    def _begin(self) -> None:
        # IMMEDIATE: take the write lock now, so a busy database is met (and
        # waited out) before any write of the transaction.
        self._execute_waiting("BEGIN IMMEDIATE", "starting a write")
        self._tx_open = True
        self._tx_synced = True
        self._seq_before = self._seq_saved
        self._seq_top_before = self._seq_top

    def _commit_tx(self, sync_later: bool = False) -> None:
        """COMMIT, and sync the WAL after it (see _sync_commits_ourselves):
        the sync is counted owed (_committed_gen) and run through
        _sync_owed(), here, under the commit lock, or, with sync_later and
        no segment's rows changed, by commit() once the lock is released,
        so that the next commit's writes and COMMIT overlap it.  Either way
        a failed sync fails every later one (BatchedStore.sync_failed).
        Bodies that this sync's flush makes durable (write_unsynced()) are
        waited for first, and the sync is then this commit's own."""
        self._execute_waiting("COMMIT", "committing")
        self._tx_open = False
        try:
            if self._tx_synced and self._wal_fd is not None:
                if self._segments.unsynced:
                    self._wait_unsynced()
                self._committed_gen += 1
                if not (sync_later and self._segments.settled()):
                    self._sync_owed(self._committed_gen)  # before a segment with no rows left is deleted
                    if self._segments.unsynced:
                        self._segments.flushed()
        finally:  # (a failed sync still leaves the transaction committed)
            self._segments.committed()
            if self._checkpoints is not None:
                self._checkpoints.committed(self._wal_bytes)
            self._wal_bytes = 0

    def _wait_unsynced(self) -> None:
        """(after the COMMIT of rows whose bodies Segments.write_unsynced()
        wrote) Wait until those bodies are on the device, before this
        commit is counted: a sync that counts it, this thread's or
        another's, then begins after, and its flush covers them.  A failed
        write fails this sync and every later one, as a failed sync does."""
        try:
            self._segments.wait_unsynced()
        except OSError as exc:
            with self._sync_lock:
                raise self._sync_fails(exc, "writing a message body failed") from exc

    def _sync_commits_ourselves(self) -> None:
        """From here on the writer runs at synchronous=NORMAL and _commit_tx
        syncs the WAL itself: after every COMMIT but those of a transaction
        of acks alone (deletes of rows kept in the database; no segment
        held).  Nothing waits on acks, and a crash that loses some only
        delivers those messages again, marked redelivered (contract line
        2); the WAL is appended in order, so the next sync makes them
        durable too.  SQLite will not change the level inside a
        transaction, and what one holds is known only at its COMMIT, hence
        the sync of our own: what FULL adds to NORMAL in WAL mode is that
        one sync of the WAL after a commit.  (NORMAL still syncs the WAL
        before a checkpoint and its header when the WAL restarts.)"""
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no WAL file to hold (not expected): SQLite's FULL stays
        self._wal_fd = fd
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _sync_wal(self) -> None:
        os.fdatasync(self._wal_fd)

    def _sync_committed(self) -> None:
        self._sync_wal()  # commit()'s, after the lock (store/batched.py)

    def _execute_waiting(self, sql: str, what: str) -> None:
        """Run `sql`; a database busy in another process is waited out."""
        try:
            self._db.execute(sql)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            retry_busy(self.path, what, lambda: self._db.execute(sql))

    def _rollback_tx(self) -> None:
        """Undo the open transaction (SQLite may have rolled back already: a
        full disk does that); its batches stay, to be written again."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback of %s failed: %s", self.path, exc)
        self._wal_bytes = 0
        if self._tx_open:
            self._seq_saved = self._seq_before
            self._seq_top = self._seq_top_before
            self._tx_open = False
        self._segments.rolled_back()
        for batch in self._pending():
            batch.written = False
        if self._packs is not None:
            try:
                self._packs.load(self._db)  # what the last commit left
            except sqlite3.Error as exc:  # (then the next write reads them first)
                self._packs.stale = True
                log.warning("re-reading the packs of %s failed: %s", self.path, exc)

    _drop_transaction = _rollback_tx  # rollback() (store/batched.py) undoes the transaction too

    # --- disk space (store/space.py) ---

    def space_available(self) -> bool:
        return space.space_available(os.path.dirname(self.path))

    def hold_reserve(self) -> bool:
        return space.hold_reserve(os.path.dirname(self.path))

    def space_low(self, margin: int = 0) -> bool:
        return space.space_low(os.path.dirname(self.path), self.path + "-wal", self._free_page_bytes, margin)

    def _free_page_bytes(self) -> int:
        """Bytes of the database's free pages (consumed messages' pages, which
        new ones fill before the file grows)."""
        try:
            (pages,), (size,) = (self._reader.execute(f"PRAGMA {p}").fetchone() for p in ("freelist_count",
                                                                                          "page_size"))
        except sqlite3.Error:
            return 0
        return pages * size

    def writable(self) -> bool:
        return self._segments.writable()

    def drop_reserve(self) -> None:
        self._give_back_reserve()
        self.retry_checkpoint()  # (its room may let the WAL go into the database)

    def _give_back_reserve(self) -> None:
        """The disk's reserve file and the spare segment, deleted: room for writes that must go in."""
        space.drop_reserve(os.path.dirname(self.path))
        self._segments.drop_spare()

    @property
    def checkpoint_out_of_space(self) -> bool:
        return self._checkpoints is not None and self._checkpoints.out_of_space

    def retry_checkpoint(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.retry()

    def _write(self, batch: WriteBatch) -> None:
        db = self._db
        threshold = self._threshold
        # max_seq() is max(the live rows' seqs, the meta mark).  A batch that
        # only adds rows, all of them stored, leaves its top seq live: the
        # mark need not move (a statement and a WAL page saved per commit of
        # a lone send).  A batch that deletes, or whose insert skipped a row,
        # writes the highest seq ever inserted.
        mark = bool(batch.deleted or batch.dropped)
        for kind, items in batch.statements():
            if kind == "insert":
                rows, skipped, packed_bytes = self._packs.store(db, items, threshold, batch.recheck)
                self._wal_bytes += packed_bytes
                stored = self._store_rows(rows)
                mark = mark or skipped or stored != len(rows)
            elif kind == "delete":  # acks come mostly in order: a run of seqs is one range delete
                seq_runs = self._packs.delete(db, runs(items))
                if seq_runs:
                    if self._segments.holds_any():
                        self._release_runs(seq_runs)
                    db.executemany("DELETE FROM messages WHERE seq>=? AND seq<=?", seq_runs)
            elif kind == "deliveries":
                items = self._packs.set_deliveries(db, items)
                if items:
                    db.executemany("UPDATE messages SET deliveries=? WHERE seq=?", items)
            elif kind == "mailbox":
                db.execute("INSERT OR REPLACE INTO mailboxes (id, name, options, declared) VALUES (?, ?, ?, ?)",
                           (items.id, items.name, msgpack.packb(items.options), int(items.declared)))
            elif kind == "drop_mailbox":
                self._packs.drop_mailbox(db, items)
                if self._segments.holds_any():
                    for seg, n in db.execute("SELECT seg, count(*) FROM messages WHERE mailbox=? "
                                             "AND seg IS NOT NULL GROUP BY seg", (items,)).fetchall():
                        self._segments.release(seg, n)
                db.execute("DELETE FROM messages WHERE mailbox=?", (items,))
                db.execute("DELETE FROM mailboxes WHERE id=?", (items,))
        if batch.top_seq > self._seq_top:
            self._seq_top = batch.top_seq
        if mark:
            self._save_seq_mark(self._seq_top)

    def _store_rows(self, rows: list[StoredMessage], checksums: bool = False) -> int:
        """INSERT rows not in packs: with their large bodies placed in a
        segment (_placed; written by the next Segments.sync() or
        write_unsynced(), the latter with `checksums`), else all in the
        database (_insert); how many were stored."""
        if not rows:
            return 0
        if max(map(len, map(field_body, rows))) >= self._threshold:
            return _INSERT_PLACED_ROWS.run(self._db, self._placed(rows, checksums))
        return self._insert(rows)

    def _insert(self, rows: list[StoredMessage]) -> int:
        """INSERT rows whose bodies stay in the database; how many were stored."""
        self._wal_bytes += sum(map(len, map(field_body, rows)))
        # A batch of usual rows (no headers, no expiry): its parameters made
        # in C, no loop here (for a lone send's row the loop below costs less).
        if len(rows) >= 8 and all(map(_PLAIN_EXTRAS.__eq__, map(_EXTRAS, rows))):
            return _INSERT_PLAIN.run(self._db, list(chain.from_iterable(map(_PLAIN_FIELDS, rows))))
        plain = [x for r in rows if r.expires is None and r.headers == b"" for x in _PLAIN_FIELDS(r)]
        if len(plain) == 6 * len(rows):
            return _INSERT_PLAIN.run(self._db, plain)
        stored = _INSERT.run(self._db, [x for r in rows if r.expires is not None or r.headers != b"" for x in r])
        return stored + (_INSERT_PLAIN.run(self._db, plain) if plain else 0)

    def _placed(self, rows: list[StoredMessage], checksums: bool) -> list:
        """The rows' parameters, flat, in _INSERT_PLACED's columns: a large body is placed in
        a segment and its row keeps where (and, with `checksums`, its CRC-32).  (A
        duplicate id, which the engine never inserts, would be ignored by
        SQLite and leave its segment counted one row too many until a restart.)"""
        threshold, append = self._threshold, self._segments.append
        early, inline = self._owed_places, self._owed_inline  # (journaled rows': see _write_early)
        out: list = []
        for r in rows:
            if inline and r.seq in inline:
                self._wal_bytes += len(r.body)
                out += (*r, None, None, None, None)
            elif len(r.body) >= threshold:
                place = early.get(r.seq) if early else None  # (a body written already)
                if place is None:
                    place = append(r.body)
                else:
                    self._segments.count(place[0])
                out += (r.seq, r.mailbox_id, r.msg_id, r.headers, b"", r.created, r.expires, r.deliveries,
                        *place, zlib.crc32(r.body) if checksums else None)
            else:
                out += (*r, None, None, None, None)
        return out

    def _release_runs(self, seq_runs: list[tuple[int, int]]) -> None:
        """Count, per segment, the rows these runs of seqs delete."""
        for i in range(0, len(seq_runs), ID_CHUNK // 2):
            chunk = seq_runs[i:i + ID_CHUNK // 2]
            where = " OR ".join(["seq BETWEEN ? AND ?"] * len(chunk))
            for seg, n in self._db.execute(f"SELECT seg, count(*) FROM messages WHERE seg IS NOT NULL "
                                           f"AND ({where}) GROUP BY seg", [s for run in chunk for s in run]):
                self._segments.release(seg, n)

    def close(self) -> None:
        try:
            if self._checkpoints is not None:
                self._checkpoints.close()
            if self._owed and self._sync_failed is None:
                self.write_owed()
            super().close()
        finally:
            if self._early_pool is not None:
                self._early_pool.shutdown()
            self._segments.close()
            if self._journal is not None:
                self._journal.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None



def _say_damage(path: str, records: list[tuple[int, list]], gaps: list[tuple[int, int, int]], mark: int) -> None:
    """(read_records()' gaps) Unreadable bytes in the journal that may
    have held a record above the mark: a damaged disk, not a crash (which
    tears only the record it was writing, with the lap before's records,
    all under the mark, after it).  A record there had a seq between
    those of the records on either side (a lap's seqs grow), so it was
    above the mark only if the one after the gap is above the mark and
    the one before, by more than one.  Such a record was a confirmed send,
    now lost: said, loudly."""
    damaged = []
    for offset, length, index in gaps:
        before = records[index - 1][0] if index else 0
        if records[index][0] > max(mark, before) + 1:
            damaged.append((offset, length))
    if not damaged:
        return
    newer = [seq for seq, _ in records if seq > mark]
    where = ", ".join(f"{length} bytes at offset {offset}" for offset, length in damaged[:5])
    log.error("%s is damaged (%s unreadable): lone sends confirmed after the damage (seq up to %d) are "
              "written in, but a send whose record was there is lost (docs/operations.md, 'Data and "
              "durability')", path, where, max(newer))


def _no_room_for_journal(data_dir: str, why) -> None:
    log.warning("no room for the lone-send journal in %s (%s): lone sends commit through the "
                "database until a restart finds room", data_dir, why)
