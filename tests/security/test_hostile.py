"""Hostile input at real processes and sockets: hypothesis-generated frames at a
relay and at a node, raw TCP garbage and half frames, oversized frames, and a
flooding peer.  The process stays up and stored messages stay deliverable."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murano_zmq import Node
from murano_zmq.protocol.constants import SIGNATURE
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import new_message_id

from ..helpers import free_tcp_endpoint, wait_for
from .conftest import relay_log
from .strategies import hostile_frames

pytestmark = pytest.mark.timeout(120)

EXAMPLES = int(os.environ.get("MURANO_ZMQ_FUZZ_PROCESS_EXAMPLES", "15"))
PROCESS_FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _dealer(endpoint: str, curve=None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock


def _kept(relay, **node_kw) -> bytes:
    """Store one message in mailbox 'keep'; return its id."""
    with Node("keeper", relay=relay.endpoint, timeout=10, **node_kw) as node:
        return node.send("keep", {"precious": True}, headers={"h": "v"})


def _still_deliverable(relay, msg_id: bytes, **node_kw) -> None:
    assert relay.proc.poll() is None, "the relay died"
    with Node("checker", relay=relay.endpoint, timeout=10, **node_kw) as node:
        msg = node.consume("keep").get(timeout=10)
        assert msg is not None and msg.id == msg_id
        assert msg.body == {"precious": True} and msg.headers == {"h": "v"}


def _throw(endpoint: str, commands: list, curve=None, hello: bool = True) -> None:
    sock = _dealer(endpoint, curve)
    try:
        if hello:  # with a session, the fuzzed commands reach the handlers
            sock.send_multipart(encode(Cmd.HELLO, "fuzzer", os.urandom(16), 1.0))
        for frames in commands:
            if b"keep" in b"".join(frames):
                continue  # a fuzzer may legitimately consume and ack 'keep'
            sock.send_multipart(frames or [b""])
        # A round trip: everything before it was handled.
        sock.send_multipart(encode(Cmd.HELLO, "fuzzer", os.urandom(16), 1.0))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sock.poll(200) and decode(sock.recv_multipart()).cmd == Cmd.WELCOME:
                break
        else:
            raise AssertionError("the relay did not answer after the fuzzed commands")
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("secured", [False, True], ids=["open", "curve"])
def test_hypothesis_frames_at_a_relay_process(relay_factory, keys, tmp_path, secured):
    if secured:  # CURVE and permissions: the fuzzer is an agent, the checks a conductor
        rules = tmp_path / "rules.toml"
        rules.write_text(keys.permissions.read_text()
                         + '\n[identity."conductor-1"]\nsend = ["keep"]\nconsume = ["keep"]\n')
        relay = relay_factory(*keys.relay_args("--permissions", str(rules)), probe_curve=keys.client("ops"))
        kw, fuzzer = keys.node_kw("conductor-1"), keys.client("agent-e1-u1")
    else:
        relay, kw, fuzzer = relay_factory(), {}, None
    msg_id = _kept(relay, **kw)

    @PROCESS_FUZZ
    @given(st.lists(hostile_frames, min_size=1, max_size=40), st.booleans())
    def fuzz(commands, hello):
        _throw(relay.endpoint, commands, fuzzer, hello)
        assert relay.proc.poll() is None

    fuzz()
    _still_deliverable(relay, msg_id, **kw)


def _zmtp_greeting(mechanism: bytes = b"NULL") -> bytes:
    return (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00"
            + b"\x00" * 31)


def _zmtp_ready(socket_type: bytes = b"DEALER") -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body


def _tcp(endpoint: str) -> socket.socket:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def test_raw_socket_garbage_and_half_frames(relay_factory):
    relay = relay_factory("--max-message-size", "1000")
    msg_id = _kept(relay)
    rnd = os.urandom
    payloads = [
        rnd(1), rnd(10), rnd(64), rnd(4096),  # not even a greeting
        _zmtp_greeting()[:30],  # half a greeting
        _zmtp_greeting() + rnd(200),  # a greeting, then garbage
        _zmtp_greeting() + _zmtp_ready(),  # a handshake, then nothing
        _zmtp_greeting() + _zmtp_ready() + b"\x01\x04MZQ\x02\x01\x01",  # half a command (more flag, then EOF)
        _zmtp_greeting() + _zmtp_ready() + b"\x02" + struct.pack(">Q", 1 << 62),  # a 4 EiB frame
        _zmtp_greeting() + _zmtp_ready() + b"\x02" + struct.pack(">Q", 200_000) + rnd(1000),  # > MAXMSGSIZE
        _zmtp_greeting(b"CURVE") + rnd(100),  # a mechanism the relay does not run
        _zmtp_greeting() + _zmtp_ready(b"PUB"),  # a socket type a ROUTER refuses
    ]
    for payload in payloads:
        s = _tcp(relay.endpoint)
        try:
            s.sendall(payload)
        except OSError:
            pass  # the relay may hang up first
        finally:
            s.close()
    assert relay.proc.poll() is None
    _still_deliverable(relay, msg_id)


def test_zmq_maxmsgsize_drops_a_peer_sending_an_oversized_frame(relay_factory):
    relay = relay_factory("--max-message-size", "1000")  # ZMQ_MAXMSGSIZE = 1000 + 64 KiB headroom
    msg_id = _kept(relay)
    big = _dealer(relay.endpoint)
    monitor = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        big.send_multipart(encode(Cmd.HELLO, "big", os.urandom(16), 1.0))
        assert big.poll(5000) and decode(big.recv_multipart()).cmd == Cmd.WELCOME
        big.send_multipart([SIGNATURE, b"\x04", os.urandom(200_000)])
        # The relay hangs up on the connection instead of buffering the frame.
        assert monitor.poll(5000), "the relay did not drop the connection"
    finally:
        big.disable_monitor()
        monitor.close(linger=0)
        big.close(linger=0)
    # A body over --max-message-size that fits the frame limit gets a clear error.
    from murano_zmq import MessageTooLarge
    with Node("sender", relay=relay.endpoint, timeout=10) as node:
        node.status()
        with pytest.raises(MessageTooLarge):
            node.send("keep", b"x" * 5000)
    _still_deliverable(relay, msg_id)


def test_a_flooding_peer_does_not_starve_others(relay_factory):
    relay = relay_factory()
    msg_id = _kept(relay)
    stop = threading.Event()
    sent = [0]

    def flood():
        sock = _dealer(relay.endpoint)
        sock.setsockopt(zmq.SNDTIMEO, 100)
        try:
            junk = [SIGNATURE, b"\x0c", msgpack.packb(["not", "a", "status"])]
            while not stop.is_set() and sent[0] < 200_000:
                try:
                    sock.send_multipart(junk)
                    sent[0] += 1
                except zmq.Again:
                    pass  # the relay holds this peer back (its receive queue is full)
        finally:
            sock.close(linger=0)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_for(lambda: sent[0] > 5000, 20, what="the flood to start")
        with Node("polite", relay=relay.endpoint, timeout=10) as node:
            worst = 0.0
            for i in range(20):
                t0 = time.monotonic()
                node.send("polite", i)
                worst = max(worst, time.monotonic() - t0)
        assert worst < 5.0, f"a send took {worst:.2f}s during the flood"
    finally:
        stop.set()
        flooder.join(10)
    assert relay.proc.poll() is None
    _still_deliverable(relay, msg_id)
    log = relay_log(relay)
    # 20 warnings of a kind per 10 s window (security/logs.py), however many came
    assert log.count("malformed command") <= 60, "a flood of garbage must not flood the log"
    print(f"flood: {sent[0]} junk commands; worst send {worst:.3f}s")


class FakeRelay:
    """A ROUTER that plays just enough relay for one Node: WELCOME, REPLY to
    CONSUME, and whatever frames the test sends to the node's current session."""

    def __init__(self):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = free_tcp_endpoint()
        self.sock.bind(self.endpoint)
        self.peer: bytes | None = None
        self.cid: int | None = None

    def serve(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.sock.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            command = decode(frames)
            if command.cmd == Cmd.HELLO:
                self.peer = identity
                self.sock.send_multipart([identity, *encode(Cmd.WELCOME, "fake", 1.0, 1 << 20)])
            elif command.cmd == Cmd.CONSUME:
                self.peer, self.cid = identity, command.fields[1]
                if command.fields[0]:
                    self.sock.send_multipart([identity, *encode(Cmd.REPLY, command.fields[0], {})])
            elif command.cmd in (Cmd.HEARTBEAT, Cmd.ACK, Cmd.NACK):
                self.sock.send_multipart([identity, *encode(Cmd.HEARTBEAT)])

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.peer, *frames])

    def close(self) -> None:
        self.sock.close(linger=0)


def test_hypothesis_frames_at_a_node(node_kind):
    fake = FakeRelay()
    node = node_kind("victim", relay=fake.endpoint, timeout=10)
    try:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("c", node.consume("agent.e1.u1", timeout=10)))
        t.start()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            fake.serve(0.1)
        t.join(1)
        consumer = box["c"]

        @PROCESS_FUZZ
        @given(st.lists(hostile_frames, min_size=1, max_size=30))
        def fuzz(commands):
            for frames in commands:
                fake.send(frames or [b""])
            fake.serve(0.05)

        fuzz()
        fake.serve(1.0)  # let a node that heard BYE or 409 reconnect and CONSUME again
        if isinstance(node, Node):
            assert node._thread.is_alive(), "the node's I/O thread died"
        else:
            assert not node._closed, "the AsyncNode closed itself"
        msg_id = new_message_id(time.time())
        record = [999_999, msg_id, "agent.e1.u1", b"", msgpack.packb("real plan"), time.time(), None, 1]
        deadline = time.monotonic() + 20
        got = None
        while got is None and time.monotonic() < deadline:
            fake.send(encode(Cmd.DELIVER, fake.cid, [record]))
            fake.serve(0.2)
            while (m := consumer.get(timeout=0.1)) is not None:
                if m.id == msg_id:
                    got = m
                    break
        assert got is not None and got.body == "real plan"
    finally:
        node.close()
        fake.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def test_a_peer_that_never_reads_cannot_grow_the_relay(relay_factory):
    """Every junk command earns an ERROR reply; a peer that never reads them
    would make the relay queue replies without end.  The per-peer send queue
    is bounded (ZMQ_SNDHWM with ROUTER_MANDATORY): past it the relay drops
    that peer's replies and session, and serves everybody else."""
    relay = relay_factory()
    msg_id = _kept(relay)
    sock = _dealer(relay.endpoint)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    before = _rss_kib(relay.pid)
    junk = [SIGNATURE, b"\x0c", msgpack.packb([None])]  # STATUS without a req: ERROR each time
    sent, deadline = 0, time.monotonic() + 20
    try:
        while sent < 300_000 and time.monotonic() < deadline:
            try:
                sock.send_multipart(junk, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                sock.poll(1, zmq.POLLOUT)
        with Node("other", relay=relay.endpoint, timeout=10) as node:
            node.send("other", "still served")
        growth_mib = (_rss_kib(relay.pid) - before) / 1024
    finally:
        sock.close(linger=0)
    print(f"{sent} junk commands unread replies; relay RSS grew {growth_mib:.1f} MiB")
    # Unbounded, 300 000 unread replies cost the relay about 45 MiB.
    assert growth_mib < 25, f"the relay grew {growth_mib:.1f} MiB for a peer that does not read"
    _still_deliverable(relay, msg_id)
