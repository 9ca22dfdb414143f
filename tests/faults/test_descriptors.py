"""A relay out of file descriptors says so: libzmq tells only a socket
monitor that it cannot accept a connection, and tries again at once (a
core's worth of CPU) while new nodes time out; the log said nothing."""

from __future__ import annotations

import resource

import zmq

from murano_zmq import Node

from ..helpers import wait_for

LIMIT = 64


def _few_descriptors() -> None:
    """(preexec_fn) The relay's descriptor table: LIMIT entries."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def test_a_relay_out_of_descriptors_says_so_and_serves_again_when_they_come_back(relay_factory, tmp_path):
    relay = relay_factory(preexec_fn=_few_descriptors)
    context = zmq.Context()
    context.setsockopt(zmq.MAX_SOCKETS, 4 * LIMIT)
    peers = []
    try:
        for _ in range(2 * LIMIT):
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(relay.endpoint)
            peers.append(peer)
        log = tmp_path / "relay-0.log"
        wait_for(lambda: "file descriptors" in log.read_text(), 30, what="the relay's warning")
        assert f"the relay holds {LIMIT} of its {LIMIT} file descriptors: new nodes cannot connect" in log.read_text()
    finally:
        for peer in peers:
            peer.close(0)
        context.term()
    with Node("after", relay=relay.endpoint, direct=False, timeout=15) as node:
        node.send("still", "served")
