"""The engine while the relay's disk is full (storage_full, set by the relay
process): new messages and new mailboxes get 507 STORAGE_FULL; a resend of
a message already stored is confirmed; delivery and acks go on."""

from __future__ import annotations

import os

import pytest

from murano_zmq.protocol.errors import StorageFull
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import pack_body, send_record
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.store.sqlite import SQLiteStore

T0 = 1_000_000.0
PEER = b"peer-1"


@pytest.fixture
def engine(tmp_path):
    store = SQLiteStore(str(tmp_path))
    engine = RelayEngine(store, T0)
    engine.receive(PEER, encode(Cmd.HELLO, "n", os.urandom(16), 1.0), T0)
    engine.take_output(T0)
    yield engine
    store.close()


def turn(engine: RelayEngine, *commands: list) -> list:
    """One loop turn: commands in, every reply out (decoded)."""
    for frames in commands:
        engine.receive(PEER, frames, T0)
    engine.tick(T0)
    engine.pump(T0)
    out = engine.take_output(T0)
    engine.commit()
    out += engine.take_output(T0)
    return [decode(frames) for identity, frames in out if identity == PEER]


def send(req: int, msg_id: bytes, retry: bool = False) -> list:
    record = send_record(msg_id, "jobs", None, pack_body("x"), T0, None)
    record[-1] = retry
    return encode(Cmd.SEND, req, [record])


def test_full_disk_refuses_new_messages_and_mailboxes(engine):
    stored = os.urandom(16)
    (confirm,) = turn(engine, send(1, stored))
    assert confirm.cmd == Cmd.CONFIRM and confirm.fields[1] == []
    engine.storage_full = True
    (refused,) = turn(engine, send(2, os.urandom(16)))
    assert refused.cmd == Cmd.CONFIRM
    assert [e[1] for e in refused.fields[1]] == [StorageFull.code]
    (again,) = turn(engine, send(3, stored, retry=True))  # stored before: confirmed, not refused
    assert again.fields[1] == []
    (error,) = turn(engine, encode(Cmd.DECLARE, 4, "new.mailbox", {}))
    assert error.cmd == Cmd.ERROR and error.fields[1] == StorageFull.code
    (reply,) = turn(engine, encode(Cmd.DECLARE, 5, "jobs", {}))  # an existing one is fine
    assert reply.cmd == Cmd.REPLY


def test_full_disk_still_delivers_and_takes_acks(engine):
    turn(engine, send(1, os.urandom(16)))
    engine.storage_full = True
    out = turn(engine, encode(Cmd.CONSUME, 2, 1, "jobs", 10, None))
    (deliver,) = [c for c in out if c.cmd == Cmd.DELIVER]
    tag = deliver.fields[1][0][0]
    turn(engine, encode(Cmd.ACK, [tag]))
    assert engine.store.mailbox_stats() == {}
