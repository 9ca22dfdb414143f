"""AsyncConsumer's queue (a deque and an Event): get() in order, a time-out,
a cancel that wakes a waiting get(), and two getters waiting at once."""

import asyncio

from murano_zmq.node.handles import AsyncConsumer
from murano_zmq.protocol.message import Message


class FakeNode:
    _closed = False

    def __init__(self):
        self.settled, self.cancelled = [], []

    def _settle(self, message, how, requeue):
        self.settled.append((message.tag, how))

    def _cancel(self, cid, mailbox):
        self.cancelled.append(cid)


def message(tag: int) -> Message:
    return Message(bytes(16), "m", {}, b"\xa1x", 1.0, None, 1, tag)


def test_get_in_order_time_out_cancel_and_two_getters():
    async def main():
        node = FakeNode()
        consumer = AsyncConsumer(node, "m")
        assert await consumer.get(timeout=0.05) is None  # nothing came
        consumer._feed([message(1), message(2)])
        first = await consumer.get(timeout=1)
        first.ack()
        assert first.tag == 1 and node.settled == [(1, "ack")]
        assert (await consumer.get(timeout=1)).tag == 2

        a = asyncio.ensure_future(consumer.get(timeout=5))
        b = asyncio.ensure_future(consumer.get(timeout=5))
        await asyncio.sleep(0.01)  # both wait
        consumer._feed([message(3)])
        consumer._feed([message(4)])
        assert sorted([(await a).tag, (await b).tag]) == [3, 4]

        waiting = asyncio.ensure_future(consumer.get())  # no time-out
        await asyncio.sleep(0.01)
        consumer.cancel()
        assert await asyncio.wait_for(waiting, 1) is None
        assert node.cancelled == [0]
        consumer._feed([message(5)])
        assert [m async for m in consumer] == []  # cancelled: nothing more

    asyncio.run(main())
