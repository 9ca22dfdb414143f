"""The lone-send journal (store/journal.py) in a real relay process: sends
confirmed from the journal whose rows never reached the database (the relay
killed -9 in between) are all there after a restart, once, in order, and
marked redelivered.

A kill -9 alone leaves the rows' unsynced transactions in the page cache,
where SQLite finds them: the child relay here leaves the rows owed once a
trigger file exists, as a power loss after the journal's sync would.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading

import pytest

from murano_zmq import Node
from murano_zmq.relay.server import Relay, RelayConfig
from murano_zmq.store.sqlite import SQLiteStore
from murano_zmq.testing import relay_answers

from ..helpers import drain, free_tcp_endpoint

# The relay's own main; while TRIGGER exists a journaled row is never written
# into the database (its large body is still written into a segment first).
OWING_RELAY = """
import os, sys
from murano_zmq.relay.main import main
from murano_zmq.store.sqlite import SQLiteStore
trigger = sys.argv[1]
real = SQLiteStore._write_owed_locked
def write_owed_locked(self):
    if not os.path.exists(trigger):
        real(self)
SQLiteStore._write_owed_locked = write_owed_locked
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("pad", [0, 64 * 1024], ids=["small", "64KiB"])
def test_sends_confirmed_from_the_journal_survive_a_kill_before_their_rows_were_written(children, tmp_path, pad):
    """64 KiB: the bodies went to a segment after each CONFIRM, their rows
    did not: the journal's copies are written in."""
    endpoint, data = free_tcp_endpoint(), str(tmp_path / "data")
    trigger = tmp_path / "owe-rows"
    logs = [open(tmp_path / f"relay-{i}.log", "wb") for i in range(2)]
    try:
        first = children(OWING_RELAY, str(trigger), "--bind", endpoint, "--data-dir", data,
                         stdout=subprocess.DEVNULL, stderr=logs[0])
        assert relay_answers(endpoint, 10), "the relay did not start"
        with Node("sender", relay=endpoint, direct=False, timeout=30, heartbeat=0.2) as node:
            before = [node.send("jobs", f"before {i}" + "x" * pad) for i in range(3)]
            trigger.touch()
            owed = [node.send("jobs", f"owed {i}" + "x" * pad) for i in range(5)]
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            db = sqlite3.connect(os.path.join(data, SQLiteStore.DB_NAME))
            try:  # (else this test would prove nothing about the journal)
                in_db = {r[0] for r in db.execute("SELECT msg_id FROM messages")}
            finally:
                db.close()
            assert not in_db & set(owed)
            os.unlink(trigger)
            children(OWING_RELAY, str(trigger), "--bind", endpoint, "--data-dir", data,
                     stdout=subprocess.DEVNULL, stderr=logs[1])
            assert relay_answers(endpoint, 10), "the relay did not start again"
            got = drain(node.consume("jobs", prefetch=20), expect=8)
        assert [m.id for m in got] == before + owed  # each once, in order
        assert [m.body for m in got] == [f"before {i}" + "x" * pad for i in range(3)] + \
            [f"owed {i}" + "x" * pad for i in range(5)]
        assert all(m.redelivered for m in got[3:])  # (they may have been out before the crash)
    finally:
        for f in logs:
            f.close()
    text = (tmp_path / "relay-1.log").read_text()
    replayed = re.search(r"(\d+) message\(s\) from the lone-send journal were written into the database", text)
    assert replayed and 5 <= int(replayed.group(1)) <= 8  # (the first relay may have written the first 3)


@pytest.fixture
def relay_in_thread(tmp_path):
    """A Relay run in a thread of this process (its store reachable for
    faults), with its endpoint; stopped at teardown."""
    relay = Relay(RelayConfig(bind=free_tcp_endpoint(), data_dir=str(tmp_path / "data")))
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    relay.test_thread = thread
    assert relay.wait_ready(10)
    yield relay
    relay.stop()
    thread.join(10)


def test_a_relay_that_starts_over_with_rows_owed_delivers_them_in_order(relay_in_thread):
    """A store error between lone sends makes the relay start over from the
    database (Relay._store_failed): the journaled rows still owed are
    written first, so the reloaded mailbox has them (before: a mailbox whose
    rows were all owed came back empty, and they were delivered only after
    a restart, behind later messages).  After review 53."""
    relay = relay_in_thread
    with Node("sender", relay=relay.endpoint, direct=False, timeout=30, heartbeat=0.2) as node:
        node.declare("jobs")
        owed = [node.send("jobs", f"owed {i}") for i in range(3)]
        store = relay.engine.store
        # (each is journaled; a turn that is not a lone send's, a heartbeat
        # read with one, writes the rows owed so far: the last is owed still)
        assert store._owed and store._owed[-1].msg_id == owed[-1], "not journaled"
        real, armed = store.mailboxes_of, [True]

        def failing(ids, every=False):  # one read error on the lone path's lookup
            if armed[0]:
                armed[0] = False
                raise sqlite3.OperationalError("disk I/O error (injected read error)")
            return real(ids, every)

        store.mailboxes_of = failing
        after = node.send("jobs", "after")  # fails once; the relay starts over, the node resends
        got = drain(node.consume("jobs", prefetch=20), expect=4, timeout=20)
    assert not armed[0] and relay.halted_by is None
    assert [m.id for m in got] == owed + [after]


def test_a_start_over_that_cannot_put_the_rows_back_stops_the_relay(relay_in_thread):
    """Relay._store_failed: a rollback that could not write the journaled
    rows into the database stops the relay (its restart writes them in),
    rather than reload without them."""
    from murano_zmq.store.faults import StoreError, SyncFailed

    relay = relay_in_thread
    with Node("sender", relay=relay.endpoint, direct=False, timeout=5, heartbeat=0.2) as node:
        node.declare("jobs")
        node.send("jobs", "owed")
        store = relay.engine.store

        def failing(ids, every=False):
            raise sqlite3.OperationalError("disk I/O error (injected read error)")

        def rollback():
            raise StoreError(SyncFailed("writing journaled sends into the database failed: (injected)"))

        store.mailboxes_of, store.rollback = failing, rollback
        node.send_async("jobs", "then")
        relay.test_thread.join(15)
    assert not relay.test_thread.is_alive() and relay.halted_by is not None and relay.halted_by.unsynced
