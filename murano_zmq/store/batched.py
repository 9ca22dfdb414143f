"""BatchedStore: what the SQL stores share around their write batches.

Writes go into the open WriteBatch (store/batch.py); reads ask the
database, then replay the batches not committed yet over the answer.  A
subclass (store/sqlite.py, store/postgresql.py) supplies its dialect: the
SQL text with its placeholder style, _query(), the few reads that differ
(_rows_at, _ids_at, _ready_rows), and how a commit writes (_commit_sealed,
_write).  Nothing here does I/O of its own.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

from .base import MailboxRow, StoredMessage, field_msg_id
from .faults import StoreError, SyncFailed
from .batch import WriteBatch, cap, dropped_mailboxes, find, hidden_count, inserted_rows, replay, visible


class BatchedStore:
    # What several relays sharing the database need (store/shared.py);
    # None: this relay owns its store.
    shared = None

    # SQL with "{not_dropped}" where _not_dropped()'s clause goes.
    _EXPIRED_SQL: str
    _NEXT_EXPIRY_SQL: str

    def __init__(self) -> None:
        # The open batch is the last; those before it are sealed.  The list
        # is replaced, never changed in place, so a reader's copy stays valid.
        self._batches: list[WriteBatch] = [WriteBatch()]
        self._batches_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._read_lock = threading.RLock()  # one statement at a time on the reader
        self._seq_saved = 0  # highest seq recorded in meta by this store
        # Commits whose sync comes after the commit lock is released (store/
        # sqlite.py: the WAL's), counted: how many have COMMITted, how many
        # a sync that began after their COMMIT has covered, and the error of
        # a failed one (every later _sync_owed() fails too, for this store's
        # life: the relay stops on it, relay/server.py Relay._halt).
        self._sync_lock = threading.Lock()
        self._committed_gen = 0
        self._synced_gen = 0
        self._sync_failed: Exception | None = None

    def _pending(self) -> list[WriteBatch]:
        with self._batches_lock:
            return self._batches

    # --- the dialect ---------------------------------------------------------------

    def _query(self, sql: str, args: tuple = ()) -> list:
        raise NotImplementedError

    def _first(self, sql: str, args: tuple, wanted: Callable[[tuple], bool]) -> tuple | None:
        """The first row of a query that `wanted` accepts (None: none)."""
        return next((r for r in self._query(sql, args) if wanted(r)), None)

    def _rows_at(self, seqs: list[int]) -> dict[int, StoredMessage]:
        """The committed rows of these seqs, by seq."""
        raise NotImplementedError

    def _ids_at(self, msg_ids: list[bytes]) -> list[tuple[int, int, bytes]]:
        """(seq, mailbox, msg_id) of the committed rows with these ids."""
        raise NotImplementedError

    def _ready_rows(self, mailbox_id: int, after_seq: int, limit: int, max_bytes: int | None,
                    wanted: int, batches: list[WriteBatch]) -> tuple[list[StoredMessage], int | None]:
        """load_ready()'s committed rows as the batches leave them, and the
        seq it stopped reading at (None: it read them all)."""
        raise NotImplementedError

    def _not_dropped(self, dropped: list[int]) -> tuple[str, tuple]:
        """The SQL that leaves these mailboxes out ("mailbox ..."), and its args."""
        raise NotImplementedError

    def _commit_sealed(self, sealed: list[WriteBatch]) -> None:
        """Write and commit these batches in one transaction (under the commit lock)."""
        raise NotImplementedError

    def _drop_transaction(self) -> None:
        """rollback(): undo what the open transaction holds (under the commit lock)."""

    def _check_schema(self, execute, mark: str, version: int, error: type[Exception]) -> None:
        """At start-up, in the writer's transaction: record the schema version
        in a new database, refuse one of another version."""
        row = execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            execute(f"INSERT INTO meta VALUES ('schema', {mark})", (version,))
        elif row[0] != version:
            raise error(f"{self.path}: schema version {row[0]}, this relay reads {version}")

    # --- reads ------------------------------------------------------------------

    def max_seq(self) -> int:
        """The highest seq ever stored: tags are never reused after a restart,
        so a late ACK cannot hit a newer message."""
        stored = self._query("SELECT coalesce(max(seq), 0) FROM messages")[0][0]
        row = self._query("SELECT value FROM meta WHERE key='seq'")
        return max(stored, row[0][0] if row else 0)

    def get(self, seq: int) -> StoredMessage | None:
        found = self.get_many([seq])
        return found[0] if found else None

    def get_many(self, seqs: list[int]) -> list[StoredMessage]:
        batches = self._pending()
        on_disk = self._rows_at(seqs)
        rows = (find(seq, on_disk.get(seq), batches) for seq in sorted(set(seqs)))
        return [r for r in rows if r is not None]

    def mailboxes_of(self, msg_ids: list[bytes], every: bool = False) -> dict[bytes, int]:
        """every: look each id up (else ids above the ceiling are surely new)."""
        maybe = list(msg_ids) if every else self._ids.maybe_stored(msg_ids)
        if not maybe:
            return {}
        batches = self._pending()
        found: dict[bytes, int] = {}
        for seq, mailbox, msg_id in self._ids_at(maybe):
            if visible(seq, mailbox, batches):
                found[msg_id] = mailbox
        for i, b in enumerate(batches):
            for msg_id in maybe:
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
            rows, stopped_at = self._ready_rows(mailbox_id, after_seq, limit, max_bytes, wanted, batches)
        more = [r for r in inserted_rows(batches, mailbox_id) if r.seq > after_seq
                and (stopped_at is None or r.seq < stopped_at)]
        if more:
            if rows:  # a commit that ended after _pending() put a batch's rows on disk too
                on_disk = {r.seq for r in rows}
                more = [r for r in more if r.seq not in on_disk]
            rows = sorted(rows + more, key=lambda r: r.seq)
        return cap(rows, limit, max_bytes)

    def expired(self, now: float, limit: int, after: tuple[float, int] | None = None
                ) -> list[tuple[float, int, int]]:
        batches = self._pending()
        start = after or (float("-inf"), -1)
        clause, dropped = self._not_dropped(dropped_mailboxes(batches))
        found = [
            (expires, seq, mailbox)
            for expires, seq, mailbox in self._query(
                self._EXPIRED_SQL.format(not_dropped=clause),
                (now, start[0], start[1], *dropped, limit + hidden_count(batches)))
            if visible(seq, mailbox, batches)
        ]
        found += [(r.expires, r.seq, r.mailbox_id) for r in inserted_rows(batches)
                  if r.expires is not None and r.expires <= now and (r.expires, r.seq) > start]
        return sorted(set(found))[:limit]  # (a row both on disk and in a batch: see load_ready)

    def next_expiry(self, after: float) -> float | None:
        batches = self._pending()
        clause, dropped = self._not_dropped(dropped_mailboxes(batches))
        first = self._first(self._NEXT_EXPIRY_SQL.format(not_dropped=clause),
                            (after, *dropped, 1 + hidden_count(batches)), lambda r: visible(r[1], r[2], batches))
        found = first[0] if first is not None else None
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
        self._ids.stored(list(map(field_msg_id, messages)))
        self._batches[-1].insert(messages)

    def delete(self, seqs: Iterable[int]) -> None:
        self._batches[-1].delete(seqs)

    def set_deliveries(self, counts: Iterable[tuple[int, int]]) -> None:
        self._batches[-1].set_deliveries(counts)

    # --- commit -------------------------------------------------------------------

    def _seal_open(self) -> bool:
        """Close the open batch, if it holds anything (then True)."""
        with self._batches_lock:
            if not self._batches[-1]:
                return False
            self._batches = [*self._batches, WriteBatch()]
            return True

    def seal(self) -> None:
        self._seal_open()

    def open_deletes(self) -> int | None:
        """How many rows the open batch deletes, if deletes are all it
        holds (acks, expiries); None if it holds anything else."""
        return _deletes_alone(self._batches[-1])

    def held_deletes(self) -> int | None:
        """How many rows the batches not committed yet delete, if deletes
        are all they hold; None if they hold anything else."""
        total = 0
        for batch in self._pending():
            deletes = _deletes_alone(batch)
            if deletes is None:
                return None
            total += deletes
        return total

    @property
    def in_transaction(self) -> bool:
        """True while sealed writes wait for commit()."""
        return len(self._batches) > 1

    def writable(self) -> bool:
        """(a probe, while the relay refuses sends for failed writes) Can
        the store write files now?  The SQL server's business but for the
        SQLite store's segment files."""
        return True

    def space_low(self, margin: int = 0) -> bool:
        """Is the store's disk nearly full (store/space.py SPACE_LOW_BYTES)?
        (A server's disk is the server's business.)"""
        return False

    @property
    def checkpoint_out_of_space(self) -> bool:
        """The store's last checkpoint found no room on its disk (SQLite's
        WAL; a server's disk is the server's business)."""
        return False

    def retry_checkpoint(self) -> None:
        """Checkpoint again soon (the relay gave back its reserve)."""

    def check_held(self, now: float) -> float:
        """(the relay loop, between commits) Check that the store is still
        this relay's; when to ask again (time.time()).  Only a store held
        through a session (PostgreSQL's relay lock) can lose it unseen."""
        return math.inf

    @property
    def writing(self) -> bool:
        """True while a commit's writes or COMMIT (or the checkpointer's
        locked step) hold the writer: a commit now would wait for them.
        False while a commit only waits for its sync."""
        return self._commit_lock.locked()

    def commit(self) -> None:
        """Commit the sealed batches; return once they are durable.  Their
        sync may run after the commit lock is released, so the next commit
        writes while this one syncs (each returns after a sync that began
        after every COMMIT before its return, its own among them)."""
        with self._commit_lock:
            sealed = self._pending()[:-1]
            if sealed:
                self._commit_sealed(sealed)  # (a failure raises: the batches stay)
                with self._batches_lock:
                    self._batches = self._batches[len(sealed):]
            # Every COMMIT so far, this one's or another's: a commit with
            # nothing to sync (acks alone, or its batches taken by another
            # commit) may still hold replies for what an earlier COMMIT
            # wrote (a resend found stored, a DECLARE of a mailbox there).
            gen = self._committed_gen
        try:
            self._sync_owed(gen)
        except OSError as exc:
            raise StoreError(exc) from exc

    def _sync_owed(self, gen: int) -> None:
        """Return once the COMMITs counted up to `gen` are durable: a sync
        that began after they returned, this thread's or another's.  A
        failed sync raises SyncFailed here, and so does every later call,
        rollback() or not: the WAL may hold a hole under what came after it,
        and a later sync that succeeds does not prove the pages it lost."""
        if self._synced_gen >= gen and self._sync_failed is None:
            return
        with self._sync_lock:
            if self._sync_failed is not None:
                raise SyncFailed(f"an earlier sync of the store failed: {self._sync_failed}")
            if self._synced_gen >= gen:
                return
            target = self._committed_gen  # every COMMIT counted here has returned
            try:
                self._sync_committed()
            except OSError as exc:
                raise self._sync_fails(exc, "syncing the store failed") from exc
            self._synced_gen = target

    def _sync_fails(self, exc: OSError, what: str) -> SyncFailed:
        """(holding _sync_lock) A sync failed: so does every later one (see
        _sync_owed).  The error to raise."""
        if self._sync_failed is None:
            self._sync_failed = exc
        return SyncFailed(f"{what}: {exc}")

    def _sync_committed(self) -> None:
        """The sync that makes what has been COMMITted durable (only a
        dialect whose commits count _committed_gen up is asked)."""
        raise NotImplementedError

    def commit_insert(self, messages: list[StoredMessage]) -> None:
        self.insert(messages)
        self.seal()
        self.commit()

    def write_owed(self, at_least: int = 1) -> None:
        """Nothing owed: only the SQLite store's journal owes writes."""

    def rollback(self) -> bool:
        """Drop every write since the last commit, written or buffered (the
        relay does this after a StoreError, then starts over from the store).
        A failed sync stays failed (sync_failed).  True: the disk's reserve
        went to writes it kept (the SQLite store's journaled rows)."""
        with self._commit_lock:
            self._drop_transaction()
            with self._batches_lock:
                self._batches = [WriteBatch()]
        return False

    @property
    def sync_failed(self) -> Exception | None:
        """The error of a sync of COMMITted writes that failed, if one did:
        this store confirms nothing more (every later commit fails)."""
        return self._sync_failed

    def close(self) -> None:
        """Commit what is sealed and close.  After a failed sync: neither.
        Nothing more is committed, and the connections stay open: closing
        the last one would make SQLite copy the WAL into the database,
        reading pages the disk may not hold without the checksums its
        recovery checks (the relay's process ends instead: run_relay)."""
        if self._sync_failed is not None:
            return
        try:
            self.seal()
            self.commit()
        finally:
            self._reader.close()
            self._db.close()


def _deletes_alone(batch: WriteBatch) -> int | None:
    """How many rows `batch` deletes, if deletes are all it holds; None if
    it holds anything else."""
    ops = batch.ops
    if all(kind == "delete" for kind, _ in ops):
        return sum(len(seqs) for _, seqs in ops)
    return None
