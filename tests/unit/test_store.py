"""The store contract: every test runs against SQLiteStore (files in tmp_path;
once with its defaults, once with every body but the smallest in segment
files, store/segments.py, and once with every run of rows that can be
stored as a pack, store/packs.py)
and PostgresStore (a schema of its own on the session's PostgreSQL server,
tests/pgserver.py), the model test included.

Crash tests with kill -9 of a real relay live with the integration tests;
here a "crash" closes the store's connections without a commit, which is
what the process dying does to buffered writes and an open transaction.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import sqlite3
import threading

import pytest

from murano_zmq.protocol.errors import StartupError
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.store import segments as segments_module
from murano_zmq.store.journal import OWED_ROWS
from murano_zmq.store.schema import SCHEMA, SCHEMA_VERSION
from murano_zmq.store.segments import SEGMENT_DIR, SPARE_NAME, THRESHOLD, ZERO_AHEAD
from murano_zmq.store.sqlite import SQLiteStore, StoreError
from tests.helpers import segment_files, without_journal

try:
    import psycopg
except ImportError:  # the postgresql cases skip (conftest.pg_server)
    psycopg = None

# What a store whose connections were closed (a "crash") raises on close().
CLOSED = (sqlite3.ProgrammingError,) + ((psycopg.OperationalError,) if psycopg else ())

MAILBOX_IDS = (1, 2, 3)

# The sqlite-segments backend: bodies this long and up go to segment files
# (msg()'s b"body" among them; the model's bodies mix both).
SEGMENT_THRESHOLD = 4


def msg(seq, mailbox=1, msg_id=None, body=b"body", expires=None, deliveries=0, headers=b"\x80",
        created=1.0):
    if msg_id is None:
        msg_id = seq.to_bytes(16, "big")
    return StoredMessage(seq, mailbox, msg_id, headers, body, created, expires, deliveries)


class Backend:
    """Opens a store of one kind at a place named by a key (a directory for
    SQLite, a schema for PostgreSQL); the same key opens the same data."""

    def __init__(self, kind: str, pg_server=None):
        self.kind = kind
        self.pg_server = pg_server
        self._schemas: dict[str, str] = {}

    def open(self, where, exclusive: bool = True):
        """exclusive=False: a second store on the same data, beside a relay's."""
        if self.kind == "sqlite":
            return SQLiteStore(str(where))
        if self.kind == "sqlite-segments":  # every body of 4 bytes and up in a segment file
            return SQLiteStore(str(where), segment_threshold=SEGMENT_THRESHOLD)
        if self.kind == "sqlite-packs":  # every run of two rows and more that can be is a pack
            return SQLiteStore(str(where), pack_min_rows=2)
        from murano_zmq.store.postgresql import PostgresStore

        from tests.pgserver import new_schema, with_schema

        dsn = self.pg_server.dsn()
        if str(where) not in self._schemas:
            self._schemas[str(where)] = new_schema(dsn)
        return PostgresStore(with_schema(dsn, self._schemas[str(where)]), exclusive=exclusive)


@pytest.fixture(params=["sqlite", "sqlite-segments", "sqlite-packs", "postgresql"])
def backend(request) -> Backend:
    if request.param.startswith("sqlite"):
        return Backend(request.param)
    return Backend("postgresql", request.getfixturevalue("pg_server"))


@pytest.fixture
def open_store(backend, tmp_path):
    """open_store() opens this test's store (again)."""
    return lambda exclusive=True: backend.open(tmp_path, exclusive)


def crash(store) -> None:
    """Lose the buffered writes the way a dead process does: the connections
    go away without a commit."""
    store._reader.close()
    store._db.close()


def flush(store) -> None:
    """Seal and commit, in this thread (what engine.commit() does)."""
    store.seal()
    store.commit()


@pytest.fixture
def store(open_store):
    s = open_store()
    yield s
    try:
        s.close()
    except CLOSED:
        pass  # crashed on purpose


# --- examples --------------------------------------------------------------------------


def test_empty_store(store):
    assert store.load_mailboxes() == []
    assert store.mailbox_stats() == {}
    assert store.max_seq() == 0
    assert store.load_ready(1, 0, 10) == []
    assert store.expired(1e9, 10) == []
    assert store.next_expiry(float("-inf")) is None
    assert store.get(1) is None
    assert store.get_many([1, 2]) == []
    assert store.mailboxes_of([b"x" * 16]) == {}


def test_reads_see_writes_before_and_after_the_commit(store):
    store.insert([msg(1), msg(2, mailbox=2)])
    store.delete([1])
    assert store.get(1) is None and store.get(2) == msg(2, mailbox=2)
    assert store.mailboxes_of([msg(1).msg_id, msg(2).msg_id]) == {msg(2).msg_id: 2}
    flush(store)
    assert store.get(1) is None and store.get(2) == msg(2, mailbox=2)
    assert store.mailboxes_of([msg(1).msg_id, msg(2).msg_id]) == {msg(2).msg_id: 2}


def test_a_duplicate_id_is_skipped_at_commit(store):
    store.insert([msg(1)])
    flush(store)
    store.insert([msg(3, msg_id=msg(1).msg_id), msg(4)])  # a caller's mistake: skipped
    flush(store)
    assert [m.seq for m in store.load_ready(1, 0, 100)] == [1, 4]


def test_an_id_is_free_again_once_deleted(store):
    store.insert([msg(1, msg_id=b"a" * 16)])
    flush(store)
    store.delete([1])
    assert store.mailboxes_of([b"a" * 16]) == {}
    store.insert([msg(2, msg_id=b"a" * 16)])
    assert store.mailboxes_of([b"a" * 16, b"b" * 16]) == {b"a" * 16: 1}
    flush(store)
    assert store.mailboxes_of([b"a" * 16, b"b" * 16]) == {b"a" * 16: 1}
    assert [m.seq for m in store.load_ready(1, 0, 10)] == [2]


@pytest.mark.parametrize("committed", [False, True])
def test_load_ready_after_and_limit(store, committed):
    store.insert([msg(s, mailbox=1 + s % 2) for s in range(1, 21)])
    if committed:
        flush(store)
    odd = store.load_ready(2, 0, 100)
    assert [m.seq for m in odd] == list(range(1, 21, 2))
    assert [m.seq for m in store.load_ready(2, 5, 3)] == [7, 9, 11]
    assert store.load_ready(2, 19, 10) == []
    assert store.load_ready(99, 0, 10) == []


@pytest.mark.parametrize("count", [3, 20])
def test_rows_committed_while_a_read_runs_are_read_once(store, count):
    """A read takes the batches, then asks the database: a commit that
    ends between the two (the committer thread's) puts the same rows in
    both, and the read returns each once."""
    store.insert([msg(s, expires=5.0 + s) for s in range(1, count + 1)])
    store.seal()
    taken = store._pending()
    store.commit()
    store._pending = lambda: taken  # (what the read took before the commit ended)
    try:
        assert [m.seq for m in store.load_ready(1, 0, 100)] == list(range(1, count + 1))
        assert [seq for _, seq, _ in store.expired(1000.0, 100)] == list(range(1, count + 1))
    finally:
        del store._pending


def test_load_ready_stops_at_max_bytes(store):
    store.insert([msg(s, body=b"x" * 100) for s in range(1, 6)])
    flush(store)
    store.insert([msg(s, body=b"y" * 100) for s in range(6, 9)])
    assert [m.seq for m in store.load_ready(1, 0, 100, 250)] == [1, 2, 3]
    assert [m.seq for m in store.load_ready(1, 0, 100, 1)] == [1]  # one at least
    assert [m.seq for m in store.load_ready(1, 4, 100, 250)] == [5, 6, 7]  # disk, then batch
    store.delete([2, 3])
    assert [m.seq for m in store.load_ready(1, 0, 100, 250)] == [1, 4, 5]


def test_fields_round_trip_exactly(store):
    m = StoredMessage(7, 3, bytes(range(16)), b"\x81\xa1k\xa1v", b"\x00\xff" * 100, 1234.5678, 99.25, 4)
    store.insert([m])
    flush(store)
    assert store.get(7) == m
    assert store.load_ready(3, 0, 1) == [m]
    assert isinstance(store.get(7).body, bytes) and isinstance(store.get(7).msg_id, bytes)


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 127, 200, 500])
def test_a_commit_of_many_rows_of_every_shape_stores_each_exactly(store, count):
    """The SQLite store inserts many rows per statement (MultiRowInsert):
    every row, of each shape (plain, with headers, with an expiry, large),
    comes back as it went in, a duplicate among them skipped."""
    rows = [StoredMessage(seq, 1 + seq % 3, seq.to_bytes(16, "big"),
                          b"\x81\xa1k\xa1v" if seq % 4 == 1 else b"",
                          bytes([seq % 256]) * (5 if seq % 5 else 9000), 1000.0 + seq,
                          2000.5 + seq if seq % 3 == 2 else None, seq % 2)
            for seq in range(1, count + 1)]
    store.insert(rows)
    flush(store)
    assert store.get_many([r.seq for r in rows]) == rows
    store.insert([msg(count + 1, msg_id=rows[0].msg_id), msg(count + 2)])  # the first id again: skipped
    flush(store)
    assert store.get(count + 1) is None and store.get(count + 2) == msg(count + 2)
    assert sum(len(store.load_ready(mb, 0, 1000)) for mb in MAILBOX_IDS) == count + 1


def test_start_up_reads_see_the_last_commit(store):
    store.insert([msg(1, 1, body=b"aa"), msg(2, 2, body=b"bbb"), msg(3, 1, body=b"c"), msg(4, 1, body=b"")])
    assert store.mailbox_stats() == {} and store.max_seq() == 0
    flush(store)
    assert store.mailbox_stats() == {1: (3, 3), 2: (1, 3)}
    assert store.max_seq() == 4
    store.delete([3])
    flush(store)
    assert store.mailbox_stats() == {1: (2, 2), 2: (1, 3)}


def _assert_reopened_empty_at(open_store, top: int) -> None:
    """Opened again: no message left, and max_seq() still at `top`."""
    s = open_store()
    try:
        assert s.mailbox_stats() == {}
        assert s.max_seq() == top
    finally:
        s.close()


def test_max_seq_is_a_high_water_mark(open_store):
    # Tags are seqs: a seq must never be reused after a restart, or a late
    # ACK from before it could delete a newer message.
    s = open_store()
    s.insert([msg(1), msg(2), msg(3)])
    s.delete([2, 3])
    flush(s)
    assert s.max_seq() == 3
    s.delete([1])
    s.close()
    _assert_reopened_empty_at(open_store, 3)


def test_max_seq_when_the_top_row_goes_after_commits_that_only_added(open_store):
    # Commits that only add rows leave the seq mark alone (their top seq is
    # live); the later commit that deletes the top row, after a restart
    # too, must still leave max_seq() at it.
    s = open_store()
    s.insert([msg(1), msg(2)])
    flush(s)
    s.insert([msg(3)])
    flush(s)
    s.close()
    s = open_store()
    s.delete([3])
    flush(s)
    s.delete([1, 2])
    s.close()
    _assert_reopened_empty_at(open_store, 3)


def test_max_seq_counts_skipped_duplicates(open_store):
    s = open_store()
    s.insert([msg(1, msg_id=b"d" * 16)])
    flush(s)
    s.insert([msg(2, msg_id=b"d" * 16)])
    s.close()
    s = open_store()
    try:
        assert s.max_seq() == 2
    finally:
        s.close()


def test_max_seq_mark_lost_with_its_batch(open_store):
    s = open_store()
    s.insert([msg(1)])
    flush(s)
    s.insert([msg(2), msg(3)])
    s.delete([2, 3])
    s.seal()
    crash(s)
    s = open_store()
    try:
        assert s.max_seq() == 1
    finally:
        s.close()


def test_in_transaction_means_sealed_writes_wait(store):
    assert not store.in_transaction
    store.insert([msg(1)])
    assert not store.in_transaction  # open batch: not for the next commit yet
    store.commit()
    assert store.mailbox_stats() == {}  # nothing sealed, nothing committed
    store.seal()
    assert store.in_transaction
    store.commit()
    assert not store.in_transaction
    assert store.mailbox_stats() == {1: (1, 4)}
    store.seal()
    assert not store.in_transaction  # an empty batch is not sealed


def test_commit_takes_only_sealed_batches(store):
    store.insert([msg(1)])
    store.seal()
    store.insert([msg(2)])  # the next turn's writes, after the seal
    store.commit()
    assert store.mailbox_stats() == {1: (1, 4)}
    assert [m.seq for m in store.load_ready(1, 0, 10)] == [1, 2]
    flush(store)
    assert store.mailbox_stats() == {1: (2, 8)}


def test_a_move_in_one_batch_is_one_commit(open_store):
    """Delete in one mailbox and insert in another in the same batch: a
    crash keeps the message in one place or the other (issue 12, item 1)."""
    s = open_store()
    s.save_mailbox(MailboxRow(1, "work", {"dead_letter": "dlq"}, True))
    s.insert([msg(1)])
    flush(s)
    s.delete([1])  # a reject ...
    s.save_mailbox(MailboxRow(2, "dlq", {}, False))  # ... into a new mailbox
    s.insert([msg(2, mailbox=2, msg_id=msg(1).msg_id)])
    s.seal()
    crash(s)
    s = open_store()
    try:
        assert [(m.seq, m.mailbox_id) for m in s.load_ready(1, 0, 10) + s.load_ready(2, 0, 10)] == [(1, 1)]
    finally:
        s.close()


class _SlowCommit:
    """The writer connection, with a COMMIT that holds on as an fsync would."""

    def __init__(self, db):
        self.db = db
        self.syncing, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.db, name)

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.syncing.set()
            assert self.release.wait(10)
        return self.db.execute(sql, *args)


@pytest.mark.parametrize("written_at_seal", [True, False])
def test_reads_do_not_wait_for_a_commit_in_flight(store, written_at_seal):
    store.insert([msg(1)])
    flush(store)
    slow = store._db = _SlowCommit(store._db)
    store.insert([msg(2)])
    if written_at_seal:
        store.seal()  # no commit running: the statements run now, in this thread
    else:
        with store._commit_lock:  # a commit running: they wait for commit()
            store.seal()
    committer = threading.Thread(target=store.commit)
    committer.start()
    try:
        assert slow.syncing.wait(10)
        # Meanwhile the loop reads and writes: nothing here waits.
        assert [m.seq for m in store.load_ready(1, 0, 10)] == [1, 2]
        store.insert([msg(3)])
        store.delete([1])
        assert store.get(1) is None and store.get(3) == msg(3)
        assert [m.seq for m in store.load_ready(1, 0, 10)] == [2, 3]
        assert store.mailboxes_of([msg(2).msg_id]) == {msg(2).msg_id: 1}
        store.seal()  # a commit is running: this batch waits for the next one
    finally:
        slow.release.set()
        committer.join(10)
    assert [m.seq for m in store.load_ready(1, 0, 10)] == [2, 3]
    assert store.mailbox_stats() == {1: (2, 8)}  # the first commit: 1 and 2
    store.commit()
    assert store.mailbox_stats() == {1: (2, 8)}  # the second: 3 in, 1 out
    assert [m.seq for m in store.load_ready(1, 0, 10)] == [2, 3]


def test_a_failed_commit_keeps_its_batches_for_the_next(store):
    if not isinstance(store, SQLiteStore):
        pytest.skip("SQLite's failure path; PostgreSQL's is in tests/postgresql/test_store_pg.py")
    store.insert([msg(1)])
    store.seal()

    class Failing(_SlowCommit):
        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    real = store._db
    store._db = Failing(real)
    with pytest.raises(StoreError, match="full") as info:
        store.commit()
    assert info.value.full
    store._db = real
    assert store.in_transaction and store.get(1) == msg(1)
    store.commit()
    assert store.mailbox_stats() == {1: (1, 4)} and store.max_seq() == 1


def test_set_deliveries(store):
    store.insert([msg(1), msg(2)])
    store.set_deliveries([(3, 1), (5, 2), (9, 404)])
    assert store.get(1).deliveries == 3
    assert store.get(2).deliveries == 5
    flush(store)
    store.set_deliveries([(7, 1)])
    assert store.get(1).deliveries == 7
    assert [m.deliveries for m in store.get_many([2, 1])] == [7, 5]


@pytest.mark.parametrize("committed", [False, True])
def test_expired_and_next_expiry(store, committed):
    store.insert([msg(1, expires=30.0), msg(2, expires=10.0), msg(3), msg(4, 2, expires=20.0),
                  msg(5, expires=20.0)])
    if committed:
        flush(store)
    assert store.expired(9.9, 10) == []
    assert store.expired(10.0, 10) == [(10.0, 2, 1)]
    assert store.expired(25.0, 10) == [(10.0, 2, 1), (20.0, 4, 2), (20.0, 5, 1)]  # by expiry, then seq
    assert len(store.expired(100.0, 2)) == 2
    # `after` pages past the first ones (the relay pages past those a consumer holds)
    assert store.expired(100.0, 2, (20.0, 4)) == [(20.0, 5, 1), (30.0, 1, 1)]
    assert store.expired(100.0, 10, (30.0, 1)) == []
    assert store.next_expiry(float("-inf")) == 10.0
    assert store.next_expiry(10.0) == 20.0
    assert store.next_expiry(20.0) == 30.0
    assert store.next_expiry(30.0) is None
    store.delete([2])
    assert store.expired(10.0, 10) == []
    assert store.next_expiry(float("-inf")) == 20.0
    store.delete([4, 5])  # (not committed: the read passes over them to the first row left)
    assert store.next_expiry(float("-inf")) == 30.0
    store.delete([1])
    assert store.next_expiry(float("-inf")) is None


def test_mailboxes_round_trip_and_delete(store):
    row = MailboxRow(1, "agent.e.u", {"ttl": 60.0, "overflow": "drop-head", "dead_letter": "dlq"}, True)
    store.save_mailbox(row)
    store.save_mailbox(MailboxRow(2, "conductor", {}, False))
    store.insert([msg(1, 1), msg(2, 2), msg(3, 1)])
    flush(store)
    assert store.load_mailboxes() == [row, MailboxRow(2, "conductor", {}, False)]
    # save again replaces (a send-created mailbox later declared)
    store.save_mailbox(MailboxRow(2, "conductor", {"max_length": 5}, True))
    flush(store)
    assert store.load_mailboxes()[1] == MailboxRow(2, "conductor", {"max_length": 5}, True)
    store.delete_mailbox(1)
    assert store.get(1) is None and store.get(3) is None and store.load_ready(1, 0, 10) == []
    flush(store)
    assert [r.id for r in store.load_mailboxes()] == [2]
    assert store.mailbox_stats() == {2: (1, 4)}
    assert store.get(1) is None and store.get(3) is None


def test_reopen_after_commit_sees_the_same(open_store):
    s = open_store()
    s.save_mailbox(MailboxRow(1, "mb", {"ttl": 5.0}, True))
    rows = [msg(i, expires=float(i)) for i in range(1, 6)]
    s.insert(rows)
    s.delete([2])
    flush(s)
    s.close()
    s = open_store()
    try:
        assert s.load_mailboxes() == [MailboxRow(1, "mb", {"ttl": 5.0}, True)]
        assert s.load_ready(1, 0, 10) == [r for r in rows if r.seq != 2]
        assert s.max_seq() == 5
    finally:
        s.close()


def test_close_commits(open_store):
    s = open_store()
    s.insert([msg(1)])
    s.close()
    s = open_store()
    assert s.max_seq() == 1
    s.close()


def test_uncommitted_writes_invisible_to_another_connection(open_store):
    s = open_store()
    s.insert([msg(1)])
    flush(s)
    s.insert([msg(2)])
    s.delete([1])
    other = open_store(exclusive=False)  # a reader: sees the last commit only
    try:
        assert [m.seq for m in other.load_ready(1, 0, 10)] == [1]
        flush(s)
        assert [m.seq for m in other.load_ready(1, 0, 10)] == [2]
    finally:
        other.close()
        s.close()


def test_uncommitted_writes_lost_on_crash(open_store):
    s = open_store()
    s.save_mailbox(MailboxRow(1, "kept", {}, False))
    s.insert([msg(1)])
    flush(s)
    s.save_mailbox(MailboxRow(2, "lost", {}, False))
    s.insert([msg(2)])
    s.delete([1])
    crash(s)
    s = open_store()
    try:
        assert [r.name for r in s.load_mailboxes()] == ["kept"]
        assert [m.seq for m in s.load_ready(1, 0, 10)] == [1]
    finally:
        s.close()


def test_uncommitted_writes_lost_when_object_dropped(open_store):
    s = open_store()
    s.insert([msg(1)])
    flush(s)
    s.insert([msg(2)])
    s.seal()
    del s  # no commit, no close
    gc.collect()
    s = open_store()
    try:
        assert s.max_seq() == 1
    finally:
        s.close()


def test_wal_and_synced_commits(tmp_path, monkeypatch):
    """WAL mode; the writer at NORMAL syncs the WAL itself after each COMMIT
    (what FULL adds), but not after one of acks (deletes) alone."""
    store = SQLiteStore(str(tmp_path))
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        store.insert([msg(1), msg(2)])
        flush(store)
        assert synced == [store._wal_fd]
        store.delete([1])
        flush(store)
        assert synced == [store._wal_fd]  # acks alone: no sync
        store.delete([2])
        store.insert([msg(3)])
        flush(store)
        assert synced == [store._wal_fd] * 2
    finally:
        store.close()
    reopened = SQLiteStore(str(tmp_path))  # what the acks-only commit deleted stays deleted
    try:
        assert reopened.get(1) is None and reopened.get(2) is None and reopened.get(3) == msg(3)
    finally:
        reopened.close()


def test_other_schema_version_refused(tmp_path):
    SQLiteStore(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / SQLiteStore.DB_NAME)
    db.execute("UPDATE meta SET value=99 WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(StartupError, match="schema version 99"):
        SQLiteStore(str(tmp_path))


# --- the model -------------------------------------------------------------------------

ids = st.binary(min_size=16, max_size=16)
times = st.floats(min_value=0, max_value=1000, allow_nan=False)
row_specs = st.fixed_dictionaries({
    "mailbox": st.sampled_from(MAILBOX_IDS),
    "id": st.one_of(ids, st.integers(0, 50)),  # an int picks an id already used (maybe live)
    "headers": st.binary(max_size=8),
    "body": st.binary(max_size=24),
    "created": times,
    "expires": st.one_of(st.none(), times),
    "deliveries": st.integers(0, 5),
})
options_maps = st.fixed_dictionaries({}, optional={
    "ttl": st.floats(0.5, 100), "max_length": st.integers(0, 10), "overflow": st.sampled_from(["reject", "drop-head"]),
    "dead_letter": st.sampled_from(["dlq", "dead.letters"]),
})


class StoreModel(RuleBasedStateMachine):
    """Live rows and mailboxes as dicts; `committed` is what survives a crash."""

    root = None  # set by the test: a tmp_path
    backend: Backend = None  # set by the test
    _runs = itertools.count()

    def __init__(self):
        super().__init__()
        self.dir = str(self.root / f"run{next(self._runs)}")
        self.store = self.backend.open(self.dir)
        self.live: dict[int, StoredMessage] = {}
        self.mailboxes: dict[int, MailboxRow] = {}
        self.committed = self.sealed = ({}, {}, 0)
        self.high_water = 0  # highest seq handed to insert(), committed or not
        self.next_seq = 1
        self.used_ids: list[bytes] = []

    def teardown(self):
        try:
            self.store.close()
        except CLOSED:
            pass

    # --- rules ---

    @rule(specs=st.lists(row_specs, max_size=8))
    def insert(self, specs):
        rows = []
        live_ids = {m.msg_id for m in self.live.values()}
        for spec in specs:
            if isinstance(spec["id"], int) and self.used_ids:
                msg_id = self.used_ids[spec["id"] % len(self.used_ids)]
            else:
                msg_id = spec["id"] if isinstance(spec["id"], bytes) else spec["id"].to_bytes(16, "big")
            if msg_id in live_ids:
                continue  # the engine checks ids first (mailboxes_of)
            row = StoredMessage(self.next_seq, spec["mailbox"], msg_id, spec["headers"], spec["body"],
                                spec["created"], spec["expires"], spec["deliveries"])
            self.next_seq += 1
            rows.append(row)
            self.used_ids.append(msg_id)
            live_ids.add(msg_id)
            self.live[row.seq] = row
        self.store.insert(rows)
        if rows:
            self.high_water = rows[-1].seq

    @rule(data=st.data())
    def delete(self, data):
        seqs = data.draw(st.lists(st.integers(0, self.next_seq + 2), max_size=6))
        self.store.delete(seqs)
        for s in seqs:
            self.live.pop(s, None)

    @rule(data=st.data())
    def set_deliveries(self, data):
        pairs = data.draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, self.next_seq + 2)),
                                   max_size=4, unique_by=lambda p: p[1]))
        self.store.set_deliveries(pairs)
        for count, seq in pairs:
            if seq in self.live:
                self.live[seq] = self.live[seq]._replace(deliveries=count)

    @rule(mailbox=st.sampled_from(MAILBOX_IDS), name=st.sampled_from(["a", "b.c", "agent.x"]),
          options=options_maps, declared=st.booleans())
    def save_mailbox(self, mailbox, name, options, declared):
        if any(r.name == name and r.id != mailbox for r in self.mailboxes.values()):
            return  # names are unique; the engine never reuses one for another id
        row = MailboxRow(mailbox, name, options, declared)
        self.store.save_mailbox(row)
        self.mailboxes[mailbox] = row

    @rule(mailbox=st.sampled_from(MAILBOX_IDS))
    def delete_mailbox(self, mailbox):
        self.store.delete_mailbox(mailbox)
        self.mailboxes.pop(mailbox, None)
        self.live = {s: m for s, m in self.live.items() if m.mailbox_id != mailbox}

    @rule()
    def seal(self):
        self.store.seal()
        self.sealed = (dict(self.live), dict(self.mailboxes), self.high_water)

    @rule()
    def commit(self):
        self.store.commit()  # what was sealed
        self.committed = self.sealed

    @rule()
    def seal_and_commit(self):
        flush(self.store)
        self.committed = self.sealed = (dict(self.live), dict(self.mailboxes), self.high_water)

    @rule()
    def reopen(self):
        self.store.close()  # seals and commits
        self.committed = self.sealed = (dict(self.live), dict(self.mailboxes), self.high_water)
        self.store = self.backend.open(self.dir)

    @rule()
    def crash_and_reopen(self):
        crash(self.store)
        live, mailboxes, self.high_water = self.sealed = self.committed
        self.live, self.mailboxes = dict(live), dict(mailboxes)
        self.store = self.backend.open(self.dir)

    # --- what must hold after every step ---

    @invariant()
    def ready_rows_match(self):
        for mailbox in MAILBOX_IDS:
            expected = sorted((m for m in self.live.values() if m.mailbox_id == mailbox), key=lambda m: m.seq)
            assert self.store.load_ready(mailbox, 0, 10_000) == expected
            if expected:
                middle = expected[len(expected) // 2].seq
                assert self.store.load_ready(mailbox, middle, 2) == [m for m in expected if m.seq > middle][:2]

    @invariant()
    def start_up_reads_match_the_last_commit(self):
        live, mailboxes, high_water = self.committed
        stats = {}
        for m in live.values():
            n, b = stats.get(m.mailbox_id, (0, 0))
            stats[m.mailbox_id] = (n + 1, b + len(m.body))
        assert self.store.mailbox_stats() == stats
        # A high-water mark: the max live seq, or the highest ever inserted
        # and committed (the mark is written by commit()).
        assert self.store.max_seq() == max(max(live, default=0), high_water)
        assert self.store.load_mailboxes() == [mailboxes[k] for k in sorted(mailboxes)]

    @invariant()
    def ids_and_seqs_match(self):
        probe_ids = self.used_ids[-10:] + [b"\xee" * 16]
        assert self.store.mailboxes_of(probe_ids) == {m.msg_id: m.mailbox_id for m in self.live.values()
                                                      if m.msg_id in probe_ids}
        probe_seqs = list(range(max(1, self.next_seq - 10), self.next_seq + 1))
        assert self.store.get_many(probe_seqs) == [self.live[s] for s in probe_seqs if s in self.live]
        for seq in probe_seqs[-3:]:
            assert self.store.get(seq) == self.live.get(seq)

    @invariant()
    def expiry_matches(self):
        for now in (0.0, 250.0, 500.0, 1000.0):
            ordered = sorted((m.expires, m.seq, m.mailbox_id) for m in self.live.values()
                             if m.expires is not None and m.expires <= now)
            assert self.store.expired(now, 10_000) == ordered
            assert self.store.expired(now, 2) == ordered[:2]
            if len(ordered) > 2:
                assert self.store.expired(now, 3, ordered[1][:2]) == ordered[2:5]
            later = [m.expires for m in self.live.values() if m.expires is not None and m.expires > now]
            assert self.store.next_expiry(now) == (min(later) if later else None)


def test_store_matches_model(tmp_path, backend):
    StoreModel.root = tmp_path
    StoreModel.backend = backend
    run_state_machine_as_test(
        StoreModel,
        # PostgreSQL pays a round trip per read: fewer examples keep it near 10 s.
        settings=settings(max_examples=40 if backend.kind.startswith("sqlite") else 20, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )


def clock_id(ms: int, low: bytes) -> bytes:
    return ms.to_bytes(6, "big") + low.rjust(10, b"\0")


def test_ids_above_every_stored_id_need_no_lookup(tmp_path):
    s = SQLiteStore(str(tmp_path))
    s.insert([msg(1, msg_id=clock_id(1000, b"\x05"))])
    flush(s)
    s.close()
    s = SQLiteStore(str(tmp_path))  # the ceiling comes from the index
    try:
        assert s._ids.top == (1000).to_bytes(6, "big")
        same_ms, later, earlier = clock_id(1000, b"\x01"), clock_id(1001, b"\x00"), clock_id(999, b"\x09")
        # The stored millisecond's other ids are not known after a restart: looked up.
        assert s._ids.maybe_stored([same_ms, later, earlier]) == [same_ms, earlier]
        assert s.mailboxes_of([clock_id(1000, b"\x05"), same_ms, later, earlier]) == {clock_id(1000, b"\x05"): 1}
        s.insert([msg(2, msg_id=later)])
        assert s._ids.top == (1001).to_bytes(6, "big")
        assert s.mailboxes_of([later]) == {later: 1}
    finally:
        s.close()


def test_ids_of_the_top_millisecond_need_no_lookup_unless_stored(tmp_path):
    s = SQLiteStore(str(tmp_path))
    try:
        a, b, c = clock_id(2000, b"\x09"), clock_id(2000, b"\x01"), clock_id(2000, b"\x05")
        s.insert([msg(1, msg_id=a)])
        s.insert([msg(2, msg_id=b)])  # below `a`, same millisecond: known not stored
        assert s._ids.maybe_stored([a, b, c]) == [a, b]
        flush(s)
        assert s.mailboxes_of([a, b, c]) == {a: 1, b: 1}
        s.delete([1])  # a deleted id is looked up (and not found): one lookup too many, never one too few
        flush(s)
        assert s.mailboxes_of([a, c]) == {}
    finally:
        s.close()


def test_ids_that_are_not_clocks_are_always_looked_up(tmp_path):
    """An idempotent_id() hash (its first bytes far past any clock) must not
    raise the ceiling: later clock ids would all need lookups."""
    s = SQLiteStore(str(tmp_path))
    try:
        hashed = b"\xfe" * 16
        s.insert([msg(1, msg_id=hashed)])
        assert s._ids.top == b""
        fresh = clock_id(3000, b"\x01")
        assert s._ids.maybe_stored([hashed, fresh]) == [hashed]
        assert s.mailboxes_of([hashed, fresh]) == {hashed: 1}
        flush(s)
        s.close()
        s = SQLiteStore(str(tmp_path))  # after a restart, too
        assert s._ids.top == b""
        assert s.mailboxes_of([hashed, fresh]) == {hashed: 1}
    finally:
        s.close()


def test_open_deletes_counts_an_open_batch_of_deletes_alone(store):
    """What relay/turn.py holds for a later commit: SQLite's deletes alone;
    PostgreSQL's never (its window reads fetch every row the LIMIT allows)."""
    store.insert([msg(1), msg(2), msg(3)])
    flush(store)
    sqlite = isinstance(store, SQLiteStore)
    assert store.open_deletes() == (0 if sqlite else None)
    store.delete([1, 2])
    store.delete([3])
    assert store.open_deletes() == (3 if sqlite else None)
    store.insert([msg(4)])
    assert store.open_deletes() is None


def test_deletes_run_as_ranges_of_consecutive_seqs():
    from murano_zmq.store.batch import runs
    assert runs([]) == []
    assert runs([3, 1, 2, 7, 9, 8, 8]) == [(1, 3), (7, 9)]
    assert runs([5]) == [(5, 5)]


def test_a_range_delete_leaves_the_seqs_between_runs(tmp_path):
    s = SQLiteStore(str(tmp_path))
    try:
        s.insert([msg(seq, mailbox=1 + seq % 2) for seq in range(1, 11)])
        flush(s)
        s.delete([1, 2, 3, 5, 9, 10])  # runs (1,3), (5,5), (9,10)
        flush(s)
        s.close()
        s = SQLiteStore(str(tmp_path))  # committed state only
        assert [r.seq for r in s.get_many(list(range(1, 11)))] == [4, 6, 7, 8]
    finally:
        s.close()


# --- large bodies (SQLite: segment files, store/segments.py) ----------------------------


LARGE = 64 * 1024


def bodies(n: int, seed: int = 0) -> list[bytes]:
    """Bodies of mixed sizes around the segment threshold (8 KiB), distinct bytes."""
    sizes = [100, LARGE, 8 * 1024 - 1, 8 * 1024, 200_000, 0, LARGE]
    return [bytes([(seed + i) % 251]) * 7 + i.to_bytes(4, "big") * (sizes[i % len(sizes)] // 4)
            for i in range(n)]


def test_large_and_small_bodies_mixed_round_trip_and_restart(open_store):
    s = open_store()
    rows = [msg(i + 1, mailbox=1 + i % 2, body=b) for i, b in enumerate(bodies(30))]
    s.insert(rows[:15])
    flush(s)
    s.insert(rows[15:])
    assert s.load_ready(1, 0, 100) == [r for r in rows if r.mailbox_id == 1]  # half of it uncommitted
    flush(s)
    s.delete([r.seq for r in rows[::3]])
    flush(s)
    s.close()
    s = open_store()
    try:
        live = [r for r in rows if r not in rows[::3]]
        assert s.load_ready(1, 0, 100) + s.load_ready(2, 0, 100) == sorted(
            live, key=lambda r: (r.mailbox_id, r.seq))
        assert s.get_many([r.seq for r in rows]) == live
        assert s.mailbox_stats() == {mb: (len([r for r in live if r.mailbox_id == mb]),
                                          sum(len(r.body) for r in live if r.mailbox_id == mb)) for mb in (1, 2)}
        # max_bytes counts the body's real length
        assert len(s.load_ready(1, 0, 100, max_bytes=LARGE)) < len([r for r in live if r.mailbox_id == 1])
    finally:
        s.close()


def has_spare(data_dir) -> bool:
    return os.path.exists(os.path.join(str(data_dir), SEGMENT_DIR, SPARE_NAME))


def test_large_bodies_are_in_segments_and_small_ones_in_the_database(tmp_path):
    s = SQLiteStore(str(tmp_path))
    s.insert([msg(1, body=b"s" * 100), msg(2, body=b"L" * LARGE)])
    flush(s)
    rows = dict(s._db.execute("SELECT seq, length(body) FROM messages").fetchall())
    assert rows == {1: 100, 2: 0}
    assert len(segment_files(tmp_path)) == 1
    # the body, then zeros ahead for the next bodies to write over
    assert os.path.getsize(os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0])) == LARGE + ZERO_AHEAD
    s.close()


def reopen_and_drain(data_dir, seq: int, body: bytes) -> None:
    """A restarted store finds one message left in mailbox 1, `body` at `seq`;
    its delete leaves the mailbox empty."""
    s = SQLiteStore(str(data_dir))
    try:
        assert [m.body for m in s.load_ready(1, 0, 10)] == [body]
        s.delete([seq])
        flush(s)
        assert s.load_ready(1, 0, 10) == []
    finally:
        s.close()


def test_a_lone_commit_puts_a_large_body_in_a_segment(tmp_path):
    """commit_insert() of one lone send takes the same threshold as a
    batch: a large body goes to a segment, a small one stays in the row."""
    s = SQLiteStore(str(tmp_path))
    try:
        s.commit_insert([msg(1, body=b"a" * THRESHOLD)])
        s.commit_insert([msg(2, body=b"b" * LARGE)])
        s.commit_insert([msg(3, body=b"c" * (THRESHOLD - 1))])  # (the journal's, store/journal.py)
        s.write_owed()
        rows = dict(s._db.execute("SELECT seq, seg IS NULL FROM messages").fetchall())
        assert rows == {1: 0, 2: 0, 3: 1}
        assert s.get(2).body == b"b" * LARGE  # (read back from the disk: its pages were dropped)
        assert len(segment_files(tmp_path)) == 1
        s.delete([1, 3])
        flush(s)
    finally:
        s.close()
    reopen_and_drain(tmp_path, 2, b"b" * LARGE)
    assert segment_files(tmp_path) == []  # the first life's, all read


def test_a_segment_is_deleted_when_no_row_references_it(tmp_path):
    s = SQLiteStore(str(tmp_path))
    s._segments.roll_bytes = 3 * LARGE  # a new segment every 3 bodies
    for seq in range(1, 10):
        s.insert([msg(seq, body=bytes([seq]) * LARGE)])
        flush(s)
    assert len(segment_files(tmp_path)) == 3
    s.delete([1, 2])
    flush(s)
    assert len(segment_files(tmp_path)) == 3  # seq 3 still in the first
    s.delete([3])
    flush(s)
    assert len(segment_files(tmp_path)) == 2
    assert has_spare(tmp_path)  # the first, kept to be written over by the next
    s.delete(range(4, 10))  # the last one is being written: kept (empty of rows)
    flush(s)
    assert len(segment_files(tmp_path)) == 1  # the second deleted: there is a spare already
    s.insert([msg(10, body=b"x" * LARGE)])  # the third is full: the spare becomes the fourth...
    flush(s)
    assert segment_files(tmp_path) == ["000000000004.seg"]
    assert has_spare(tmp_path)  # ...and the third, empty now, the spare
    s.close()
    reopen_and_drain(tmp_path, 10, b"x" * LARGE)
    SQLiteStore(str(tmp_path)).close()
    assert segment_files(tmp_path) == []  # a restart drops the files no row references
    assert has_spare(tmp_path)


def test_a_mailbox_deleted_releases_its_segments(tmp_path):
    s = SQLiteStore(str(tmp_path))
    s._segments.roll_bytes = LARGE
    s.save_mailbox(MailboxRow(1, "a", {}, False))
    s.insert([msg(1, body=b"a" * LARGE), msg(2, body=b"b" * LARGE)])
    flush(s)
    s.insert([msg(3, mailbox=2, body=b"c" * LARGE)])
    s.delete_mailbox(1)
    flush(s)
    assert len(segment_files(tmp_path)) == 1
    assert [m.body for m in s.load_ready(2, 0, 10)] == [b"c" * LARGE]
    s.close()


def test_a_torn_tail_after_a_crash_is_harmless(tmp_path):
    s = SQLiteStore(str(tmp_path))
    kept = [msg(i, body=bytes([i]) * LARGE) for i in (1, 2, 3)]
    s.insert(kept)
    flush(s)
    s.insert([msg(4, body=b"lost" * LARGE)])
    s.seal()  # its body is appended, its row never committed
    seg_path = os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0])
    with open(seg_path, "ab") as f:
        f.write(b"torn" * 1000)  # and a half-written body after it (after the zeros ahead: harmless too)
    crash(s)
    s = SQLiteStore(str(tmp_path))
    try:
        assert s.load_ready(1, 0, 10) == kept
        s.insert([msg(5, body=b"5" * LARGE)])  # written to a new segment, not after the torn tail
        flush(s)
        assert len(segment_files(tmp_path)) == 2
        s.delete([1, 2, 3])
        flush(s)
        assert not os.path.exists(seg_path)  # the tail goes with its segment
    finally:
        s.close()
    s = SQLiteStore(str(tmp_path))
    try:
        assert [m.body for m in s.load_ready(1, 0, 10)] == [b"5" * LARGE]
    finally:
        s.close()


def test_a_missing_or_short_segment_is_logged_per_message_not_fatal(tmp_path, caplog):
    s = SQLiteStore(str(tmp_path))
    s._segments.roll_bytes = 2 * LARGE
    s.insert([msg(1, body=b"small")] + [msg(i, body=bytes([i]) * LARGE) for i in range(2, 7)])
    flush(s)
    s.close()
    first, second, third = (os.path.join(tmp_path, SEGMENT_DIR, f) for f in segment_files(tmp_path))
    os.unlink(first)  # seqs 2, 3
    os.truncate(second, LARGE + 10)  # seq 4 whole, seq 5 cut short
    with caplog.at_level(logging.ERROR, logger="murano_zmq.store"):
        s = SQLiteStore(str(tmp_path))
    try:
        assert [m.seq for m in s.load_ready(1, 0, 10)] == [1, 4, 6]
        assert s.get(4).body == bytes([4]) * LARGE
        assert s.mailbox_stats() == {1: (3, 5 + 2 * LARGE)}
        lost = [r.getMessage() for r in caplog.records if "is lost" in r.getMessage()]
        assert len(lost) == 3 and all(first in line or second in line for line in lost)
        assert s.mailboxes_of([(i).to_bytes(16, "big") for i in (2, 3, 5)]) == {}  # a resend is accepted
    finally:
        s.close()


def test_a_segment_lost_under_a_running_store_skips_its_message(tmp_path, caplog):
    s = SQLiteStore(str(tmp_path))
    s._segments.roll_bytes = LARGE
    s.insert([msg(1, body=b"1" * LARGE), msg(2, body=b"2" * LARGE)])
    flush(s)
    s.close()
    s = SQLiteStore(str(tmp_path))  # segments are opened at the first read
    try:
        os.unlink(os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0]))
        with caplog.at_level(logging.ERROR, logger="murano_zmq.store"):
            assert [m.seq for m in s.load_ready(1, 0, 10)] == [2]
            assert s.get(1) is None
        assert any("cannot be read" in r.getMessage() for r in caplog.records)
    finally:
        s.close()


def test_unreadable_bodies_do_not_use_up_a_windows_room(tmp_path, caplog):
    """Rows whose bodies cannot be read are left out of a window read and
    take none of its rows or bytes: the rows after them fill it (a short
    read would tell the relay the mailbox has nothing more on disk)."""
    s = SQLiteStore(str(tmp_path))
    s._segments.roll_bytes = 3 * LARGE  # rows 1-3 in the first segment, 4-6 in the second
    s.insert([msg(seq, body=bytes([seq]) * LARGE) for seq in range(1, 7)])
    flush(s)
    s.close()
    s = SQLiteStore(str(tmp_path))
    try:
        os.unlink(os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0]))
        with caplog.at_level(logging.ERROR, logger="murano_zmq.store"):
            assert [m.seq for m in s.load_ready(1, 0, 10, max_bytes=LARGE + 1)] == [4, 5]
            assert [m.seq for m in s.load_ready(1, 0, 2)] == [4, 5]
    finally:
        s.close()


def test_a_direct_writes_enospc_is_a_full_disk_too():
    """A long run's O_DIRECT write reports ENOSPC in the kernel's words ("No
    space left on device"), which the check by SQLite's text missed: the
    relay called it failing writes, kept its reserve, and acks then failed."""
    assert StoreError(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))).full
    assert StoreError(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).full
    assert not StoreError(OSError(errno.EACCES, os.strerror(errno.EACCES))).full


@pytest.mark.parametrize("where", ["pwrite", "fdatasync"])
def test_enospc_on_a_segment_is_a_full_disk(tmp_path, monkeypatch, where):
    s = SQLiteStore(str(tmp_path))
    s.insert([msg(1, body=b"1" * LARGE)])
    flush(s)
    real = getattr(os, where)

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segments_module.os, where, no_space)
    s.insert([msg(2, body=b"2" * LARGE), msg(3, body=b"small")])
    s.delete([1])
    with pytest.raises(StoreError) as failed:
        flush(s)
    assert failed.value.full and "database or disk is full" in str(failed.value)
    assert not failed.value.unsynced  # (the rows were never COMMITted: the relay goes on)
    assert [m.seq for m in s.load_ready(1, 0, 10)] == [2, 3]  # the writes wait in their batches
    monkeypatch.setattr(segments_module.os, where, real)
    s.commit()  # space is back: the same batches commit
    assert [m.body for m in s.load_ready(1, 0, 10)] == [b"2" * LARGE, b"small"]
    s.close()
    s = SQLiteStore(str(tmp_path))
    try:
        assert [m.body for m in s.load_ready(1, 0, 10)] == [b"2" * LARGE, b"small"]
    finally:
        s.close()


@pytest.mark.parametrize("path", ["batch", "lone", "journaled"])
def test_bodies_are_synced_before_the_commit_that_points_at_them(tmp_path, monkeypatch, path):
    """journaled: a lone send's record holds its body, written to a segment
    after the CONFIRM and synced before the commit of its row."""
    s = SQLiteStore(str(tmp_path))
    if path == "lone":
        without_journal(s)
    calls = []
    real_sync, real_commit = s._segments.sync, s._commit_tx
    monkeypatch.setattr(s._segments, "sync", lambda **kw: (calls.append("segments"), real_sync(**kw))[1])
    monkeypatch.setattr(s, "_commit_tx", lambda *a: (calls.append("commit"), real_commit(*a))[1])
    if path == "journaled":
        s.commit_insert([msg(1, body=b"x" * LARGE)])
        s.write_owed(OWED_ROWS)
        assert calls == [] and s._owed
        s.write_owed()
    elif path == "lone":
        s.commit_insert([msg(1, body=b"x" * LARGE)])
    else:
        s.insert([msg(1, body=b"x" * LARGE)])
        flush(s)
    assert calls == ["segments", "commit"]
    s.close()


def test_a_lone_commit_drops_the_pages_of_its_body_from_the_cache(tmp_path, monkeypatch):
    """After its sync, a lone send's body leaves the page cache (the relay
    delivers it from memory); a short batch's stays (a long one's never
    enters it: tests/unit/test_direct_io.py)."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    dropped = []
    monkeypatch.setattr(segments_module.os, "posix_fadvise",
                        lambda fd, off, length, advice: dropped.append((off, length, advice)))
    try:
        s.commit_insert([msg(1, body=b"1" * LARGE)])
        s.commit_insert([msg(2, body=b"2" * (LARGE + 10))])
        # the first body's bytes and the zeros written after it; then the second's
        assert dropped == [(0, LARGE + ZERO_AHEAD, os.POSIX_FADV_DONTNEED), (LARGE, LARGE + 10, os.POSIX_FADV_DONTNEED)]
        s.commit_insert([msg(3, body=b"3" * 2 * LARGE)])  # past the zeros, to an unaligned end: its page stays
        end = 4 * LARGE + 10
        page_after = end + os.sysconf("SC_PAGE_SIZE") - end % os.sysconf("SC_PAGE_SIZE")
        assert dropped[2:] == [(2 * LARGE + 10, 2 * LARGE, os.POSIX_FADV_DONTNEED),
                               (page_after, end + ZERO_AHEAD - page_after, os.POSIX_FADV_DONTNEED)]
        s.insert([msg(4, body=b"4" * LARGE)])
        flush(s)
        assert len(dropped) == 4  # (none for a batch)
    finally:
        s.close()


def test_a_segment_grows_by_zeros_ahead_of_its_bodies(tmp_path):
    """A write that passes what earlier writes filled fills ZERO_AHEAD more
    with zeros (synced with it), so the next bodies write over written
    blocks; a segment made from the spare is written already."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    s._segments.roll_bytes = 8 * LARGE
    path = lambda: os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[-1])  # noqa: E731
    try:
        sizes = []
        for seq in range(1, 9):
            s.commit_insert([msg(seq, body=bytes([seq]) * LARGE)])
            sizes.append(os.path.getsize(path()))
        per_fill = ZERO_AHEAD // LARGE + 1  # bodies written per growth of the file
        assert sizes == [(i // per_fill * per_fill + 1) * LARGE + ZERO_AHEAD for i in range(8)]
        assert [m.body for m in s.get_many(list(range(1, 9)))] == [bytes([i]) * LARGE for i in range(1, 9)]
        s.delete(list(range(1, 9)))
        flush(s)
        for seq in range(9, 17):  # a second segment; the first, whole and unreferenced, is the spare
            s.commit_insert([msg(seq, body=bytes([seq]) * LARGE)])
        assert os.path.exists(os.path.join(tmp_path, SEGMENT_DIR, SPARE_NAME))
        s.delete(list(range(9, 17)))
        s.commit_insert([msg(17, body=b"7" * LARGE)])  # rolls: the third segment is the spare, renamed
        assert segment_files(tmp_path) == [f"{3:012d}.seg"]  # (the second went with the deletes)
        assert os.path.getsize(path()) == sizes[-1]  # written over, not grown
        with open(path(), "rb") as f:
            # What the spare held is written blocks already, but not by this
            # store: zeros over them make room for bodies flushed by the WAL's
            # sync alone (store/writeback.py); without that, none.
            ahead = bytes(LARGE) if s._segments._flush_shared else bytes([2]) * LARGE
            assert f.read(2 * LARGE)[LARGE:] == ahead
    finally:
        s.close()
    reopen_and_drain(tmp_path, 17, b"7" * LARGE)


def test_a_write_of_zero_ahead_or_more_writes_no_zeros(tmp_path):
    """A batch that writes as much as ZERO_AHEAD grows the file by itself:
    no zeros after it; a lone body after it writes them."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    try:
        s.insert([msg(seq, body=bytes([seq]) * LARGE) for seq in range(1, 5)])
        flush(s)
        path = os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0])
        assert 4 * LARGE >= ZERO_AHEAD and os.path.getsize(path) == 4 * LARGE
        s.commit_insert([msg(5, body=b"5" * LARGE)])
        assert os.path.getsize(path) == 5 * LARGE + ZERO_AHEAD
    finally:
        s.close()


def test_zeros_ahead_are_left_out_when_the_disk_has_no_room_for_them(tmp_path, monkeypatch):
    s = without_journal(SQLiteStore(str(tmp_path)))
    real = os.pwrite

    def no_room_for_zeros(fd, data, offset):
        if data is segments_module._ZEROS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(segments_module.os, "pwrite", no_room_for_zeros)
    try:
        s.commit_insert([msg(1, body=b"1" * LARGE)])  # stored: the zeros are a help, not a need
        assert os.path.getsize(os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0])) == LARGE
    finally:
        s.close()
    reopen_and_drain(tmp_path, 1, b"1" * LARGE)


def test_a_lone_commit_whose_segment_is_full_stores_nothing(tmp_path, monkeypatch):
    """ENOSPC on a lone send's segment: a full disk, nothing COMMITted, and
    the same send stores once space is back."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    real = os.fdatasync

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segments_module.os, "fdatasync", no_space)
    with pytest.raises(StoreError) as failed:
        s.commit_insert([msg(1, body=b"1" * LARGE)])
    assert failed.value.full and not failed.value.unsynced
    s.rollback()  # (what the relay does after a StoreError)
    assert s.get(1) is None and s.sync_failed is None
    monkeypatch.setattr(segments_module.os, "fdatasync", real)
    s.commit_insert([msg(1, body=b"1" * LARGE)])
    s.close()
    reopen_and_drain(tmp_path, 1, b"1" * LARGE)


def old_database(tmp_path, schema: str, version: int) -> None:
    """A relay.db of an earlier schema version, holding one message (seq 1,
    body 0x01)."""
    db = sqlite3.connect(tmp_path / SQLiteStore.DB_NAME)
    db.executescript(schema)
    db.execute("INSERT INTO meta VALUES ('schema', ?)", (version,))
    db.execute("INSERT INTO messages (seq, mailbox, msg_id, headers, body, created, deliveries) "
               "VALUES (1, 1, ?, x'80', x'01', 1.0, 0)", (b"i" * 16,))
    db.commit()
    db.close()


def test_schema_1_is_migrated(tmp_path):
    old_database(tmp_path, without_checksums(SCHEMA).replace(""",
    seg INTEGER,  -- a body in a segment file (store/segments.py): body is empty
    seg_off INTEGER,
    seg_len INTEGER""", ""), 1)
    s = SQLiteStore(str(tmp_path))
    try:
        assert s.get(1).body == b"\x01"
        s.insert([msg(2, body=b"2" * LARGE)])
        flush(s)
        assert s.get(2).body == b"2" * LARGE
        assert s._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == SCHEMA_VERSION
    finally:
        s.close()


def without_checksums(schema: str) -> str:
    """The schema before version 4 (no seg_crc)."""
    head, sep, tail = schema.partition(",\n    seg_crc INTEGER")
    assert sep
    return head + tail[tail.index("\n"):]


def test_schema_2_is_migrated(tmp_path):
    """A version 2 database (no packs' tables) keeps its rows and takes packs."""
    old_database(tmp_path, without_checksums(SCHEMA).split("-- A run of messages")[0], 2)
    s = SQLiteStore(str(tmp_path), pack_min_rows=2)
    try:
        assert s.get(1).body == b"\x01"
        s.insert([msg(seq) for seq in range(2, 6)])
        flush(s)
        assert s._db.execute("SELECT count(*) FROM packs").fetchone()[0] == 1
        assert [m.seq for m in s.load_ready(1, 0, 10)] == [1, 2, 3, 4, 5]
        assert s._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == SCHEMA_VERSION
    finally:
        s.close()


def test_schema_3_is_migrated(tmp_path):
    """A version 3 database (no seg_crc) keeps its rows, a large body's
    among them, and takes checksums."""
    old_database(tmp_path, without_checksums(SCHEMA), 3)
    s = SQLiteStore(str(tmp_path))
    try:
        assert s.get(1).body == b"\x01"
        s.commit_insert([msg(2, body=b"2" * LARGE)])
        s.write_owed()  # (journaled: its row)
        assert s.get(2).body == b"2" * LARGE
        assert s._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == SCHEMA_VERSION
    finally:
        s.close()


def test_a_failed_sync_of_the_seq_mark_is_a_store_error_that_says_so(tmp_path, monkeypatch):
    """reserve_seq() (a relay's start, and its start-over) syncs as a commit
    does: a failed sync there is a StoreError marked unsynced, not a bare
    OSError past the relay's one-line start-up error."""
    s = SQLiteStore(str(tmp_path))
    try:
        def failing_sync():
            raise OSError(errno.EIO, "Input/output error (injected)")

        monkeypatch.setattr(s, "_sync_wal", failing_sync)
        with pytest.raises(StoreError) as failed:
            s.reserve_seq(100)
        assert failed.value.unsynced and not failed.value.full
    finally:
        s.close()


def test_a_new_data_directory_is_for_the_relays_user_alone(tmp_path):
    """Messages are private: a new database (and its -wal, -shm) 0600, the
    directories 0700, as the segment files are; an umask does not widen them."""
    import stat

    old = os.umask(0o022)
    try:
        store = SQLiteStore(str(tmp_path / "data"))
    finally:
        os.umask(old)
    try:
        for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
            assert stat.S_IMODE((tmp_path / "data" / name).stat().st_mode) == 0o600, name
    finally:
        store.close()
    for path in (tmp_path / "data", tmp_path / "data" / "segments"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
