"""A commit that fails for a cause other than a full disk (an I/O error, made
here by a store whose commit fails once) costs the relay nothing but a
resync: it reloads from the store, nodes resend, nothing confirmed is lost."""

from __future__ import annotations

import sqlite3
import threading

from murano_zmq import Node
from murano_zmq.relay.server import Relay, RelayConfig
from murano_zmq.store.sqlite import SQLiteStore, StoreError

from ..helpers import free_tcp_endpoint


def test_failed_commit_reloads_and_nodes_resend(tmp_path, monkeypatch, caplog):
    real_commit = SQLiteStore.commit
    failures = []

    def commit_failing_once(self):
        if self.in_transaction and not failures:
            failures.append(1)
            self.rollback()
            raise StoreError(sqlite3.OperationalError("disk I/O error"))
        return real_commit(self)

    relay = Relay(RelayConfig(bind=free_tcp_endpoint(), data_dir=str(tmp_path / "data")))
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    assert relay.wait_ready(10)
    try:
        with Node("n", relay=relay.endpoint, heartbeat=0.2, timeout=20) as node:
            node.send("jobs", "before")
            monkeypatch.setattr(SQLiteStore, "commit", commit_failing_once)
            ids = node.send_many([("jobs", i) for i in range(50)])
            assert failures, "the failing commit was not reached"
            consumer = node.consume("jobs", prefetch=100)
            got = []
            while len(got) < 51:
                m = consumer.get(timeout=10)
                assert m is not None, f"{len(got)} of 51"
                got.append(m.id)
                m.ack()
            assert set(ids) <= set(got)
        assert thread.is_alive()
    finally:
        relay.stop()
        thread.join(15)
    assert "disk I/O error" in caplog.text and "reloaded its state" in caplog.text
