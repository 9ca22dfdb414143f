"""AsyncNode's turns by FD: each socket's ZMQ_FD calls a turn for that
socket alone, and the relay's goes straight to reading it.  A wake-up that
finds nothing (the FD fires for a command that is no message) must cost
nothing but the read; input on another socket must not wait for it."""

from __future__ import annotations

import asyncio

import pytest

from murano_zmq import AsyncNode
from murano_zmq.protocol.constants import ACK_EARLY_MIN_PREFETCH

from ..helpers import SpinSpy, stopped_for

pytestmark = pytest.mark.timeout(60)


def test_a_relay_wake_up_with_nothing_to_read_leaves_the_node_working(relay):
    async def main():
        async with AsyncNode("turns", relay=relay.endpoint, timeout=20) as node:
            await node.send("turns.box", b"warm")
            io = node._io
            relay_fd = next(fd for fd in io.fds() if io.socket_of(fd) is io.relay_sock)
            for _ in range(3):
                node._turn(relay_fd)  # nothing queued: the read finds nothing
            assert not io.input_waiting(), "nothing was left queued"
            ids = [await node.send("turns.box", i) for i in range(20)]
            assert len(set(ids)) == 20
            consumer = await node.consume("turns.box", prefetch=50)
            got = []
            while len(got) < 21:
                message = await consumer.get(timeout=10)
                got.append(message.body)
                message.ack()
            assert got == [b"warm", *range(20)]

    asyncio.run(main())


def test_a_consumer_and_lone_sends_on_one_node_both_progress(relay):
    """DELIVERs and CONFIRMs on the relay socket, the consumer's acks and
    the sends' writes interleaved: each wake-up reads what its FD says."""
    async def main():
        async with AsyncNode("turns2", relay=relay.endpoint, timeout=20) as node:
            consumer = await node.consume("turns.loop", prefetch=10)

            async def take(n):
                bodies = []
                for _ in range(n):
                    message = await consumer.get(timeout=10)
                    bodies.append(message.body)
                    message.ack()
                return bodies

            taker = asyncio.ensure_future(take(200))
            for i in range(200):
                await node.send("turns.loop", i)
            assert await asyncio.wait_for(taker, 30) == list(range(200))

    asyncio.run(main())


def test_half_a_window_acked_is_written_before_the_application_pauses(relay):
    """A consumer working through a burst without yielding: the acks of
    half its window go out at once, and the relay refills that half while
    the rest waits; a window under ACK_EARLY_MIN_PREFETCH acks at the pause."""
    async def main():
        async with AsyncNode("early", relay=relay.endpoint, timeout=20) as node:
            await node.send_many([("early.box", i) for i in range(200)] + [("early.small", i) for i in range(40)])
            session = node._core.session

            async def until_queued(consumer, n):
                for _ in range(1000):  # (bounded: 10 s)
                    if len(consumer._queue) >= n:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"{len(consumer._queue)} of {n} messages came")

            consumer = await node.consume("early.box", prefetch=64)
            await until_queued(consumer, 64)
            for i in range(32):  # no await between: the loop does not run
                message = await consumer.get()
                message.ack()
                assert len(session._pending_acks) == (0 if i == 31 else i + 1)
            assert not session.has_output, "the ACK was written, not only queued"
            await until_queued(consumer, 64)  # the relay refilled the half acked
            assert [m.body for m in list(consumer._queue)[-32:]] == list(range(64, 96))

            small = await node.consume("early.small", prefetch=ACK_EARLY_MIN_PREFETCH - 1)
            await until_queued(small, ACK_EARLY_MIN_PREFETCH - 1)
            assert session.ack_early == 0
            for _ in range(ACK_EARLY_MIN_PREFETCH - 1):
                (await small.get()).ack()
            assert len(session._pending_acks) == ACK_EARLY_MIN_PREFETCH - 1, "written at the pause"

    asyncio.run(main())


def test_a_node_that_only_reads_keeps_its_session_with_heartbeats(relay):
    """A consumer that takes deliveries and writes nothing (it does not ack
    yet): its turns only read the relay socket, which leave the timer where
    it is (_after_io), and the timer's ticks still write the heartbeats the
    relay needs: no session lost (which would redeliver what it holds)."""
    async def main():
        async with AsyncNode("reader", relay=relay.endpoint, heartbeat=0.1, timeout=20) as reader, \
                AsyncNode("writer", relay=relay.endpoint, timeout=20) as writer:
            consumer = await reader.consume("turns.read", prefetch=500)
            read_only = []
            real = reader._after_io
            reader._after_io = lambda read_only_turn=False: read_only.append(read_only_turn) or real(read_only_turn)
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.0  # 20 heartbeats, 4 times the relay's patience (5 heartbeats)
            got, i = [], 0
            while loop.time() < end:
                await writer.send("turns.read", i)
                i += 1
                got.append(await consumer.get(timeout=10))
                await asyncio.sleep(0.02)
            assert any(read_only), "turns that only read were seen"
            assert reader._core.session.connections == 1, "the relay dropped the reader's session"
            assert [m.body for m in got] == list(range(i)) and not any(m.redelivered for m in got)
            for message in got:
                message.ack()

    asyncio.run(main())


def test_a_lone_send_spins_for_its_confirm_only_when_nothing_else_is_ready(relay):
    """An awaited send alone on its loop looks for its CONFIRM without
    going back to the loop, for up to `spin` seconds, and returns without
    a loop iteration when it came; with other tasks ready to run it does
    not (they would wait): concurrent sends still go out together.  After
    an answer slower than the spin, the next send does not spin."""
    import murano_zmq.node.aio as aio

    async def until_quick(node) -> None:
        for _ in range(50):  # (a loaded machine may take longer than the spin now and then)
            await node.send("spin.box", b"x")
            if node._spin_pays:
                return
        raise AssertionError("no answer within the spin in 50 sends")

    async def main(spy: SpinSpy):
        async with AsyncNode("spinner", relay=relay.endpoint, timeout=20, spin=0.005) as node:
            await until_quick(node)
            spy.clear()
            await node.send("spin.box", b"alone")
            for _ in range(20):  # (a turn may have left a call_soon ready: that send does not spin)
                if spy.spins:
                    break
                await node.send("spin.box", b"alone")
            assert spy.spins, "a lone send with nothing else ready spins"
            assert any(spy.found), "the spins found the CONFIRMs"
            spy.clear()
            ids = await asyncio.gather(*(node.send("spin.box", i) for i in range(10)))
            assert len(set(ids)) == 10
            assert len(spy.spins) <= 1, "with other sends ready to run, they are not held up by a spin"
            with stopped_for(relay.pid, 0.2):
                await node.send("spin.box", b"slow")
            assert not node._spin_pays
            spy.clear()
            await node.send("spin.box", b"after")
            assert spy.spins == [], "after a slow answer the next send does not spin"
            consumer = await node.consume("spin.box", prefetch=100)
            bodies = []
            while True:
                message = await consumer.get(timeout=5)
                if message is None:
                    break
                bodies.append(message.body)
                message.ack()
                if message.body == b"after":
                    break
            assert bodies[-13:] == [b"alone", *range(10), b"slow", b"after"]

    with SpinSpy(aio) as spy:
        asyncio.run(main(spy))


def test_sends_answered_in_their_spin_still_let_the_loop_run(relay):
    """Sends one after another, each answered while it spins, return
    without a loop iteration: but for one every millisecond, so a task
    that only needs the loop (here a timer's, every 0.5 ms: not ready
    between them, so the sends spin) still runs all along, not only when
    the sends stop."""
    ticks = [0]

    async def ticker():
        while True:
            ticks[0] += 1
            await asyncio.sleep(0.0005)

    async def main():
        async with AsyncNode("spinner", relay=relay.endpoint, timeout=20, spin=0.005) as node:
            for _ in range(20):
                await node.send("spin.loop", b"warm")
            task = asyncio.get_running_loop().create_task(ticker())
            await asyncio.sleep(0)  # (it starts)
            started, begun = ticks[0], asyncio.get_running_loop().time()
            for i in range(300):
                await node.send("spin.loop", i)
            spent_ms = (asyncio.get_running_loop().time() - begun) * 1000
            task.cancel()
            # at least one iteration a millisecond, but for the last and the
            # spin that ends past it (without the bound: a handful in all)
            assert ticks[0] - started >= spent_ms / 3, (ticks[0] - started, spent_ms)

    asyncio.run(main())
