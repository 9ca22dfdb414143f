"""Fuzzing the decoders in process: frames.decode, ClientCore.receive and
RelayEngine.receive.  Invariant (as h11's fuzz harness): any input gives a
result or RemoteProtocolError, never another exception, and a rejected input
changes nothing.

The CI run is short; for a long run (docs/security.md):

    MURANO_ZMQ_FUZZ_EXAMPLES=200000 python -m pytest tests/security/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import copy
import enum
import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murano_zmq.protocol.client import ClientCore, State
from murano_zmq.protocol.errors import RemoteProtocolError
from murano_zmq.protocol.frames import Cmd, Command, decode, encode
from murano_zmq.protocol.message import new_message_id, send_record
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.security.permissions import Permissions
from murano_zmq.store.sqlite import SQLiteStore

from .strategies import hostile_frames, typed_command

EXAMPLES = int(os.environ.get("MURANO_ZMQ_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 10))


@FUZZ
@given(hostile_frames)
def test_decode_returns_a_command_or_raises_remote_protocol_error(frames):
    try:
        command = decode(frames)
    except RemoteProtocolError:
        return
    assert isinstance(command, Command)
    again = encode(command.cmd, *command.fields)
    assert encode(*[decode(again).cmd, *decode(again).fields]) == again  # bytes: NaN != NaN


def _ready_core() -> ClientCore:
    """A core with something to lose: a WELCOME, a pending send, request and consumer."""
    core = ClientCore("fuzzed", b"i" * 16)
    core.connection_made(0.0)
    core.receive(encode(Cmd.WELCOME, "relay", 1.0, 1 << 20), 0.0)
    core.send([send_record(new_message_id(0.0), "mb", {}, msgpack.packb("x"), 0.0, None)], 0.0)
    core.request(Cmd.STATUS)
    core.consume("mb", 10)
    core.drain()
    return core


def _state(value, depth: int = 0):
    """A comparable copy of `value`, looking inside the project's own objects."""
    if depth > 8 or callable(value):
        return repr(type(value))
    if isinstance(value, dict):
        return {k: _state(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)) or type(value).__name__ == "deque":
        return (type(value).__name__, [_state(v, depth + 1) for v in value])
    if type(value).__module__.startswith("murano_zmq") and not isinstance(value, enum.Enum):
        names = list(getattr(value, "__dict__", {})) + [
            n for cls in type(value).__mro__ for n in getattr(cls, "__slots__", ())]
        return (type(value).__name__, {n: _state(getattr(value, n, None), depth + 1) for n in names})
    return copy.deepcopy(value)


def _snapshot(core: ClientCore) -> dict:
    return {k: _state(v) for k, v in vars(core).items() if k not in ("_last_heard", "_outbox")}


@FUZZ
@given(st.lists(hostile_frames | typed_command(commands=(Cmd.CONFIRM, Cmd.DELIVER, Cmd.ERROR, Cmd.REPLY,
                                                          Cmd.WELCOME, Cmd.BYE)), max_size=8))
def test_client_core_survives_any_input(inputs):
    core = _ready_core()
    for frames in inputs:
        before = _snapshot(core)
        try:
            events = core.receive(frames, 1.0)
        except RemoteProtocolError:
            assert _snapshot(core) == before, "a rejected command changed the core"
            continue
        assert isinstance(events, list)
    assert core.state in (State.READY, State.CONNECTING)


class _EngineRig:
    """A relay engine on a real SQLite store with one message stored in 'keep'."""

    def __init__(self, path, permissions=None):
        self.store = SQLiteStore(str(path))
        self.engine = RelayEngine(self.store, 0.0, "fuzz")
        self.engine.permissions = permissions
        self.now = 1.0
        self.engine.receive(b"sender", encode(Cmd.HELLO, "sender", b"s" * 16, 1.0), self.now, "ops")
        self.msg_id = new_message_id(0.0)
        self.engine.receive(b"sender", encode(Cmd.SEND, 1, [send_record(self.msg_id, "keep", {"h": 1},
                                                                        msgpack.packb("body"), 0.0, None)]),
                            self.now, "ops")
        self.engine.receive(b"sender", encode(Cmd.BYE, "done"), self.now, "ops")
        self.turn()

    def turn(self):
        self.engine.tick(self.now)
        self.engine.pump(self.now)
        self.engine.take_output(self.now)
        self.engine.commit()
        self.engine.take_output(self.now)

    def deliverable(self) -> bool:
        """A fresh consumer of 'keep' gets the stored message."""
        e = self.engine
        self.now += 0.01
        e.receive(b"checker", encode(Cmd.HELLO, "checker", os.urandom(16), 1.0), self.now, "ops")
        e.receive(b"checker", encode(Cmd.CONSUME, 1, 77, "keep", 10, None), self.now, "ops")
        e.pump(self.now)
        out = e.take_output(self.now)
        e.receive(b"checker", encode(Cmd.BYE, "done"), self.now, "ops")
        for identity, frames in out:
            command = decode(frames)
            if identity == b"checker" and command.cmd == Cmd.DELIVER:
                return any(r[1] == self.msg_id and r[2] == "keep" for r in command.fields[1])
        return False

    def close(self):
        self.store.close()


@pytest.fixture
def rig(tmp_path):
    rigs = []

    def make(permissions=None):
        rigs.append(_EngineRig(tmp_path / f"rig{len(rigs)}", permissions))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


@FUZZ
@given(data=st.data())
def test_relay_engine_survives_any_input_and_keeps_stored_messages(rig, data):
    r = rig(Permissions.from_toml('[identity."agent-*"]\nsend = ["x.*"]\nconsume = ["x.*"]\n'
                                  '[identity.ops]\nsend = ["*"]\nconsume = ["*"]\nadmin = ["*"]\n')
            if data.draw(st.booleans(), "permissions") else None)
    identities = [b"a" * 5, b"b" * 16]
    for identity in identities:  # some peers with a session, so handlers run
        r.engine.receive(identity, encode(Cmd.HELLO, "fuzzer", identity.ljust(16, b"."), 1.0), r.now, "agent-1")
    for frames in data.draw(st.lists(hostile_frames, max_size=12), "commands"):
        identity = data.draw(st.sampled_from(identities + [b"new"]), "identity")
        # When the consumer/queue of 'keep' is what the fuzzer hits, its ack
        # would legitimately remove the message: keep fuzzed peers off 'keep'.
        if b"keep" in b"".join(frames):
            continue
        r.engine.receive(identity, frames, r.now, data.draw(st.sampled_from([None, "agent-1", "ops"])))
        r.now += 0.001
        r.turn()
    for identity in identities:
        r.engine.receive(identity, encode(Cmd.BYE, "done"), r.now, "agent-1")
    r.turn()
    assert r.deliverable()
