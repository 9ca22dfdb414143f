"""Commits that overlap (store/batched.py commit()): the WAL's sync runs
after the commit lock is released, so a second commit writes and COMMITs
while the first one syncs, and each returns only after a sync that began
after its own COMMIT.  A failed sync fails every commit it may have
covered and every later one, rollback() or not."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from murano_zmq.store.base import StoredMessage
from murano_zmq.store.faults import SyncFailed
from murano_zmq.store.sqlite import SQLiteStore, StoreError

from tests.helpers import wait_for

WAIT = 10.0


def msg(seq: int, body: bytes = b"body") -> StoredMessage:
    return StoredMessage(seq, 1, seq.to_bytes(16, "big"), b"\x80", body, 1.0, None, 0)


class GatedStore(SQLiteStore):
    """The first WAL sync after `gate()` blocks until released; every
    sync records which rows an independent reader saw as it began (what
    it makes durable) and how it ended."""

    def __init__(self, data_dir: str):
        self.events: list[tuple[str, frozenset]] = []
        self._held: threading.Event | None = None
        self.sync_started = threading.Event()
        self.fail_syncs = 0
        super().__init__(data_dir)

    def gate(self) -> threading.Event:
        self._held = threading.Event()
        self.sync_started.clear()
        return self._held

    def visible(self) -> frozenset:
        reader = sqlite3.connect(self.path, timeout=10)
        try:
            return frozenset(seq for (seq,) in reader.execute("SELECT seq FROM messages"))
        finally:
            reader.close()

    def _sync_wal(self) -> None:
        seen = self.visible()
        self.events.append(("sync begins", seen))
        held, self._held = self._held, None
        if held is not None:
            self.sync_started.set()
            assert held.wait(WAIT)
        if self.fail_syncs:
            self.fail_syncs -= 1
            self.events.append(("sync failed", seen))
            raise OSError(5, "Input/output error (injected fdatasync failure)")
        super()._sync_wal()
        self.events.append(("sync returned", seen))


@pytest.fixture
def store(tmp_path):
    s = GatedStore(str(tmp_path))
    yield s
    s.close()


def commit_in_thread(store: SQLiteStore, seq: int) -> tuple[threading.Thread, list]:
    """insert + seal here, commit() in a thread; its outcome lands in the list."""
    store.insert([msg(seq)])
    store.seal()
    outcome: list = []

    def run():
        try:
            store.commit()
            outcome.append(("returned", frozenset(durable(store.events))))
        except StoreError as exc:
            outcome.append(("failed", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def durable(events: list) -> set[int]:
    """The seqs some sync that returned made durable."""
    found: set[int] = set()
    for what, seen in list(events):
        if what == "sync returned":
            found |= seen
    return found


def test_a_second_commit_writes_while_the_first_syncs(store):
    release = store.gate()
    first, first_outcome = commit_in_thread(store, 1)
    assert store.sync_started.wait(WAIT)  # the first commit is in its sync, held there
    assert store.writing is False  # ... and holds the writer no more
    second, second_outcome = commit_in_thread(store, 2)
    # The second commit's COMMIT goes through while the first one's sync is held...
    wait_for(lambda: 2 in store.visible(), WAIT, what="the second COMMIT")
    # ... but neither returns before a sync of its own COMMIT has.
    assert not first_outcome and not second_outcome
    release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert first_outcome[0][0] == "returned" and 1 in first_outcome[0][1]
    assert second_outcome[0][0] == "returned" and 2 in second_outcome[0][1]
    # The second returned after a sync that began once its row was committed.
    assert any(what == "sync returned" and 2 in seen for what, seen in store.events)


def test_a_commit_with_nothing_owed_makes_no_sync(store):
    store.insert([msg(1)])
    store.seal()
    store.commit()
    syncs = sum(1 for what, _ in store.events if what == "sync begins")
    store.commit()  # nothing sealed, nothing owed: no sync of its own
    assert sum(1 for what, _ in store.events if what == "sync begins") == syncs


def test_a_failed_sync_fails_the_commit_that_overlapped_it(store):
    release = store.gate()
    store.fail_syncs = 1
    first, first_outcome = commit_in_thread(store, 1)
    assert store.sync_started.wait(WAIT)
    second, second_outcome = commit_in_thread(store, 2)
    wait_for(lambda: 2 in store.visible(), WAIT, what="the second COMMIT")
    release.set()
    first.join(WAIT)
    second.join(WAIT)
    # The first sync failed: neither commit may say it is durable, though
    # the second one's own sync would have succeeded (the WAL may now hold
    # a hole under it).
    assert first_outcome[0][0] == "failed"
    assert second_outcome[0][0] == "failed"
    # Both say so: the relay stops on such a failure (Relay._halt).
    assert first_outcome[0][1].unsynced and second_outcome[0][1].unsynced
    with pytest.raises(StoreError) as later:  # and every later one
        store.insert([msg(3)])
        store.seal()
        store.commit()
    assert later.value.unsynced
    # ... rollback() or not (a later sync that succeeded would not prove the
    # lost pages): the store stays failed, and the relay stops on it.
    store.rollback()
    assert store.sync_failed is not None
    syncs = sum(1 for what, _ in store.events if what == "sync begins")
    with pytest.raises(StoreError) as after_rollback:
        store.insert([msg(4)])
        store.seal()
        store.commit()
    assert after_rollback.value.unsynced
    # Closing it commits nothing more (nor syncs).
    store.insert([msg(5)])
    store.close()
    assert sum(1 for what, _ in store.events if what == "sync begins") == syncs
    assert 5 not in store.visible()


def test_commits_that_change_segment_counts_sync_before_they_return_the_lock(tmp_path):
    """A commit that adds or drops segment rows syncs inside the lock: a
    segment with no rows left is deleted only after the WAL's sync."""
    store = GatedStore(str(tmp_path))
    try:
        store.insert([msg(1, body=b"x" * (64 << 10))])  # a segment body
        release = store.gate()
        thread, outcome = commit_in_thread(store, 2)
        assert store.sync_started.wait(WAIT)
        assert store.writing is True  # its sync runs under the commit lock
        release.set()
        thread.join(WAIT)
        assert outcome[0][0] == "returned" and {1, 2} <= outcome[0][1]
    finally:
        store.close()


def test_a_commit_with_nothing_to_sync_waits_for_the_syncs_owed_before_it(store):
    """Acks alone are not synced, but the relay may hold a reply on their
    commit that promises an earlier COMMIT's rows (a resend found stored):
    it returns only after the sync still owed for those."""
    store.insert([msg(1)])
    store.seal()
    store.commit()
    release = store.gate()
    first, first_outcome = commit_in_thread(store, 2)
    assert store.sync_started.wait(WAIT)
    store.delete([1])  # acks alone
    store.seal()
    acked: list = []
    acks = threading.Thread(target=lambda: (store.commit(), acked.append(True)), daemon=True)
    acks.start()
    wait_for(lambda: 1 not in store.visible(), WAIT, what="the acks' COMMIT")
    acks.join(0.2)
    assert not acked  # row 2's sync is still held
    release.set()
    first.join(WAIT)
    acks.join(WAIT)
    assert acked and first_outcome[0][0] == "returned"


def test_a_failed_sync_under_the_lock_fails_a_sync_still_owed(store):
    """A commit that changes a segment's rows syncs under the lock; if
    that sync fails, an earlier commit whose own sync has not begun may not
    say it is durable either (one fsync error is reported once: a later
    sync of the same file may succeed over lost pages)."""
    store.insert([msg(1)])
    store.seal()
    with store._commit_lock:  # what commit() does up to its sync: COMMIT, the sync owed
        store._commit_sealed(store._pending()[:-1])
        store._batches = store._batches[1:]
        owed = store._committed_gen
    store.fail_syncs = 1
    store.insert([msg(2, body=b"x" * (64 << 10))])  # a segment body
    store.seal()
    with pytest.raises(StoreError) as failed:
        store.commit()
    assert failed.value.unsynced
    with pytest.raises(SyncFailed):
        store._sync_owed(owed)
    assert 1 not in durable(store.events)
    store.rollback()  # (the relay stops instead: Relay._halt)
    with pytest.raises(SyncFailed):
        store._sync_owed(owed)
    assert 1 not in durable(store.events)
