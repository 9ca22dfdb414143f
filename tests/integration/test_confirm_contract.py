"""The durability contract at the relay: a CONFIRM leaves strictly after the
commit (the fsync) that holds every message it confirms.

A real Relay loop (in a thread) runs over the SQLite store, slowed down (or
made to fail) between its writes and the COMMIT, or failing the WAL's sync
after it (the writer runs at synchronous=NORMAL and syncs the WAL itself
after each COMMIT but those of acks alone); what is durable is what an
independent reader saw when a WAL sync that then returned began.  Every CONFIRM the loop hands to its socket
is checked, at that instant, against what has been committed.  Load comes
from a real Node: one-at-a-time sends (a commit per send) and pipelined
send_many (turns overlapping their commits).  Bodies of 64 KiB in a batch, and
larger ones sent alone, go to segment files (store/segments.py): their CONFIRM
must follow both syncs, the segment's fdatasync and the COMMIT of the row that
points at it, or, for a lone send's body that the WAL's flush makes durable
(store/writeback.py), its write to the device and a WAL sync that began after.
A lone send's row with a small body is made durable by its record in the
lone-send journal (store/journal.py), synced before its CONFIRM and written
into the database after it: durable is then also what the journal's syncs
returned for, until the ring wraps (after a WAL sync that covers them).
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from murano_zmq import Node
from murano_zmq.protocol.frames import Cmd, decode
from murano_zmq.relay.server import Relay, RelayConfig
from murano_zmq.store import writeback
from murano_zmq.store.segments import Segments
from murano_zmq.store.packs import packed_rows, stored_ids
from murano_zmq.store.sqlite import SQLiteStore, StoreError

from ..helpers import drain, free_tcp_endpoint, wait_for, without_journal

SYNC_DELAY = 0.003  # widens the window between the writes and the end of the sync


class RecordingStore(SQLiteStore):
    """SQLiteStore that sleeps inside commit() before the COMMIT, and can
    fail commits there, or the WAL's sync after one, as a failed fsync
    would.  What is durable: the ids an independent connection saw when a
    WAL sync began, once that sync returned (in WAL mode a reader sees a
    transaction once its COMMIT is done)."""

    fail_next = 0  # how many of the next commits fail
    fail_wal_next = 0  # how many of the next WAL syncs (after a COMMIT) fail
    fail_journal_next = 0  # how many of the next appends to the lone-send journal fail
    journal_syncs = 0
    commit_delay = SYNC_DELAY
    # Set: the next WAL sync a committer thread runs waits for it (and
    # sets gate_reached), then fails if the gate's `fails` is true.
    gate: threading.Event | None = None
    gate_held = False  # a sync is waiting at the gate now
    held_overlaps = 0  # COMMITs that ran meanwhile
    wal_syncs = 0
    failed = False
    commits = 0
    lone_commits = 0

    def __init__(self, data_dir: str):
        self.wal_synced: set[bytes] = set()  # ids a WAL sync made durable (before super: it commits)
        super().__init__(data_dir)
        # Segment bytes count as synced only once a sync that began after
        # their write returned: seg -> end of the synced bytes.  (The files
        # found at start are synced: by their commits, and the newest again
        # at start, Segments.start.)
        self.synced_to: dict[int, int] = self._segments.on_disk()
        self.segment_syncs = 0
        self.unsynced_writes = 0
        self.written_unsynced: dict[int, int] = {}  # seg -> end of bodies on the device, not flushed
        self.gate_reached = threading.Event()
        written: dict[int, int] = {}
        segments = self._segments
        append, sync, wait_unsynced = segments.append, segments.sync, segments.wait_unsynced
        write_early = segments.write_early
        self.segment_sync_fails = 0  # how many of the next segment syncs fail

        def recording_append(body, place=append):
            seg, off, length = place(body)
            written[seg] = max(written.get(seg, 0), off + length)
            return seg, off, length

        def recording_sync(**kw):
            before = dict(written)
            if self.segment_sync_fails:
                self.segment_sync_fails -= 1
                self.failed = True
                segments._current = None  # (what a failed sync leaves: the segment is written no more)
                raise OSError(5, "Input/output error (injected segment fdatasync failure)")
            sync(**kw)
            self.synced_to.update(before)
            self.segment_syncs += 1

        def recording_wait_unsynced():
            seg, _, end = segments._unsynced
            wait_unsynced()
            self.written_unsynced[seg] = max(self.written_unsynced.get(seg, 0), end)
            self.unsynced_writes += 1

        early_sync, early_synced = segments.early_sync, segments.early_synced
        early_spans: dict[int, dict[int, int]] = {}  # a sync begun in a thread -> what it covers

        def recording_early_sync():
            job = early_sync()
            if job is not None:
                early_spans[id(job)] = dict(written)
            return job

        def recording_early_synced(job, error):
            before = early_spans.pop(id(job))
            failure = early_synced(job, error)
            if error is None:
                self.synced_to.update(before)
                self.segment_syncs += 1
            return failure

        segments.append, segments.sync = recording_append, recording_sync
        segments.early_sync, segments.early_synced = recording_early_sync, recording_early_synced
        segments.write_early = lambda body: recording_append(body, write_early)
        segments.wait_unsynced = recording_wait_unsynced
        # ids whose journal record a sync made durable, since the ring's last
        # wrap (which follows a WAL sync: the ids it covers are in wal_synced)
        self.journal_synced: set[bytes] = set()
        if self._journal is not None:
            journal = self._journal
            journal_append, journal_wrap = journal.append, journal.wrap

            def recording_journal_append(record):
                if self.fail_journal_next:
                    self.fail_journal_next -= 1
                    self.failed = True
                    raise OSError(5, "Input/output error (injected fdatasync failure)")
                journal_append(record)
                self.journal_syncs += 1

            def recording_journal_wrap():
                journal_wrap()
                self.journal_synced.clear()

            journal.append, journal.wrap = recording_journal_append, recording_journal_wrap

    def _journaled(self, messages, held) -> bool:
        journaled = super()._journaled(messages, held)
        if journaled:
            self.journal_synced.add(messages[0].msg_id)
        return journaled

    def commit(self) -> None:
        if self.in_transaction:
            self._slow_sync()
        super().commit()

    def commit_insert(self, messages) -> None:  # a lone send's path (engine.send_alone)
        self.lone_commits += 1
        self._slow_sync()
        super().commit_insert(messages)

    def _sync_wal(self) -> None:
        """The WAL's sync after a COMMIT (the writer runs at NORMAL): what
        a reader sees when it begins is durable once it returns."""
        visible = self._visible_ids()
        on_device = dict(self.written_unsynced)  # bodies this sync's flush makes durable
        self.wal_syncs += 1
        gate = self.gate
        if gate is not None and threading.current_thread().name.startswith("relay-commit"):
            self.gate, self.gate_held = None, True
            self.gate_reached.set()
            try:
                assert gate.wait(30)
            finally:
                self.gate_held = False
            if gate.fails:
                self.failed = True
                raise OSError(5, "Input/output error (injected fdatasync failure)")
        if self.fail_wal_next:
            self.fail_wal_next -= 1
            self.failed = True
            raise OSError(5, "Input/output error (injected fdatasync failure)")
        super()._sync_wal()
        self.wal_synced |= visible
        for seg, end in on_device.items():
            self.synced_to[seg] = max(self.synced_to.get(seg, 0), end)

    def _commit_tx(self, sync_later: bool = False) -> None:
        held = self.gate_held
        super()._commit_tx(sync_later)
        if held:
            self.held_overlaps += 1

    def _visible_ids(self) -> set[bytes]:
        reader = sqlite3.connect(self.path, timeout=10)
        try:
            return stored_ids(reader)
        finally:
            reader.close()

    def _slow_sync(self) -> None:
        self.commits += 1
        time.sleep(self.commit_delay)
        if self.fail_next:
            self.fail_next -= 1
            self.failed = True
            raise StoreError(sqlite3.OperationalError("disk I/O error (injected)"))

    def durable(self, ids: list[bytes]) -> set[bytes]:
        """Which of `ids` a fresh reader finds committed, with their body's
        segment bytes (if any) synced."""
        reader = sqlite3.connect(self.path, timeout=10)
        try:
            found = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(msg_id for msg_id, seg, end in reader.execute(
                    f"SELECT msg_id, seg, seg_off + seg_len FROM messages WHERE msg_id IN ({marks})", chunk)
                    if seg is None or end <= self.synced_to.get(seg, 0))
            found |= {m for _, m in packed_rows(reader)} & set(ids)  # (packs keep bodies in the database)
            found = found & self.wal_synced if self._wal_fd is not None else found
            return found | (self.journal_synced & set(ids))
        finally:
            reader.close()


class Watch:
    """Taps the relay: SEND ids by (peer, req) on the way in, CONFIRMs on the way out."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.sends: dict[tuple[bytes, int], list[bytes]] = {}
        self.confirmed: list[bytes] = []
        self.violations: list[str] = []
        send = relay._send

        def checked_send(sock, out):
            for identity, frames in out:
                command = decode(frames)
                if command.cmd != Cmd.CONFIRM:
                    continue
                req, errors = command.fields
                refused = {e[0] for e in errors}
                ids = [i for n, i in enumerate(self.sends.get((identity, req), [])) if n not in refused]
                missing = set(ids) - relay.engine.store.durable(ids) if ids else ()
                if missing:
                    self.violations.append(f"CONFIRM {req} left before {len(missing)} of its ids were synced")
                self.confirmed.extend(ids)
            send(sock, out)

        relay._send = checked_send

    def tap_engine(self) -> None:
        engine = self.relay.engine
        receive = engine.receive

        def recording_receive(identity, frames, now, user=None, key=None):
            command = decode(frames)
            if command.cmd == Cmd.SEND:
                req, records = command.fields
                self.sends[(identity, req)] = [r[0] for r in records]
            return receive(identity, frames, now, user, key)

        engine.receive = recording_receive
        send_alone = engine.send_alone

        def recording_send_alone(identity, frames, now, user=None):
            command = decode(frames)
            if command.cmd == Cmd.SEND:
                req, records = command.fields
                self.sends[(identity, req)] = [r[0] for r in records]
            return send_alone(identity, frames, now, user)

        engine.send_alone = recording_send_alone


@pytest.fixture
def relay_with(tmp_path):
    started = []

    def start(store_class=RecordingStore, bind: str | None = None):
        """A relay on tmp_path/data (a second one: on `bind`, the first's
        endpoint, once the first has stopped)."""
        relay = Relay(RelayConfig(bind=bind or free_tcp_endpoint(), data_dir=str(tmp_path / "data")),
                      store_factory=store_class)
        watch = Watch(relay)
        errors = []

        def run():
            try:
                relay.run()
            except BaseException as exc:  # a failed sync may end the loop
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        relay.test_thread = thread
        assert relay.wait_ready(10)
        watch.tap_engine()
        started.append((relay, thread))
        return relay, watch, errors

    yield start
    for relay, thread in started:
        relay.stop()
        thread.join(10)


def test_one_at_a_time_confirms_follow_their_commit(relay_with):
    relay, watch, _ = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=20) as node:
        ids = [node.send("contract.one", b"x" * 100) for _ in range(60)]
    assert not watch.violations
    assert set(ids) <= set(watch.confirmed)
    assert relay.engine.store.durable(ids) == set(ids)
    assert relay.engine.store.lone_commits >= 30  # most took the lone-send path (engine.send_alone)


def test_no_confirm_for_a_lone_send_whose_commit_failed(relay_with):
    relay, watch, errors = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = [node.send("contract.lone", b"a") for _ in range(5)]
        store = relay.engine.store
        lone = store.lone_commits
        store.fail_next = 1
        ids += [node.send("contract.lone", b"b") for _ in range(5)]  # the first is resent after a BYE
        assert store.failed and store.lone_commits > lone
    assert not errors
    assert not watch.violations
    assert store.durable(ids) == set(ids)
    assert store.durable(watch.confirmed) == set(watch.confirmed)


def halted_and_restarted(relay_with, relay: Relay, unconfirmed: list, cause: str = "injected fdatasync failure"):
    """Wait until a failed sync (whose text holds `cause`) has stopped
    `relay` (Relay._halt), check that none of the `unconfirmed` futures was
    confirmed, then start another relay on its data and endpoint: (relay,
    watch, errors) of the new one."""
    wait_for(lambda: relay.halted_by is not None, 15, what="the relay stopped by its failed sync")
    assert relay.halted_by.unsynced and cause in str(relay.halted_by)
    relay.test_thread.join(15)
    assert not relay.test_thread.is_alive()
    assert not any(f.done() for f in unconfirmed)
    wait_for(lambda: port_free(relay.endpoint), 10, what="the stopped relay's port closed")
    return relay_with(bind=relay.endpoint)


def port_free(endpoint: str) -> bool:
    """Can `endpoint` (tcp://host:port) be bound?  (libzmq closes a
    listener in its own thread, after the socket's close returned.)"""
    host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, int(port)))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_a_failed_wal_sync_stops_the_relay_and_a_restart_takes_the_resend(relay_with):
    """The COMMIT went through but the WAL's fdatasync after it failed: the
    send is not confirmed and the relay stops (a later sync could succeed
    over pages the disk never got, and a resend found stored in them would
    be confirmed).  Restarted on the same data, it takes the node's resend;
    every confirm that left either relay is durable."""
    relay, watch, errors = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = [node.send(f"contract.wal.{i}", b"a") for i in range(5)]  # (new mailboxes: no lone path)
        store = relay.engine.store
        assert store.wal_syncs >= 5
        store.fail_wal_next = 1
        pending = node.send_async("contract.wal.new", b"b")
        again, watch_again, errors_again = halted_and_restarted(relay_with, relay, [pending])
        assert store.failed
        ids.append(pending.result(30))
        ids += [node.send("contract.wal.new", b"c") for _ in range(3)]
    assert ids[5] not in watch.confirmed  # (confirmed by the second relay only)
    assert not errors and not errors_again
    assert not watch.violations and not watch_again.violations
    assert again.engine.store.durable(ids) == set(ids)


def test_a_failed_journal_sync_stops_the_relay_and_a_restart_takes_the_resend(relay_with):
    """A lone send's record in the journal (store/journal.py) failed its
    sync: as a failed WAL sync, no confirm, the relay stops, a restart
    takes the resend, and every confirm that left either relay is durable."""
    relay, watch, errors = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = [node.send("contract.journal", b"a") for _ in range(5)]
        store = relay.engine.store
        assert store.journal_syncs >= 3  # (the first made the mailbox: the general path)
        store.fail_journal_next = 1
        pending = node.send_async("contract.journal", b"b")
        again, watch_again, errors_again = halted_and_restarted(relay_with, relay, [pending])
        assert "lone-send journal" in str(relay.halted_by)
        ids.append(pending.result(30))
        ids += [node.send("contract.journal", b"c") for _ in range(3)]
    assert ids[5] not in watch.confirmed
    assert not errors and not errors_again
    assert not watch.violations and not watch_again.violations
    assert again.engine.store.durable(ids) == set(ids)


def test_acks_alone_commit_without_a_sync(relay_with):
    """A transaction of acks alone is not synced (a crash would only
    deliver those messages again); every send's is."""
    relay, watch, _ = relay_with()
    store = relay.engine.store
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = node.send_many([("contract.acks", b"m")] * 50)
        syncs, journal_syncs = store.wal_syncs, store.journal_syncs
        consumer = node.consume("contract.acks", direct=False)
        for _ in range(50):
            consumer.get(timeout=10).ack()
        deadline = time.monotonic() + 10
        while store._visible_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not store._visible_ids()  # every ack committed
        assert store.wal_syncs == syncs and store.journal_syncs == journal_syncs
        ids.append(node.send("contract.acks", b"after"))  # (a lone send: the journal's sync)
        assert store.wal_syncs + store.journal_syncs > syncs + journal_syncs
    assert not watch.violations
    assert store.durable(ids[-1:]) == set(ids[-1:])


def test_lone_sends_among_held_acks_confirm_after_their_sync(relay_with):
    """A consumer's acks are held for a later commit, and their deletes
    written ahead while the loop is idle (an open transaction); a lone send
    then commits them in its own transaction, and its CONFIRM follows that
    transaction's sync."""
    relay, watch, _ = relay_with()
    store, engine = relay.engine.store, relay.engine
    written_ahead, open_at_lone = [], []
    write, commit_insert = engine.write_held_deletes, store.commit_insert
    engine.write_held_deletes = lambda: (written_ahead.append(1), write())[1]
    store.commit_insert = lambda rows: (open_at_lone.append(store._tx_open), commit_insert(rows))[1]
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        node.send("contract.held.out", b"first")  # (the mailbox exists: later sends may take the lone path)
        node.send_many([("contract.held", b"m")] * 100)
        consumer = node.consume("contract.held", prefetch=10, direct=False)
        ids = []
        for _ in range(10):
            before = len(written_ahead)
            for _ in range(10):
                consumer.get(timeout=10).ack()
            wait_for(lambda: len(written_ahead) > before, 10, interval=0.001, what="the acks' deletes written ahead")
            ids.append(node.send("contract.held.out", b"x"))
    assert any(open_at_lone), "a lone send found the held deletes' transaction open"
    assert not watch.violations
    assert store.durable(ids) == set(ids)


def test_pipelined_confirms_follow_their_commit(relay_with):
    relay, watch, _ = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = []
        for _ in range(5):
            ids += node.send_many([("contract.many", b"y" * 200)] * 2000, timeout=30)
        # concurrent single sends while a backlog is being committed
        futures = [node.send_async("contract.many", b"z") for _ in range(500)]
        ids += [f.result(30) for f in futures]
    assert not watch.violations
    assert relay.engine.store.commits > 1  # many turns, not one transaction
    assert set(ids) <= set(watch.confirmed)
    assert relay.engine.store.durable(ids) == set(ids)


def overlap_a_held_sync(relay: Relay, first: Node, second: Node, fails: bool = False) -> list:
    """Pipelined rounds from `first` until a committer thread's WAL sync is
    held at the store's gate, then one send from `second`, whose commit
    should write and COMMIT while that sync is held (`fails`: the held sync
    then fails).  An attempt where the loop itself was waiting for the held
    sync meanwhile (its own commit found its batch taken by the held one)
    proves nothing: it is let go and tried again.  The futures of every send."""
    store = relay.engine.store
    # (no pause before a threaded commit takes the writer: during one, the
    # loop could seal its next batch for the held commit to take)
    store.commit_delay = 0.0
    futures = []
    for _ in range(ATTEMPTS):
        release = threading.Event()
        store.gate_reached.clear()
        release.fails = fails  # (read when this gate opens: each attempt's gate its own)
        store.gate = release
        for _ in range(ROUNDS):
            futures += [first.send_async("contract.overlap", b"o" * 200) for _ in range(600)]
            if store.gate_reached.wait(2):
                break
        else:
            raise AssertionError("no commit went to a committer thread")
        late = second.send_async("contract.overlap", b"late")
        futures.append(late)
        try:
            wait_for(lambda: store.held_overlaps, 3, what="a COMMIT during the held sync")
        except AssertionError:
            release.fails = False  # (a failed sync would stop the relay: try again)
            release.set()
            continue
        assert store.gate_held and not late.done()  # written and COMMITted, not confirmed
        release.set()
        return futures
    raise AssertionError(f"no COMMIT ran during a held sync in {ATTEMPTS} attempts")


ROUNDS = 20
ATTEMPTS = 8


def test_a_commit_written_while_the_last_one_syncs_confirms_after_its_own_sync(relay_with):
    """While a threaded commit's WAL sync is held, another sender's send is
    written and COMMITted (store/batched.py commit()); neither is confirmed
    before a sync that began after its own COMMIT returned."""
    relay, watch, _ = relay_with()
    store = relay.engine.store
    with Node("first", relay=relay.endpoint, direct=False, timeout=30) as first, \
            Node("second", relay=relay.endpoint, direct=False, timeout=30) as second:
        ids = [f.result(30) for f in overlap_a_held_sync(relay, first, second)]
    assert store.held_overlaps
    assert not watch.violations
    assert set(ids) <= set(watch.confirmed)
    assert store.durable(ids) == set(ids)


def test_no_confirm_for_commits_that_overlapped_a_failed_sync(relay_with):
    """The held sync fails after another commit COMMITted behind it: the
    confirms of both are withheld (the WAL may have a hole under the
    second) and the relay stops; restarted on the same data, it takes the
    nodes' resends, and every send ends up synced and confirmed."""
    relay, watch, errors = relay_with()
    store = relay.engine.store
    with Node("first", relay=relay.endpoint, direct=False, timeout=30) as first, \
            Node("second", relay=relay.endpoint, direct=False, timeout=30) as second:
        futures = overlap_a_held_sync(relay, first, second, fails=True)
        # (the send that COMMITted behind the failed sync, at least, went unconfirmed)
        again, watch_again, errors_again = halted_and_restarted(relay_with, relay, futures[-1:])
        ids = [f.result(30) for f in futures]
        assert store.failed
    assert not errors and not errors_again
    assert not watch.violations and not watch_again.violations
    assert again.engine.store.durable(ids) == set(ids)


def test_no_confirm_for_a_commit_that_failed(relay_with):
    """A sync that fails: none of its sends is confirmed; the relay starts
    over from the store, the node resends, and every send ends up synced
    and confirmed once its own commit returned."""
    relay, watch, errors = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        first = node.send("contract.fail", b"v")
        relay.engine.store.fail_next = 1
        futures = [node.send_async("contract.fail", b"w") for _ in range(200)]
        ids = [f.result(30) for f in futures]
        store = relay.engine.store
        assert store.failed
    assert not errors  # the relay survived the failed sync
    assert not watch.violations
    assert store.durable([first, *ids]) == {first, *ids}
    assert store.durable(watch.confirmed) == set(watch.confirmed)


BIG = b"L" * 65536  # above the segment threshold: a lone send or a batch puts the body in a segment file


@pytest.fixture
def flush_shared(monkeypatch):
    """Lone bodies flushed by the WAL's sync (store/writeback.py), as on
    ext4, wherever the tests' directory is."""
    monkeypatch.setattr(writeback, "shares_flush", lambda *args: True)


class NoJournalStore(RecordingStore):
    def __init__(self, data_dir: str):
        super().__init__(data_dir)
        without_journal(self)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no journal"])
def test_large_body_confirms_follow_both_syncs(relay_with, flush_shared, journal):
    """With the journal, a lone send's record holds its body, and the body
    goes to a segment after the CONFIRM, synced before its row's commit."""
    relay, watch, _ = relay_with(RecordingStore if journal else NoJournalStore)
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        lone = [node.send("contract.big", BIG) for _ in range(20)]
        ids = list(lone)
        for _ in range(3):
            ids += node.send_many([("contract.big", BIG)] * 150, timeout=30)
        ids += [f.result(30) for f in [node.send_async("contract.big", b"s") for _ in range(100)]]
    store = relay.engine.store
    if journal:
        assert store.journal_syncs >= 19 and store.unsynced_writes == 0
    else:  # most lone bodies are written over the zeros ahead: flushed by the WAL's sync
        assert store.unsynced_writes >= 10
    assert store.segment_syncs >= 3
    reader = sqlite3.connect(store.path, timeout=10)
    try:
        in_segments = {msg_id for msg_id, seg in reader.execute("SELECT msg_id, seg FROM messages") if seg is not None}
    finally:
        reader.close()
    assert store.lone_commits >= 19  # (the first created the mailbox: not a lone commit)
    assert set(lone) <= in_segments
    assert not watch.violations
    assert set(ids) <= set(watch.confirmed)
    assert store.durable(ids) == set(ids)


def test_a_failed_sync_of_journaled_bodies_stops_the_relay_and_the_journal_has_them(relay_with):
    """Lone 64 KiB sends confirmed from the journal, their bodies written to
    a segment after each CONFIRM; the sync before their rows' commit fails:
    the relay stops, confirming nothing more, and its restart writes the
    journal's copies in: every body whole."""
    relay, watch, errors = relay_with()
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = [node.send("contract.bigjournal", BIG + bytes([i])) for i in range(4)]
        store = relay.engine.store
        assert store.journal_syncs >= 3 and store._owed  # (the first made the mailbox: the general path)
        wait_for(lambda: not store._owed_early, 10, what="the bodies written to a segment")
        store.segment_sync_fails = 1
        with ThreadPoolExecutor(1) as pool:  # (a send of two: not journaled, so the rows owed go first)
            pending = pool.submit(node.send_many, [("contract.bigjournal", b"s")] * 2, 30)
            again, watch_again, errors_again = halted_and_restarted(relay_with, relay, [pending],
                                                                    "injected segment fdatasync failure")
            assert "journaled sends" in str(relay.halted_by)
            ids += pending.result(30)
        got = drain(node.consume("contract.bigjournal", prefetch=20), expect=len(ids))
    assert [m.id for m in got] == ids
    assert [m.body for m in got[:4]] == [BIG + bytes([i]) for i in range(4)]
    assert not errors and not errors_again
    assert not watch.violations and not watch_again.violations


def test_a_failed_write_of_a_lone_body_stops_the_relay_without_a_confirm(relay_with, flush_shared, monkeypatch):
    """A lone send's body written to be flushed with the WAL (store/
    writeback.py) and whose write fails after the COMMIT of its row: no
    confirm, and the relay stops as after a failed sync; restarted, it takes
    the resend (the body it finds is written again and synced at start)."""
    failing = []
    real_wait = writeback.wait_written

    def wait_written(fd, start, length):
        if failing:
            failing.pop()
            raise OSError(5, "Input/output error (injected body write failure)")
        real_wait(fd, start, length)

    monkeypatch.setattr(writeback, "wait_written", wait_written)
    rewritten = []  # bodies of the last commit found whole at start, written again to be synced
    real_rewrite = Segments.rewrite_if_whole
    monkeypatch.setattr(Segments, "rewrite_if_whole", lambda self, seg, off, length, crc: (
        rewritten.append(((seg, off), real_rewrite(self, seg, off, length, crc))), rewritten[-1][1])[1])
    relay, watch, errors = relay_with(NoJournalStore)
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30) as node:
        ids = [node.send("contract.bigfail", BIG) for _ in range(3)]
        store = relay.engine.store
        assert store.unsynced_writes >= 1
        while not store._segments.fits_unsynced(len(BIG)):  # (a send that grows the file syncs its body)
            ids.append(node.send("contract.bigfail", BIG))
        failing.append(True)
        failed_at = (store._segments._current, store._segments._end)  # where its body goes
        pending = node.send_async("contract.bigfail", BIG)
        again, watch_again, errors_again = halted_and_restarted(relay_with, relay, [pending],
                                                                "injected body write failure")
        assert not failing and store._segments._current is None  # (written no more)
        # The failed body's bytes (the newest segment's last) were in the page
        # cache: found whole, written again, and synced by start().
        assert (failed_at, True) in rewritten and all(whole for _, whole in rewritten)
        failed_id = pending.result(30)
        ids.append(failed_id)
        ids += [node.send("contract.bigfail", BIG) for _ in range(3)]
    assert failed_id not in watch.confirmed  # (confirmed by the second relay only)
    assert not errors and not errors_again
    assert not watch.violations and not watch_again.violations
    assert again.engine.store.durable(ids) == set(ids)
