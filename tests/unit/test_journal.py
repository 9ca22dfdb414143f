"""The lone-send journal (store/journal.py): its ring on its own, and the
SQLite store over it: a lone send's row that never reached the database
before a crash is written in at the next start, once, and nothing the
database durably settled comes back."""

from __future__ import annotations

import logging
import os
import sqlite3

import pytest

from murano_zmq.store import journal as journal_module
from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.store.journal import FILE_NAME, Journal
from murano_zmq.store.sqlite import SQLiteStore


def msg(seq: int, body: bytes = b"body", mailbox: int = 1) -> StoredMessage:
    return StoredMessage(seq, mailbox, seq.to_bytes(16, "big"), b"", body, 1.0, None, 0)


def put(j: Journal, seq: int, body: bytes = b"body") -> bool:
    """Append msg(seq) (wrapping the ring when it has no room); did it wrap?"""
    record = Journal.record(seq, list(msg(seq, body)))
    wrapped = not j.room(record)
    if wrapped:
        j.wrap()
    j.append(record)
    return wrapped


# --- the ring ---


def test_a_new_journal_is_written_zeros_and_holds_no_record(tmp_path):
    j = Journal(str(tmp_path))
    try:
        assert os.path.getsize(tmp_path / FILE_NAME) == journal_module.SIZE
        assert os.stat(tmp_path / FILE_NAME).st_blocks * 512 >= journal_module.SIZE  # written, not a hole
        assert j.records() == []
    finally:
        j.close()


def test_records_come_back_in_the_order_written(tmp_path):
    j = Journal(str(tmp_path))
    try:
        for seq in (5, 6, 9):
            assert not put(j, seq)
        assert [(seq, StoredMessage(*f)) for seq, f in j.records()] == [(s, msg(s)) for s in (5, 6, 9)]
    finally:
        j.close()


@pytest.mark.parametrize("damage", ["torn payload", "torn header", "zeros"])
def test_a_scan_stops_at_a_torn_record(tmp_path, damage):
    """A crash during a record's write: it and what follows are not read."""
    j = Journal(str(tmp_path))
    try:
        put(j, 1)
        at = j._head
        put(j, 2)
        end = j._head
        put(j, 3)
    finally:
        j.close()
    with open(tmp_path / FILE_NAME, "r+b") as f:
        if damage == "torn payload":
            f.seek(end - 3)
            f.write(b"\xff\xff\xff")
        elif damage == "torn header":
            f.seek(at + 4)
            f.write(b"\x01")  # its length
        else:
            f.seek(at)
            f.write(bytes(end - at))
    j = Journal(str(tmp_path))
    try:
        assert [seq for seq, _ in j.records()] == [1]
    finally:
        j.close()


def test_the_ring_wraps_and_writes_from_its_start(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "SIZE", 16 * 1024)
    j = Journal(str(tmp_path))
    try:
        seq = 1
        while not put(j, seq, b"x" * 1000):
            seq += 1
        records = [s for s, _ in j.records()]
        assert records[0] == seq  # the record that wrapped, at offset 0
        assert all(s < seq for s in records[1:])  # then what is left of the lap before
    finally:
        j.close()


def test_a_record_too_large_for_the_ring_is_not_journaled(tmp_path):
    assert Journal.fits(8 * 1024)
    assert not Journal.fits(journal_module.SIZE)


# --- the SQLite store over it ---


def lone_send(store: SQLiteStore, seq: int, write: bool = True, body: bytes = b"body") -> None:
    store.commit_insert([msg(seq, body)])
    assert store._owed and store._owed[-1].seq == seq, "not journaled"
    if write:
        store.write_owed()


def crash(store: SQLiteStore) -> None:
    """The process dies: connections gone without a commit, the owed row not
    written (what a kill -9 between the CONFIRM and write_owed leaves)."""
    store._reader.close()
    store._db.close()
    store._journal.close()
    os.close(store._wal_fd)
    store._segments.close()


def new_store(tmp_path) -> SQLiteStore:
    store = SQLiteStore(str(tmp_path))
    store.save_mailbox(MailboxRow(1, "jobs", {}, False))
    store.seal()
    store.commit()
    return store


def ready(store: SQLiteStore) -> list[int]:
    return [m.seq for m in store.load_ready(1, 0, 100)]


def ready_after_restart(tmp_path) -> list[int]:
    store = SQLiteStore(str(tmp_path))
    try:
        return ready(store)
    finally:
        store.close()


def count_wal_syncs(store: SQLiteStore, monkeypatch) -> list[int]:
    """The WAL's syncs from now on, each as the number of rows owed then."""
    syncs: list[int] = []
    real = store._sync_wal
    monkeypatch.setattr(store, "_sync_wal", lambda: (syncs.append(len(store._owed)), real())[1])
    return syncs


def test_a_lone_send_is_in_the_journal_before_its_row_is_in_the_database(tmp_path):
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False)
        reader = sqlite3.connect(store.path)
        try:
            assert reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
            store.write_owed()
            assert reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
            assert reader.execute("SELECT value FROM meta WHERE key='journal'").fetchone() == (10,)
        finally:
            reader.close()
        assert ready(store) == [10]
    finally:
        store.close()


def test_a_crash_before_the_row_was_written_is_replayed_at_start(tmp_path, caplog):
    store = new_store(tmp_path)
    lone_send(store, 10)
    lone_send(store, 11, write=False)  # confirmed, then the relay died
    crash(store)
    with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
        store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == [10, 11]
        assert store.get(11) == msg(11)
        assert store.max_seq() >= 11
        assert "1 message(s) confirmed from the lone-send journal were written" in caplog.text
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [10, 11]  # and once only


def test_a_replayed_row_already_in_the_database_is_not_doubled(tmp_path):
    """The row's transaction reached the database but not its mark (not
    expected: they are one transaction; the INSERT skips it either way)."""
    store = new_store(tmp_path)
    lone_send(store, 10)
    crash(store)
    db = sqlite3.connect(os.path.join(str(tmp_path), SQLiteStore.DB_NAME))
    db.execute("DELETE FROM meta WHERE key='journal'")
    db.commit()
    db.close()
    assert ready_after_restart(tmp_path) == [10]


def test_a_settled_message_does_not_come_back(tmp_path):
    """Acked after its row was written, the ack then synced by a later
    commit: the mark is durable with the row, so the record is not replayed."""
    store = new_store(tmp_path)
    lone_send(store, 10)
    lone_send(store, 11)
    store.delete([10])
    store.save_mailbox(MailboxRow(2, "other", {}, False))  # (a commit that is synced)
    store.seal()
    store.commit()
    crash(store)
    assert ready_after_restart(tmp_path) == [11]


def test_a_wrap_syncs_the_wal_first_and_a_crash_after_it_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "SIZE", 32 * 1024)
    store = new_store(tmp_path)
    syncs = count_wal_syncs(store, monkeypatch)
    for seq in range(10, 100):
        lone_send(store, seq, body=b"x" * 1000)
    lone_send(store, 100, write=False, body=b"x" * 1000)
    assert len(syncs) >= 2, "the ring did not wrap"
    crash(store)
    assert ready_after_restart(tmp_path) == list(range(10, 101))


def test_a_large_body_or_several_rows_take_the_commit_path(tmp_path):
    store = new_store(tmp_path)
    try:
        store.commit_insert([StoredMessage(10, 1, bytes(16), b"", b"x" * 65536, 1.0, None, 0)])
        store.commit_insert([msg(11), msg(12)])
        assert not store._owed and store._journal.records() == []
        assert ready(store) == [10, 11, 12]
    finally:
        store.close()


def test_rows_owed_across_a_wrap_are_written_before_it(tmp_path, monkeypatch):
    """Rows are written a transaction per OWED_ROWS sends: a wrap with rows
    still owed writes them, then syncs the WAL, then writes over the ring."""
    monkeypatch.setattr(journal_module, "SIZE", 32 * 1024)
    store = new_store(tmp_path)
    syncs = count_wal_syncs(store, monkeypatch)
    for seq in range(10, 60):
        lone_send(store, seq, write=False, body=b"x" * 1000)
    assert syncs and all(n == 0 for n in syncs), "the WAL was synced with rows not written"
    assert 0 < len(store._owed) < 50
    crash(store)
    assert ready_after_restart(tmp_path) == list(range(10, 60))


def test_rows_owed_take_the_held_deletes_with_them(tmp_path):
    store = new_store(tmp_path)
    try:
        lone_send(store, 10)
        lone_send(store, 11)
        store.delete([10])  # an ack, held for a later commit
        lone_send(store, 12, write=False)
        lone_send(store, 13, write=False)  # (the same deletes held: journaled too)
        assert [m.seq for m in store._owed] == [12, 13]
        store.write_owed()
        assert len(store._batches) == 1 and not store._batches[0]
        assert ready(store) == [11, 12, 13]
    finally:
        store.close()


def test_an_id_among_the_rows_owed_is_found(tmp_path):
    """An idempotent id sent again, one send at a time: the relay asks
    mailboxes_of() before it journals a row."""
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False)
        assert store.mailboxes_of([msg(10).msg_id], every=True) == {msg(10).msg_id: 1}
        assert not store._owed  # (written to be looked up)
    finally:
        store.close()
