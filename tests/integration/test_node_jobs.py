"""Node's job queue (work other threads hand to the I/O thread): a call
whose job fails gets the error at once and the node goes on; when the
node's own work fails the node closes, and every call queued behind it
learns so at once instead of waiting out its timeout."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from murano_zmq import Node
from murano_zmq.protocol.errors import NodeClosed, RelayUnavailable


def test_a_failing_call_gets_its_error_and_the_node_goes_on(relay):
    with Node("jobs", relay=relay.endpoint, direct=False) as node:
        real = node._core.consume

        def broken(*args, **kw):
            raise RuntimeError("boom")

        node._core.consume = broken
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="boom"):
            node.consume("jobs.box", timeout=30)
        assert time.monotonic() - t0 < 5
        node._core.consume = real
        node.send("jobs.box", b"still up")
        box = node.consume("jobs.box", timeout=10)
        m = box.get(timeout=10)
        assert m is not None and m.body == b"still up"
        m.ack()


def test_calls_behind_a_failed_job_of_the_node_learn_it_is_closed(relay):
    node = Node("jobs-fail", relay=relay.endpoint, direct=False)
    try:
        node.status(timeout=10)  # up and connected
        behind: concurrent.futures.Future = concurrent.futures.Future()

        def fail() -> None:
            raise RuntimeError("the node's own work failed")

        with node._lock:  # both in one batch: the call is queued behind the failure
            node._jobs.append((fail, None))
            node._jobs.append((lambda: None, behind))
        node._wake()
        t0 = time.monotonic()
        with pytest.raises(NodeClosed):
            behind.result(10)
        assert time.monotonic() - t0 < 5
        with pytest.raises(NodeClosed):
            node.status(timeout=10)
    finally:
        node.close()


def test_a_send_with_no_connection_under_the_relay_socket_times_out_not_hangs(relay):
    """A DEALER with no connection (after a refused CURVE handshake, until it
    reconnects) would block a plain send in libzmq: the node's write keeps
    the frames instead, and the send ends with RelayUnavailable at its timeout."""
    with Node("unpiped", relay=relay.endpoint, direct=False) as node:
        node.send("jobs.warm", b"x")
        done: concurrent.futures.Future = concurrent.futures.Future()
        # On the node's own thread (zmq sockets are not thread-safe): the
        # DEALER loses its only connection, and no monitor event follows.
        node._submit(lambda: done.set_result(node._io.relay_sock.disconnect(relay.endpoint)), done)
        done.result(10)
        t0 = time.monotonic()
        with pytest.raises(RelayUnavailable):
            node.send("jobs.box", b"held", timeout=1)
        assert time.monotonic() - t0 < 5
