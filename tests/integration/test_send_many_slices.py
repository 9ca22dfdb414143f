"""A large send_many is routed and written FLUSH_SLICE records at a time
(node/sockets.py): the relay works on the first SENDs while the node
encodes the rest.  Checked for both runners: every slice's SENDs are
written before the next slice is routed, and the relay stores the records
whole and in order."""

from __future__ import annotations

import asyncio

from murano_zmq import AsyncNode, Node
from murano_zmq.node import sockets

COUNT = 3 * sockets.FLUSH_SLICE + 5  # three whole slices and a short one


def spy(io: sockets.NodeSockets) -> list:
    """('route', records) and ('write', SEND frames put on the relay socket), in order."""
    events: list = []
    route, write, relay_out = io.core.route, io.write, io.core.relay_out

    def routed(incoming, now):
        events.append(("route", len(incoming)))
        return route(incoming, now)

    def written(now):
        events.append(("write", 0))
        return write(now)

    def out(now):
        frames = relay_out(now)
        if frames:
            events[-1] = ("write", events[-1][1] + len(frames))
        return frames

    io.core.route, io.write, io.core.relay_out = routed, written, out
    return events


def check_sliced(events: list) -> None:
    routes = [n for kind, n in events if kind == "route"]
    assert routes == [sockets.FLUSH_SLICE] * 3 + [5]
    # Each slice's SENDs are on the wire before the next slice is routed.
    for i, (kind, n) in enumerate(events[:-1]):
        if kind == "route":
            assert events[i + 1][0] == "write" and events[i + 1][1] > 0, events


def test_node_send_many_is_written_slice_by_slice(relay):
    with Node("slices", relay=relay.endpoint, direct=False, timeout=30) as node:
        node.send("slices.box", -1)  # the session up, the mailbox made
        events = spy(node._io)
        ids = node.send_many([("slices.box", i) for i in range(COUNT)])
        assert len(ids) == len(set(ids)) == COUNT
        check_sliced([e for e in events if e != ("route", 0)])
        box = node.consume("slices.box", prefetch=500, direct=False)
        assert box.get(timeout=10).body == -1
        got = []
        for _ in range(COUNT):
            m = box.get(timeout=10)
            got.append((m.id, m.body))
            m.ack()
        assert got == list(zip(ids, range(COUNT)))


def test_async_node_send_many_is_written_slice_by_slice(relay):
    async def main() -> None:
        async with AsyncNode("aslices", relay=relay.endpoint, direct=False, timeout=30) as node:
            await node.send("aslices.box", -1)
            events = spy(node._io)
            ids = await node.send_many([("aslices.box", i) for i in range(COUNT)])
            assert len(ids) == len(set(ids)) == COUNT
            check_sliced([e for e in events if e != ("route", 0)])
            box = await node.consume("aslices.box", prefetch=500, direct=False)
            assert (await box.get()).body == -1
            got = []
            for _ in range(COUNT):
                m = await asyncio.wait_for(box.get(), 10)
                got.append((m.id, m.body))
                m.ack()
            assert got == list(zip(ids, range(COUNT)))

    asyncio.run(main())
