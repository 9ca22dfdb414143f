"""Permission checks in the relay engine, without sockets: a denied command
changes nothing, sessions are bound to the identity that opened them."""

from __future__ import annotations

import msgpack
import pytest

from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import new_message_id, send_record
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.security import Permissions
from murano_zmq.store.sqlite import SQLiteStore

RULES = """
[identity."agent-*"]
consume = ["agent.{1}"]
send = ["results"]
[identity.conductor]
send = ["agent.*"]
declare = ["agent.*"]
"""


@pytest.fixture
def engine(tmp_path):
    store = SQLiteStore(str(tmp_path / "db"))
    e = RelayEngine(store, 0.0, "test")
    e.permissions = Permissions.from_toml(RULES)
    yield e
    store.close()


def hello(e, identity: bytes, user: str, instance: bytes | None = None):
    e.receive(identity, encode(Cmd.HELLO, user, instance or identity.ljust(16, b"."), 1.0), 1.0, user)


def replies(e) -> list:
    e.commit()
    return [(identity, decode(frames)) for identity, frames in e.take_output(1.0)]


def test_denied_consume_leaves_the_existing_consumer(engine):
    hello(engine, b"a1", "agent-a1")
    engine.receive(b"a1", encode(Cmd.CONSUME, 1, 7, "agent.a1", 10, None), 1.0, "agent-a1")
    engine.receive(b"a1", encode(Cmd.CONSUME, 2, 7, "agent.a2", 10, None), 1.0, "agent-a1")
    out = [c for _, c in replies(engine)]
    assert out[-1].cmd == Cmd.ERROR and out[-1].fields[:2] == (2, 403)
    assert [c.mailbox.name for c in engine.peers[b"a1"].consumers.values()] == ["agent.a1"]
    assert "agent.a2" not in engine.mailboxes


def test_send_denies_per_record_and_stores_the_rest(engine):
    hello(engine, b"a1", "agent-a1")
    records = [send_record(new_message_id(1.0), mb, {}, msgpack.packb(i), 1.0, None)
               for i, mb in enumerate(["results", "agent.a2", "results"])]
    engine.receive(b"a1", encode(Cmd.SEND, 5, records), 1.0, "agent-a1")
    (confirm,) = [c for _, c in replies(engine) if c.cmd == Cmd.CONFIRM]
    assert [e[:2] for e in confirm.fields[1]] == [[1, 403]]
    assert engine.mailboxes["results"].count == 2 and "agent.a2" not in engine.mailboxes


def test_a_session_is_bound_to_its_identity(engine):
    hello(engine, b"s1", "agent-a1", instance=b"i" * 16)
    # Another identity using the same routing id is refused.
    engine.receive(b"s1", encode(Cmd.STATUS, 3), 1.0, "conductor")
    (_, err), = replies(engine)[-1:]
    assert err.cmd == Cmd.ERROR and err.fields[:2] == (3, 403)
    # Another identity saying HELLO with the same instance id does not kick the owner off.
    hello(engine, b"s2", "conductor", instance=b"i" * 16)
    assert b"s1" in engine.peers and b"s2" in engine.peers
    # The same identity may take over its own session (a reconnect).
    hello(engine, b"s3", "agent-a1", instance=b"i" * 16)
    assert b"s1" not in engine.peers and b"s3" in engine.peers
    # A HELLO from another identity on a session's routing id is refused like any command.
    replies(engine)
    hello(engine, b"s3", "conductor", instance=b"c" * 16)
    (_, err), = replies(engine)
    assert err.cmd == Cmd.ERROR and err.fields[:2] == (None, 403)
    assert engine.peers[b"s3"].user == "agent-a1"


def test_an_error_to_cancel_carries_its_req(engine):
    """docs/protocol.md (CANCEL): the reference node sends req 0; an ERROR
    refusing a CANCEL carries the req it came with."""
    engine.receive(b"x1", encode(Cmd.CANCEL, 5, 7), 1.0, "agent-a1")  # no session
    hello(engine, b"a1", "agent-a1")
    engine.receive(b"a1", encode(Cmd.CANCEL, 6, 7), 1.0, "conductor")  # another identity
    assert [(c.cmd, c.fields[:2]) for _, c in replies(engine) if c.cmd == Cmd.ERROR] == [
        (Cmd.ERROR, (5, 409)), (Cmd.ERROR, (6, 403))]
    engine.receive(b"a1", encode(Cmd.CANCEL, 0, 7), 1.0, "agent-a1")  # unknown consumer: no error, no answer
    assert replies(engine) == []


def test_lookup_needs_send_permission(engine):
    """docs/protocol.md (LOOKUP): an identity that may not send to a mailbox
    does not learn where its consumers are."""
    hello(engine, b"a1", "agent-a1")
    engine.receive(b"a1", encode(Cmd.CONSUME, 1, 7, "agent.a1", 10, "tcp://127.0.0.1:1"), 1.0, "agent-a1")
    hello(engine, b"a2", "agent-a2")
    hello(engine, b"c1", "conductor")
    replies(engine)
    engine.receive(b"a2", encode(Cmd.LOOKUP, 2, "agent.a1"), 1.0, "agent-a2")
    engine.receive(b"c1", encode(Cmd.LOOKUP, 3, "agent.a1"), 1.0, "conductor")
    out = {identity: c for identity, c in replies(engine)}
    assert out[b"a2"].cmd == Cmd.ERROR and out[b"a2"].fields[:2] == (2, 403)
    assert out[b"c1"].cmd == Cmd.REPLY and out[b"c1"].fields[0] == 3
    assert out[b"c1"].fields[1]["direct"] == [["agent-a1", "tcp://127.0.0.1:1", None]]


def test_refuse_and_drop_sessions(engine):
    hello(engine, b"a1", "agent-a1")
    hello(engine, b"a2", "agent-a2")
    engine.receive(b"a1", encode(Cmd.CONSUME, 1, 7, "agent.a1", 10, None), 1.0, "agent-a1")
    assert engine.drop_sessions(lambda user: user != "agent-a1", "key no longer authorized", 2.0) == 1
    assert b"a1" not in engine.peers and b"a2" in engine.peers
    assert engine.mailboxes["agent.a1"].consumers == []
    replies(engine)
    engine.refuse(b"a2", encode(Cmd.STATUS, 9), "key gone", 2.0)
    (_, err), = replies(engine)
    assert err.cmd == Cmd.ERROR and err.fields[:2] == (9, 403) and b"a2" not in engine.peers
