"""Packs (store/packs.py): runs of messages stored as one row each.

The store contract itself runs against packs in test_store.py (the
sqlite-packs backend, every run of two rows and more packed); here, the
relay's own sizes: which runs become packs, what their deletes and counts
leave on disk, ids already stored, a rollback, and a store with packs
against one without (the same reads after every step of a random run).
"""

from __future__ import annotations

import random
import sqlite3

import pytest

from murano_zmq.relay.checks import _data_dir
from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.protocol.message import idempotent_id
from murano_zmq.store.packs import MAX_ROWS, MIN_ROWS, Packs, packed_rows, stored_count
from murano_zmq.store.sqlite import SQLiteStore, StoreError


def msg(seq: int, mailbox: int = 1, body: bytes = b"body", expires=None, msg_id=None, deliveries=0) -> StoredMessage:
    return StoredMessage(seq, mailbox, msg_id or seq.to_bytes(16, "big"), b"", body, 1.0 + seq, expires, deliveries)


def flush(store: SQLiteStore) -> None:
    store.seal()
    store.commit()


def tables(store: SQLiteStore) -> tuple[int, int, int, int]:
    """Rows of (messages, packs, pack_gone, pack_deliveries), as committed."""
    db = sqlite3.connect(store.path)
    try:
        return tuple(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("messages", "packs", "pack_gone", "pack_deliveries"))
    finally:
        db.close()


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path))
    for i in (1, 2):
        s.save_mailbox(MailboxRow(i, f"m{i}", {}, True))
    yield s
    s.close()


def test_a_send_sized_run_is_one_pack_and_the_rest_are_rows(store):
    store.insert([msg(s) for s in range(1, MAX_ROWS + 1)])  # one pack
    store.insert([msg(s, mailbox=2) for s in range(MAX_ROWS + 1, MAX_ROWS + MIN_ROWS)])  # too short: rows
    store.insert([msg(s, expires=9.0) for s in range(1000, 1000 + MIN_ROWS)])  # expiring: rows
    store.insert([msg(s, body=b"x" * 9000) for s in range(2000, 2000 + MIN_ROWS)])  # in segments: rows
    flush(store)
    assert tables(store) == (3 * MIN_ROWS - 1, 1, 0, 0)
    assert [m.seq for m in store.load_ready(1, 0, 10_000)] == [
        *range(1, MAX_ROWS + 1), *range(1000, 1000 + MIN_ROWS), *range(2000, 2000 + MIN_ROWS)]
    assert store.mailbox_stats() == {1: (MAX_ROWS + 2 * MIN_ROWS, 4 * (MAX_ROWS + MIN_ROWS) + 9000 * MIN_ROWS),
                                     2: (MIN_ROWS - 1, 4 * (MIN_ROWS - 1))}


def test_a_long_run_is_cut_into_packs_of_max_rows(store):
    store.insert([msg(s) for s in range(1, 3 * MAX_ROWS + MIN_ROWS // 2)])
    flush(store)
    messages, packs, _, _ = tables(store)
    assert (messages, packs) == (MIN_ROWS // 2 - 1, 3)
    assert len(store.load_ready(1, 0, 10_000)) == 3 * MAX_ROWS + MIN_ROWS // 2 - 1


def test_acks_in_windows_leave_gone_rows_until_the_pack_goes(store, tmp_path):
    store.insert([msg(s) for s in range(1, 2 * MAX_ROWS + 1)])
    flush(store)
    store.delete(range(1, 101))  # a consumer's window of 100
    flush(store)
    assert tables(store)[1:] == (2, 1, 0)
    store.set_deliveries([(3, 150), (2, MAX_ROWS + 5)])
    flush(store)
    assert tables(store)[1:] == (2, 1, 2)
    store.delete(range(101, MAX_ROWS + 1))  # the rest of the first pack: it goes with its rows
    flush(store)
    assert tables(store)[1:] == (1, 0, 1)
    store.close()
    again = SQLiteStore(str(tmp_path))
    try:
        rows = again.load_ready(1, 0, 10_000)
        assert [m.seq for m in rows] == list(range(MAX_ROWS + 1, 2 * MAX_ROWS + 1))
        assert rows[4].deliveries == 2 and rows[0].deliveries == 0
        assert again.mailbox_stats() == {1: (MAX_ROWS, 4 * MAX_ROWS)}
        again.delete([MAX_ROWS + 1, MAX_ROWS + 3])
        flush(again)
        assert again.mailbox_stats() == {1: (MAX_ROWS - 2, 4 * (MAX_ROWS - 2))}
        assert again.get(MAX_ROWS + 2) == msg(MAX_ROWS + 2) and again.get(MAX_ROWS + 3) is None
        assert again.max_seq() == 2 * MAX_ROWS
    finally:
        again.close()
    store.__init__(str(tmp_path))  # (the fixture closes it)


def test_an_id_stored_in_a_pack_is_not_stored_again(store):
    first = [msg(s) for s in range(1, 41)]
    store.insert(first)
    flush(store)
    assert store.mailboxes_of([first[7].msg_id], every=True) == {first[7].msg_id: 1}
    # A caller's mistake the store still skips: old ids again, as a pack and as a row.
    again = [msg(s, msg_id=first[s - 100].msg_id) for s in range(100, 120)] + [msg(s) for s in range(120, 140)]
    store.insert(again)
    store.insert([msg(200, msg_id=first[0].msg_id)])
    repeated = [msg(s, msg_id=b"r" * 16 if s % 2 else None) for s in range(300, 340)]  # one id 20 times
    store.insert(repeated)
    flush(store)
    store.commit_insert([msg(400, msg_id=first[1].msg_id)])  # a lone send's path too
    seqs = [m.seq for m in store.load_ready(1, 0, 1000)]
    assert seqs == [*range(1, 41), *range(120, 140), *[s for s in range(300, 340) if s % 2 == 0 or s == 301]]
    assert store.max_seq() == 400  # (a skipped row's seq is used all the same)


def test_a_failed_commit_rolls_the_packs_back_and_writes_them_again(store, monkeypatch):
    store.insert([msg(s) for s in range(1, 101)])
    flush(store)
    store.delete(range(1, 51))
    store.insert([msg(s, mailbox=2) for s in range(101, 201)])
    store.seal()  # the statements run now, in the open transaction
    real = store._commit_tx
    monkeypatch.setattr(store, "_commit_tx", lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error")))
    with pytest.raises(StoreError):
        store.commit()
    monkeypatch.setattr(store, "_commit_tx", real)
    assert tables(store)[1:3] == (1, 0)  # only the first commit's pack
    # Reads still see every write (the batches stay), and the commit succeeds next time.
    assert [m.seq for m in store.load_ready(1, 0, 1000)] == list(range(51, 101))
    assert [m.seq for m in store.load_ready(2, 0, 1000)] == list(range(101, 201))
    store.commit()
    assert tables(store)[1:3] == (2, 1)
    assert [m.seq for m in store.load_ready(1, 0, 1000)] == list(range(51, 101))
    assert len(store.get_many(list(range(1, 201)))) == 150


def test_a_directory_that_could_not_be_read_again_is_read_before_the_next_write(store, tmp_path, monkeypatch):
    """A failed commit whose rollback cannot re-read the packs (a disk
    returning errors) leaves the directory as the undone transaction left
    it; the next write reads it first, so no ack is lost and no pack is
    listed twice."""
    store.insert([msg(s) for s in range(1, 17)])
    flush(store)
    store.delete(range(1, 5))
    store.insert([msg(s) for s in range(17, 33)])
    store.seal()
    real_commit, real_load = store._commit_tx, Packs.load
    monkeypatch.setattr(store, "_commit_tx", lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error")))
    monkeypatch.setattr(Packs, "load", lambda self, db: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error")))
    with pytest.raises(StoreError):
        store.commit()
    monkeypatch.setattr(store, "_commit_tx", real_commit)
    monkeypatch.setattr(Packs, "load", real_load)
    store.commit()
    store.delete(range(17, 33))
    flush(store)
    assert tables(store)[1:3] == (1, 1)
    store.close()
    store.__init__(str(tmp_path))
    assert [m.seq for m in store.load_ready(1, 0, 100)] == list(range(5, 17))


def test_hashed_ids_are_never_packed(store):
    """idempotent_id()'s hashes would make a pack's id range the whole id
    space, and every lookup would read every pack: they stay rows."""
    store.insert([msg(s, msg_id=idempotent_id(f"key {s}")) for s in range(1, 41)])
    flush(store)
    assert tables(store)[:2] == (40, 0)
    assert store.mailboxes_of([idempotent_id("key 3")]) == {idempotent_id("key 3"): 1}


def test_a_mailbox_dropped_takes_its_packs(store):
    store.insert([msg(s) for s in range(1, 101)] + [msg(s, mailbox=2) for s in range(101, 201)])
    flush(store)
    store.delete([5])
    store.set_deliveries([(4, 7)])
    flush(store)
    store.delete_mailbox(1)
    flush(store)
    assert tables(store) == (0, 1, 0, 0)
    assert store.load_ready(1, 0, 1000) == [] and len(store.load_ready(2, 0, 1000)) == 100
    assert stored_count(store._reader) == 100


def test_the_relay_check_counts_packed_messages(store, tmp_path):
    store.insert([msg(s) for s in range(1, 101)])
    flush(store)
    store.delete(range(1, 11))
    flush(store)
    store.close()
    try:
        result = _data_dir(str(tmp_path))
        assert result.ok and "90 message(s)" in result.detail
    finally:
        store.__init__(str(tmp_path))


def test_random_steps_read_the_same_with_packs_and_without(tmp_path):
    """The relay's shapes at a smaller scale: SENDs of runs to a few
    mailboxes, windows of acks, redeliveries, commits, restarts."""
    rnd = random.Random(7)
    packed = SQLiteStore(str(tmp_path / "packed"), pack_min_rows=4)
    plain = SQLiteStore(str(tmp_path / "plain"), pack_min_rows=10**9)
    stores = [packed, plain]
    seq, live = 0, set()
    try:
        for step in range(400):
            op = rnd.random()
            if op < 0.35:
                mailbox, n = rnd.choice((1, 2, 3)), rnd.choice((1, 3, 5, 9, 30))
                rows = [msg(seq + i, mailbox, body=bytes([i % 256]) * rnd.choice((0, 10, 100))) for i in range(1, n + 1)]
                seq += n
                live.update(r.seq for r in rows)
                for s in stores:
                    s.insert(rows)
            elif op < 0.6 and live:
                ordered = sorted(live)
                start = rnd.randrange(len(ordered))
                gone = ordered[start:start + rnd.choice((1, 2, 7, 20))] + rnd.sample(ordered, min(2, len(ordered)))
                live.difference_update(gone)
                for s in stores:
                    s.delete(gone)
            elif op < 0.7 and live:
                counts = [(rnd.randrange(1, 5), x) for x in rnd.sample(sorted(live), min(3, len(live)))]
                for s in stores:
                    s.set_deliveries(counts)
            elif op < 0.9:
                for s in stores:
                    flush(s)
            elif op < 0.95:
                for s in stores:
                    s.seal()
            else:
                for i, s in enumerate(stores):
                    s.close()
                    stores[i] = SQLiteStore(s.path.rsplit("/", 1)[0], pack_min_rows=4 if i == 0 else 10**9)
                packed, plain = stores
            a, b = stores
            for mailbox in (1, 2, 3):
                for after in (0, seq // 2):
                    assert a.load_ready(mailbox, after, 25) == b.load_ready(mailbox, after, 25), step
            probe = rnd.sample(range(1, seq + 2), min(20, seq + 1))
            assert a.get_many(probe) == b.get_many(probe), step
            ids = [p.to_bytes(16, "big") for p in probe]
            assert a.mailboxes_of(ids, every=True) == b.mailboxes_of(ids, every=True), step
            assert a.mailbox_stats() == b.mailbox_stats() and a.max_seq() == b.max_seq(), step
        assert {s for s, _ in packed_rows(stores[0]._reader)}, "no run was packed"
    finally:
        for s in stores:
            s.close()
