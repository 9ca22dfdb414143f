"""A turn whose writes are deletes alone (acks, expiries) leaves them to a
later commit (relay/turn.py): they are not synced anyway, and small commits
of them, turn after turn, rewrote the same pages into the WAL.  Held until
another commit takes them, DELETES_HELD_ROWS of them wait, or the first
has waited DELETES_HELD_SECONDS; the engine's next deadline wakes the loop
for that commit (tests/unit/test_engine.py).  Meanwhile the loop may run
their statements (seal: written ahead into the open transaction); their
COMMIT waits all the same."""

from __future__ import annotations

import sqlite3

import pytest

from murano_zmq.protocol.frames import Cmd
from murano_zmq.relay.turn import DELETES_HELD_ROWS, DELETES_HELD_SECONDS, Turn
from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.store.packs import packed_rows, stored_count
from murano_zmq.store.sqlite import SQLiteStore
from tests.helpers import without_journal

NOW = 1000.0


def msg(seq: int) -> StoredMessage:
    return StoredMessage(seq, 1, seq.to_bytes(16, "big"), b"", b"body", 1.0, None, 0)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path))
    s.save_mailbox(MailboxRow(1, "work", {}, True))
    s.insert([msg(seq) for seq in range(1, DELETES_HELD_ROWS + 10)])
    s.seal()
    s.commit()
    yield s
    s.close()


def committed(store: SQLiteStore) -> int:
    """Rows a commit made durable (another connection: the writer's own sees
    its open transaction)."""
    db = sqlite3.connect(store.path)
    try:
        return stored_count(db)
    finally:
        db.close()


def test_deletes_alone_wait_until_the_first_has_waited_long_enough(store):
    turn = Turn(store)
    rows = committed(store)
    store.delete([1])
    assert turn.hold_deletes(NOW) and turn.deletes_since == NOW
    store.delete([2, 3])
    assert turn.hold_deletes(NOW + DELETES_HELD_SECONDS / 2)
    assert turn.deletes_since == NOW  # from the first
    assert store.get(1) is None  # a read sees them at once (the open batch)
    assert committed(store) == rows
    assert not turn.hold_deletes(NOW + DELETES_HELD_SECONDS)
    turn.commit()
    assert committed(store) == rows - 3 and turn.deletes_since is None


def test_many_deletes_are_committed_at_once(store):
    turn = Turn(store)
    store.delete(range(1, DELETES_HELD_ROWS))
    assert turn.hold_deletes(NOW)
    store.delete([DELETES_HELD_ROWS])
    assert not turn.hold_deletes(NOW)


def test_other_writes_or_a_held_reply_commit_this_turn(store):
    turn = Turn(store)
    assert not turn.hold_deletes(NOW)  # nothing to hold
    store.delete([1])
    store.insert([msg(10**6)])
    assert store.open_deletes() is None
    assert not turn.hold_deletes(NOW)
    turn.commit()
    store.delete([2])
    turn.reply_after_commit(b"peer", Cmd.CONFIRM, 1, [])  # (a reply that waits for a commit)
    assert not turn.hold_deletes(NOW)
    turn.commit()
    store.insert([msg(10**6 + 1)])
    store.seal()  # sealed writes other than deletes: committed this turn
    store.delete([3])
    assert store.held_deletes() is None and not turn.hold_deletes(NOW)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no journal"])
def test_a_lone_send_commits_held_deletes_in_its_one_sync(store, monkeypatch, journal):
    """A lone send right after acks (a consumer's reply, say) keeps its
    path: the held deletes join its transaction, its 64 KiB body goes to a
    segment (synced before the COMMIT), and one sync of the WAL makes both
    durable.  With the journal, its one sync is the journal's, and the
    deletes go with its row."""
    if not journal:
        without_journal(store)
    store.delete([1, 2])
    syncs = []
    real = store._sync_wal
    monkeypatch.setattr(store, "_sync_wal", lambda: (syncs.append(1), real())[1])
    big = StoredMessage(10**6, 1, (10**6).to_bytes(16, "big"), b"", b"b" * 65536, 1.0, None, 0)
    store.commit_insert([big])
    if journal:
        assert syncs == [] and store._journal.records()[-1][0] == 10**6
        store.write_owed()
    assert syncs == ([] if journal else [1])
    assert len(store._batches) == 1 and not store._batches[0]
    rows = dict(store._db.execute("SELECT seq, seg IS NULL FROM messages").fetchall())
    assert rows == {10**6: 0}
    packed = {seq for seq, _ in packed_rows(store._db)}  # (the seeded rows are packs: store/packs.py)
    assert 3 in packed and not packed & {1, 2}
    assert store.get(1) is None and store.get(10**6).body == b"b" * 65536


def test_deletes_written_ahead_stay_held_until_their_commit(store):
    """RelayEngine.write_held_deletes seals them: their statements run in
    the open transaction at once, their COMMIT waits as before."""
    turn = Turn(store)
    rows = committed(store)
    store.delete([1, 2])
    assert turn.hold_deletes(NOW)
    store.seal()  # written ahead
    assert store._tx_open and store._batches[0].written
    store.delete([3])
    assert store.held_deletes() == 3 and turn.hold_deletes(NOW + DELETES_HELD_SECONDS / 2)
    assert committed(store) == rows, "not committed: a crash now delivers them again"
    assert store.get(1) is None and store.get(3) is None
    assert not turn.hold_deletes(NOW + DELETES_HELD_SECONDS)
    turn.commit()
    assert committed(store) == rows - 3 and not store._tx_open


def test_written_ahead_deletes_count_toward_the_held_limit(store):
    turn = Turn(store)
    store.delete(range(1, DELETES_HELD_ROWS))
    store.seal()
    assert turn.hold_deletes(NOW)
    store.delete([DELETES_HELD_ROWS])
    assert not turn.hold_deletes(NOW)


def test_a_rollback_undoes_deletes_written_ahead(store):
    rows = committed(store)
    store.delete([1, 2])
    store.seal()
    store.rollback()
    assert not store._tx_open and committed(store) == rows
    assert store.get(1) is not None, "the relay starts over from the store: the rows are there"


def lone_send_after_held_deletes(store, monkeypatch) -> tuple[int, list]:
    """Deletes written ahead and one more open, then a lone send: (the rows
    committed before, the WAL syncs since)."""
    rows = committed(store)
    store.delete([1, 2])
    store.seal()  # written ahead
    store.delete([3])  # and one more, open
    syncs = []
    real = store._sync_wal
    monkeypatch.setattr(store, "_sync_wal", lambda: (syncs.append(1), real())[1])
    store.commit_insert([msg(10**6)])
    return rows, syncs


def assert_deletes_and_row_committed(store, rows: int) -> None:
    assert not store._tx_open
    assert len(store._batches) == 1 and not store._batches[0]
    assert committed(store) == rows - 3 + 1
    assert store.get(2) is None and store.get(10**6).body == b"body"


def test_a_lone_send_after_deletes_written_ahead_commits_them_in_its_one_sync(store, monkeypatch):
    """(without the lone-send journal, as for a large body)"""
    monkeypatch.setattr(store, "_journal", None)
    rows, syncs = lone_send_after_held_deletes(store, monkeypatch)
    assert syncs == [1]
    assert_deletes_and_row_committed(store, rows)


def test_a_journaled_lone_send_takes_the_held_deletes_into_its_row_transaction(store, monkeypatch):
    """The journal's sync makes the send durable (store/journal.py); its
    row and the held deletes are then written in one transaction, not synced
    (acks need no sync of their own)."""
    rows, syncs = lone_send_after_held_deletes(store, monkeypatch)
    assert [seq for seq, _ in store._journal.records()] == [10**6]
    assert len(store._owed) == 1
    store.write_owed()
    assert syncs == [] and not store._owed
    assert_deletes_and_row_committed(store, rows)
