"""A failed sync of the store (fdatasync of the WAL returning EIO) in a real
relay process: the relay confirms nothing more, says why in one critical
line and exits 1 (for systemd's Restart=on-failure); a relay restarted on the
same data takes the node's resend, and every confirmed message is there once.

No device-mapper in this sandbox to fail a real disk, so the child relay's
store fails the WAL's sync itself once a trigger file exists.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from murano_zmq import Node
from murano_zmq.store.sqlite import SQLiteStore
from murano_zmq.testing import relay_answers

from ..helpers import drain, free_tcp_endpoint

# The relay's own main, with the WAL's sync (SQLiteStore._sync_wal) or the
# lone-send journal's (Journal.append, store/journal.py) failing while
# TRIGGER exists.
FAILING_RELAY = """
import errno, os, sys
from murano_zmq.relay.main import main
from murano_zmq.store.journal import Journal
from murano_zmq.store.sqlite import SQLiteStore
trigger, which = sys.argv[1], sys.argv[2]
cls, name = (SQLiteStore, "_sync_wal") if which == "wal" else (Journal, "append")
real = getattr(cls, name)
def failing(self, *args):
    if os.path.exists(trigger):
        raise OSError(errno.EIO, "Input/output error (injected)")
    return real(self, *args)
setattr(cls, name, failing)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("which", ["wal", "journal"])
def test_a_failed_sync_stops_the_relay_and_a_restart_loses_nothing_confirmed(relay_factory, tmp_path, which):
    """The sync fails under a send to a new mailbox (a commit of its own,
    the WAL's sync), or under a lone send to a known one (the journal's)."""
    endpoint, data = free_tcp_endpoint(), str(tmp_path / "data")
    trigger = tmp_path / "fail-syncs"
    log_path = tmp_path / "failing-relay.log"
    mailbox = "fresh" if which == "wal" else "jobs"
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", FAILING_RELAY, str(trigger), which, "--bind", endpoint,
                                  "--data-dir", data], stdout=subprocess.DEVNULL, stderr=log)
    try:
        assert relay_answers(endpoint, 10), "the relay did not start"
        with Node("sender", relay=endpoint, timeout=30, heartbeat=0.2) as node:
            confirmed = [node.send("jobs", f"before {i}") for i in range(5)]
            trigger.touch()
            pending = node.send_async(mailbox, "during")
            assert child.wait(20) == 1  # stopped on its own, exit status 1
            # ... with its WAL left as it was: no checkpoint on the way out
            # copied pages the disk may not hold into the database
            assert os.path.getsize(os.path.join(data, SQLiteStore.DB_NAME + "-wal")) > 0
            assert not pending.done()
            text = log_path.read_text()
            what = "syncing the store" if which == "wal" else "syncing the lone-send journal failed"
            assert "CRITICAL" in text and what in text and "Input/output error" in text
            assert "Traceback" not in text
            relay_factory(endpoint=endpoint, data_dir=data)  # restarted (without the fault)
            during = pending.result(30)  # the node resent it
            got = drain(node.consume("jobs", prefetch=20), expect=5 if which == "wal" else 6)
            if which == "wal":
                got += drain(node.consume(mailbox, prefetch=20), expect=1)
        assert sorted(m.id for m in got) == sorted(confirmed + [during])  # each once
        assert [m.body for m in got] == [f"before {i}" for i in range(5)] + ["during"]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if trigger.exists():
            os.unlink(trigger)


def test_a_restart_puts_what_the_wal_holds_into_the_database_first(relay_factory, tmp_path):
    """After a kill -9 the WAL holds frames; the next start copies them all
    into the database and syncs it before it serves (SQLiteStore._open): a
    WAL whose syncs failed may sit in the page cache only."""
    data = str(tmp_path / "data")
    relay = relay_factory(data_dir=data)
    with Node("sender", relay=relay.endpoint, timeout=30) as node:
        node.send_many([("jobs", b"m" * 512)] * 300)
        relay.kill()
    wal = os.path.join(data, SQLiteStore.DB_NAME + "-wal")
    assert os.path.getsize(wal) > 0  # (the kill left frames there)
    store = SQLiteStore(data)
    try:
        assert os.path.getsize(wal) == 0
        assert len(store.load_ready(store.load_mailboxes()[0].id, 0, 1000)) == 300
    finally:
        store.close()
