"""NodeSockets.flush routes a large send_many FLUSH_SLICE records at a time
and writes between slices (tests/integration/test_send_many_slices.py shows
it on the wire).  Here, on a NodeCore alone: what a failed write or a
LOOKUP that holds records back leaves behind is what routing them all at
once would have."""

from __future__ import annotations

import os
from concurrent.futures import Future

import pytest
import zmq

from murano_zmq.node import sockets
from murano_zmq.node.core import NodeCore

COUNT = 3 * sockets.FLUSH_SLICE


class FakeSockets:
    """flush()'s view of NodeSockets: the core and a write() to spy on."""

    def __init__(self, core: NodeCore, write):
        self.core, self.write = core, write

    flush = sockets.NodeSockets.flush


def pairs(mailbox: str) -> list:
    return [([os.urandom(16), mailbox, b"", b"x", 1.0, None, False], Future()) for _ in range(COUNT)]


def test_a_failed_write_between_slices_leaves_every_record_queued():
    core = NodeCore("n", os.urandom(16), direct=False)  # (no relay session: nothing leaves the queue)
    calls = []

    def write(now):
        calls.append(now)
        if len(calls) == 1:
            raise zmq.ZMQError(zmq.EINVAL)

    sends = pairs("box")
    with pytest.raises(zmq.ZMQError):
        FakeSockets(core, write).flush(1.0, sends)
    assert core.pending == COUNT  # the later slices queued, for the next turn's write
    core.abandon(RuntimeError("closed"))
    assert all(waiter.done() for _, waiter in sends)


def test_records_held_for_a_lookup_are_walked_once():
    core = NodeCore("n", os.urandom(16), direct=True)  # a fresh mailbox: held for its LOOKUP
    walked, writes = [0], []
    route = core.route

    def counted(incoming, now):
        walked[0] += len(core._held) + len(incoming)
        return route(incoming, now)

    core.route = counted
    FakeSockets(core, writes.append).flush(1.0, pairs("fresh"))
    assert core.pending == COUNT and core.holding
    assert walked[0] <= 2 * COUNT  # (one slice, then the rest at once: not every slice again)
    assert len(writes) == 1
