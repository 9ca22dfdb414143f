"""Acks alone wait up to 50 ms for a commit (relay/turn.py, hold_deletes);
a clean stop commits them on the way out, so a restarted relay does not
deliver acked messages again."""

from __future__ import annotations

import sqlite3

from murano_zmq import Node
from murano_zmq.store.packs import stored_count

from ..helpers import wait_for


def mailbox(node: Node, name: str) -> dict:
    return next(mb for mb in node.status()["mailboxes"] if mb["name"] == name)


def test_held_acks_are_committed_by_a_clean_stop(relay_factory, tmp_path):
    relay = relay_factory()
    with Node("held", relay=relay.endpoint, direct=False, timeout=15) as node:
        node.send_many([("held.box", b"m")] * 20)
        consumer = node.consume("held.box", direct=False)
        for _ in range(20):
            consumer.get(timeout=10).ack()
        wait_for(lambda: mailbox(node, "held.box")["depth"] == 0, 10, what="the relay to take the acks")
        consumer.cancel()
        assert relay.stop() == 0  # SIGTERM: the loop's last commit takes what it held
    if (tmp_path / "data" / "relay.db").exists():  # (SQLite; PostgreSQL keeps its rows elsewhere)
        db = sqlite3.connect(str(tmp_path / "data" / "relay.db"))
        try:
            assert stored_count(db) == 0
        finally:
            db.close()
    again = relay_factory(endpoint=relay.endpoint)
    with Node("held", relay=again.endpoint, direct=False, timeout=15) as node:
        assert mailbox(node, "held.box")["depth"] == 0
