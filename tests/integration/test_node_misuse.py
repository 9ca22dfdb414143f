"""A node used where it cannot work says so before anything goes out: in
a process forked after it was made, on an event loop it was not started on."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from murano_zmq import AsyncNode, Node


def depth(relay, mailbox: str) -> int:
    with Node("inspector", relay=relay.endpoint, direct=False, timeout=10) as n:
        return next((m["depth"] for m in n.status()["mailboxes"] if m["name"] == mailbox), 0)


@pytest.mark.timeout(60)
def test_a_node_used_in_a_forked_child_raises_instead_of_hanging(relay):
    """The child's send took the parent's sockets and waited for ever,
    past its timeout."""
    with Node("parent", relay=relay.endpoint, direct=False, timeout=10) as node:
        node.send("forked", "from the parent")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, and leave without running anything of the parent's
            try:
                node.send("forked", "from the child", timeout=2)
                os.write(write, b"sent")
            except RuntimeError as exc:
                os.write(write, str(exc).encode()[:500])
                node.close()  # (a `with` unwinding in the child: the parent's node must not be touched)
                os.write(write, b"; closed")
            except BaseException as exc:  # noqa: BLE001 (anything else is the test's failure)
                os.write(write, repr(exc).encode()[:500])
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read().decode()
        assert os.waitpid(pid, 0)[1] == 0
        assert "before this process forked" in said and said.endswith("; closed"), said
        node.send("forked", "the parent's node still works")
    assert depth(relay, "forked") == 2


@pytest.mark.timeout(60)
def test_an_async_node_called_from_another_event_loop_refuses_before_sending(relay):
    """It sent the message, then raised "Event loop is closed": a caller told
    of a failure would send it again."""
    node = AsyncNode("one-loop", relay=relay.endpoint, direct=False, timeout=10)

    async def first():
        await node.start()
        await node.send("loops", 1)

    async def second():
        with pytest.raises(RuntimeError, match="runs on the event loop it started on"):
            await node.send("loops", 2)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
        asyncio.run(second())
        assert depth(relay, "loops") == 1
    finally:
        loop.run_until_complete(node.close())
        loop.close()


def test_a_get_without_a_timeout_returns_when_its_consumer_is_cancelled(make_node):
    """It waited for ever: cancel() from another thread did not wake it."""
    consumer = make_node("worker").consume("quiet")
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(consumer.get()), daemon=True)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "get() returned with no message and no cancel"
    consumer.cancel()
    waiter.join(5)
    assert not waiter.is_alive() and got == [None]


def test_a_get_without_a_timeout_returns_when_its_node_closes(relay):
    """Node.close() from another thread left a worker parked in get() for ever."""
    node = Node("worker", relay=relay.endpoint, direct=False, timeout=10)
    consumer = node.consume("quiet")
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(consumer.get()), daemon=True)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()
    node.close()
    waiter.join(5)
    assert not waiter.is_alive() and got == [None]


def test_an_async_get_without_a_timeout_returns_when_its_node_closes(relay):
    async def main():
        node = AsyncNode("worker", relay=relay.endpoint, direct=False, timeout=10)
        await node.start()
        consumer = await node.consume("quiet")
        task = asyncio.ensure_future(consumer.get())
        done, _ = await asyncio.wait([task], timeout=0.5)
        assert not done
        await node.close()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) is None
