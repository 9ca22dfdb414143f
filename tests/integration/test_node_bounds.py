"""What a node holds when it cannot hand messages on, and idempotent sends:
the same bounds and parameters on both runners (issue 12, item 7)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from murano_zmq import Node, NodeClosed, RelayUnavailable, SendQueueFull, idempotent_id

from ..helpers import free_tcp_endpoint


def test_no_relay_send_queue_is_bounded(make_node):
    node = make_node("lonely", relay=free_tcp_endpoint(), max_pending=200, timeout=5)
    held = [node.send_async("nowhere", i) for i in range(200)]
    assert node.pending == 200
    with pytest.raises(SendQueueFull, match="max_pending=200"):
        node.send_async("nowhere", "one too many")
    with pytest.raises(SendQueueFull):
        node.send_many([("nowhere", i) for i in range(5)], timeout=1)
    assert node.pending == 200, "a refused send must not be held"
    assert not any(f.done() for f in held)


def test_no_relay_send_queue_is_bounded_in_bytes(make_node, relay_factory):
    """Bodies count too: 100,000 sends of 64 KiB held 6.5 GB while no relay
    answered.  When the relay comes, the held ones go and there is room again."""
    endpoint = free_tcp_endpoint()
    node = make_node("lonely", relay=endpoint, max_pending_bytes=100_000, timeout=15)
    body = b"x" * 9_997  # 10,000 bytes packed (bin 16: 3 bytes of header)
    held = [node.send_async("nowhere", body) for _ in range(10)]
    with pytest.raises(SendQueueFull, match=r"holds 10 messages of 100000 bytes .*max_pending_bytes=100000"):
        node.send_async("nowhere", "x")
    with pytest.raises(SendQueueFull, match="max_pending_bytes"):
        node.send_many([("nowhere", i) for i in range(5)], timeout=1)
    assert node.pending == 10, "a refused send must not be held"
    assert not any(f.done() for f in held)
    relay_factory(endpoint=endpoint)
    for future in held:
        future.result(timeout=15)
    for _ in range(30):  # 300,000 bytes through a node that may hold 100,000
        node.send("nowhere", body)
    node.send_many([("nowhere", body)] * 10)


def test_a_send_larger_than_max_pending_bytes_says_so(make_node):
    node = make_node("api", max_pending_bytes=50_000)
    with pytest.raises(SendQueueFull, match=r"a send of 60003 bytes is more than .*\(max_pending_bytes=50000\)"):
        node.send("q", b"x" * 60_000)
    with pytest.raises(SendQueueFull, match=r"a send of 60\d+ bytes is more than"):
        node.send_many([("q", b"x" * 6_000)] * 10)
    assert node.send_many([("q", b"x" * 4_000)] * 10)


def test_a_send_many_larger_than_max_pending_says_so(make_node):
    """With the relay up, it said the node held 0 messages and asked
    whether the relay was reachable."""
    node = make_node("api", max_pending=10)
    with pytest.raises(SendQueueFull, match=r"a send_many of 11 messages is more than .*\(max_pending=10\)"):
        node.send_many([("q", i) for i in range(11)])
    assert node.send_many([("q", i) for i in range(10)])


def test_status_calls_that_timed_out_are_not_kept(make_node):
    """A status poll during an outage kept every timed-out STATUS, to be
    replayed all at once when the relay came back: a health check each
    second piled up 3,600 an hour."""
    from ..helpers import wait_for

    node = make_node("poller", relay=free_tcp_endpoint(), timeout=5)
    for _ in range(20):
        with pytest.raises(RelayUnavailable):
            node.status(timeout=0.05)
    wait_for(lambda: not node._core.session._requests and not node._core.dispatch.requests, 5,
             what="the timed-out requests dropped")


def test_an_async_status_cancelled_by_its_caller_is_not_kept():
    """asyncio.wait_for() around status() cancels it: kept like a timed-out one before."""
    import asyncio

    from murano_zmq import AsyncNode

    async def main():
        async with AsyncNode("poller", relay=free_tcp_endpoint(), timeout=30, discovery=False) as node:
            for _ in range(5):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(node.status(), 0.05)
            return dict(node._core.session._requests), dict(node._core.dispatch.requests)

    assert asyncio.run(main()) == ({}, {})


def test_wait_false_with_no_relay_raises_at_once(make_node):
    node = make_node("lonely", relay=free_tcp_endpoint(), timeout=30)
    start = time.monotonic()
    with pytest.raises(RelayUnavailable, match="wait=False"):
        node.send("nowhere", "x", wait=False)
    assert time.monotonic() - start < 5
    assert node.pending == 0


def test_msg_id_makes_a_send_idempotent(make_node):
    node = make_node("api")
    key = idempotent_id("order-42")
    first = node.send("orders", {"n": 1}, msg_id=key)
    again = node.send("orders", {"n": 1}, msg_id=key)
    assert first == again == key
    [mailbox] = [m for m in node.status()["mailboxes"] if m["name"] == "orders"]
    assert mailbox["depth"] == 1
    with pytest.raises(Exception, match="msg_id"):
        node.send("orders", 1, msg_id=b"short")


@pytest.mark.parametrize("option", ["max_pending", "max_pending_bytes"])
@pytest.mark.parametrize("value", [0, True, 2.5, "10"])
def test_max_pending_must_be_a_positive_whole_number(node_kind, option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        node_kind("n", relay=free_tcp_endpoint(), **{option: value})


def test_wait_false_on_a_closed_node_says_it_is_closed():
    """(It said no relay was connected.  AsyncNode checks first already.)"""
    node = Node("closing", relay=free_tcp_endpoint(), discovery=False, direct=False, timeout=5)
    node.close()
    with pytest.raises(NodeClosed):
        node.send("nowhere", "x", wait=False)


@pytest.mark.parametrize("relay", ["tcp://nohost:x", "garbage", "tcp://127.0.0.1:99999", "tcp://127.0.0.1",
                                   ["tcp://127.0.0.1:5570", "nonsense"], "tcp://127.0.0.1:5570,", [], 5570,
                                   ["tcp://127.0.0.1:5570", "tcp://127.0.0.1:5570"]])
def test_a_bad_relay_is_a_value_error_in_the_callers_thread(node_kind, relay):
    """Not a traceback from the node's I/O thread and a node that never connects."""
    with pytest.raises(ValueError, match="relay="):
        node_kind("bad-relay", relay=relay, timeout=5)


def test_a_bad_relay_in_the_environment_names_the_variable(node_kind, monkeypatch):
    monkeypatch.setenv("MURANO_ZMQ_RELAY", "tcp://nohost:x")
    with pytest.raises(ValueError, match=r"\$MURANO_ZMQ_RELAY="):
        node_kind("bad-relay", timeout=5)


def test_numbers_out_of_range_are_refused_and_the_node_lives_on(make_node):
    """Numbers past what the wire carries (or the relay grants) were sent to
    the node's I/O thread, which died encoding them: the node closed."""
    node = make_node("careless")
    with pytest.raises(ValueError, match="max_length"):
        node.declare("big", max_length=10 ** 23)
    with pytest.raises(ValueError, match="ttl"):
        node.declare("big", ttl=10 ** 30)
    with pytest.raises(ValueError, match="prefetch"):
        node.consume("big", prefetch=10 ** 30)
    with pytest.raises(ValueError, match="prefetch_bytes"):
        node.consume("big", prefetch_bytes=1 << 63)
    with pytest.raises(Exception, match="ttl"):
        node.send("big", "x", ttl=10 ** 30)
    assert node.declare("big", max_length=(1 << 64) - 1)["name"] == "big"
    node.send("big", "still here")
    assert node.consume("big").get(timeout=10).body == "still here"


@pytest.mark.parametrize("option, value", [
    ("heartbeat", 0), ("heartbeat", -1), ("heartbeat", float("nan")), ("heartbeat", float("inf")),
    ("heartbeat", "1"), ("heartbeat", 0.001), ("heartbeat", 3600),
    ("timeout", 0), ("timeout", -1), ("timeout", float("nan")), ("timeout", "5"),
    ("direct_timeout", 0), ("direct_timeout", float("nan")),
    ("spin", -0.001), ("spin", float("nan")), ("spin", 1.0), ("spin", "0.0005"),
])
def test_a_nonsense_heartbeat_or_timeout_is_refused_when_the_node_is_made(node_kind, option, value):
    """heartbeat 0 reconnected at every turn (thousands of sessions a second
    on the relay, then the node died of too many open files); nan waited
    for ever; a str killed the I/O thread."""
    with pytest.raises(ValueError, match=option):
        node_kind("careless", relay=free_tcp_endpoint(), **{option: value})


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "5"])
def test_a_call_with_a_nonsense_timeout_sends_nothing(make_node, timeout):
    """It raised after the message had gone out: a caller told of a failure
    would send it again."""
    node = make_node("careless")
    with pytest.raises(ValueError, match="timeout"):
        node.send("careful", "x", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        node.send_many([("careful", "y")], timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        node.status(timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        node.consume("careful", timeout=timeout)
    assert not [m for m in node.status()["mailboxes"] if m["name"] == "careful"]


@pytest.mark.parametrize("bind", ["garbage", "tcp://127.0.0.1:99999", None, "tcp://192.0.2.1:*", "tcp://127.0.0.1",
                                  "nope://x", 5570, "inproc://direct"])
def test_a_direct_bind_the_node_cannot_use_is_a_value_error(node_kind, bind):
    with pytest.raises(ValueError, match="bind="):
        node_kind("careless", relay=free_tcp_endpoint(), bind=bind, timeout=5)


def test_a_node_whose_bind_fails_leaves_no_descriptor_open():
    """(Its wake pipe stayed open: the oslo driver, making a node per send,
    lost two descriptors a send.  An AsyncNode's failed start lost its own:
    `async with` calls no close() then.)  Counted in a process of its own:
    this one holds what earlier tests left to the collector."""
    script = """
import asyncio, gc, os, time
from murano_zmq import AsyncNode, Node
from murano_zmq.testing import free_tcp_endpoint

def open_fds():
    gc.collect()  # (what a collection would close is not a leak: under load it lagged, 51 then 9 open)
    return len(os.listdir("/proc/self/fd"))

def settled(limit):
    # The count once it is at most `limit`, or after 10 s: libzmq's reaper
    # thread closes a closed socket's descriptors after zmq_close returns,
    # later under load; a leak stays over the limit.
    deadline = time.monotonic() + 10
    while open_fds() > limit and time.monotonic() < deadline:
        time.sleep(0.02)
    return open_fds()

def starts():
    for _ in range(20):
        try:
            Node("careless", relay=free_tcp_endpoint(), bind="tcp://192.0.2.1:*", discovery=False, timeout=5)
        except ValueError as exc:
            assert "cannot bind" in str(exc), exc

async def async_starts():
    for _ in range(20):
        try:
            async with AsyncNode("careless", relay=free_tcp_endpoint(), bind="tcp://192.0.2.1:*",
                                 discovery=False, timeout=5):
                pass
        except ValueError as exc:
            assert "cannot bind" in str(exc), exc

starts(); asyncio.run(async_starts())  # (once first: the context's own descriptors)
before = open_fds(); starts(); after_sync = settled(before + 2)
asyncio.run(async_starts()); after_async = settled(after_sync + 2)
print(before, after_sync, after_async)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after_sync, after_async = map(int, out.stdout.split())
    assert after_sync <= before + 2 and after_async <= after_sync + 2, out.stdout
