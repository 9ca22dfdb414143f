"""A consumer's direct endpoint that other nodes cannot connect to must not
stop them sending: the relay refuses one that is not an endpoint at all
(protocol/direct.py endpoint_problem), and a sender whose connect ZeroMQ
refuses sends through the relay (node/sockets.py _open_link)."""

from __future__ import annotations

import os

import pytest
import zmq

from murano_zmq import Node
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import parse_delivery


def raw_consumer(endpoint: str, mailbox: str, direct: str):
    """A session that CONSUMEs `mailbox` offering `direct`; the relay's answer."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(encode(Cmd.HELLO, "odd-consumer", os.urandom(16), 60.0))
    assert sock.poll(10_000) and decode(sock.recv_multipart()).cmd == Cmd.WELCOME
    sock.send_multipart(encode(Cmd.CONSUME, 1, 1, mailbox, 10, direct, None))
    assert sock.poll(10_000)
    return sock, decode(sock.recv_multipart())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("direct", ["garbage", "tcp://:5570", "http://x:80", "tcp://127.0.0.1:0", "tcp://*:5570",
                                    "inproc://zeromq.zap.01"])  # (inproc: inside each sender, its ZAP handler)
def test_the_relay_refuses_a_direct_endpoint_no_node_can_connect_to(relay, direct):
    sock, answer = raw_consumer(relay.endpoint, "odd", direct)
    try:
        assert answer.cmd == Cmd.ERROR
        assert "endpoint" in answer.fields[2]
        with Node("sender", relay=relay.endpoint, timeout=10) as node:
            node.send("odd", b"still sent")
            assert [m["consumers"] for m in node.status()["mailboxes"] if m["name"] == "odd"] == [0]
    finally:
        sock.close(0)


@pytest.mark.timeout(60)
def test_a_sender_whose_connect_fails_sends_through_the_relay(relay):
    # The form of an endpoint, but ZeroMQ refuses to connect to it (EINVAL).
    sock, answer = raw_consumer(relay.endpoint, "odd", "tcp://-:5570")
    try:
        assert answer.cmd == Cmd.REPLY
        with Node("sender", relay=relay.endpoint, timeout=10) as node:
            for i in range(3):  # (the link is not tried again)
                node.send("odd", f"via the relay {i}".encode())
            status = {m["name"]: m for m in node.status()["mailboxes"]}
        assert status["odd"]["depth"] == 3 and status["odd"]["consumers"] == 1
        # The relay delivers them to the consumer as first deliveries: no
        # peer had them (the link never opened), so none is "redelivered".
        delivered = []
        while len(delivered) < 3 and sock.poll(10_000):
            command = decode(sock.recv_multipart())
            if command.cmd == Cmd.DELIVER:
                delivered += [parse_delivery(item) for item in command.fields[1]]
        assert [(m.body, m.redelivered) for m in delivered] == [
            (f"via the relay {i}".encode(), False) for i in range(3)]
    finally:
        sock.close(0)


@pytest.mark.timeout(60)
def test_a_consumer_bound_where_its_path_has_a_space_takes_direct_deliveries(relay, tmp_path):
    """Any endpoint a node binds is one the relay takes (its LAST_ENDPOINT)."""
    where = tmp_path / "my dir"
    where.mkdir()
    with Node("spaced", relay=relay.endpoint, bind=f"ipc://{where}/direct.sock", timeout=10) as consumer, \
            Node("sender", relay=relay.endpoint, timeout=10) as sender:
        messages = consumer.consume("spaced.box")
        sender.send("spaced.box", b"hello")
        m = messages.get(timeout=10)
        assert m is not None and m.body == b"hello"
        m.ack()


@pytest.mark.timeout(60)
def test_a_send_timed_out_on_a_dead_direct_link_names_the_link(relay):
    """The relay answered; the direct consumer it named did not: the
    time-out says so, not only "no answer from relay"."""
    from murano_zmq import RelayUnavailable

    sock, answer = raw_consumer(relay.endpoint, "odd", "tcp://127.0.0.1:1")  # nothing listens there
    try:
        assert answer.cmd == Cmd.REPLY
        with Node("sender", relay=relay.endpoint, timeout=1, direct_timeout=30) as node:
            with pytest.raises(RelayUnavailable, match="nor from direct link.s. to tcp://127.0.0.1:1 within 1s"):
                node.send("odd", b"waits for the link")
    finally:
        sock.close(0)
