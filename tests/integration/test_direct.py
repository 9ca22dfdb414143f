"""Direct (peer-to-peer) delivery: used when a consumer is reachable, the
relay takes over when it is not, FIFO and exactly-once to the application
hold across switches, and online nodes keep talking with the relay dead.
Every test runs on both runners (Node and AsyncNode) through make_node."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

from murano_zmq import Node
from murano_zmq.protocol.constants import DEFAULT_DIRECT_TIMEOUT

from ..helpers import wait_for


def counters(node: Node) -> dict:
    return node.status()["counters"]


def consumers_of(node: Node, mailbox: str) -> int:
    for mb in node.status()["mailboxes"]:
        if mb["name"] == mailbox:
            return mb["consumers"]
    return 0


def collect(consumer, n: int, timeout: float = 15.0) -> list:
    got = []
    while len(got) < n:
        m = consumer.get(timeout=timeout)
        assert m is not None, f"got {len(got)} of {n}"
        got.append(m.body)
        m.ack()
    return got


def test_online_consumer_gets_messages_peer_to_peer(make_node):
    svc, client = make_node("svc"), make_node("client")
    inbox = svc.consume("svc.requests")
    assert svc.endpoint.startswith("tcp://127.0.0.1:")
    received = []
    reader = threading.Thread(target=lambda: received.extend(collect(inbox, 1000)))
    reader.start()
    # The first sends may take the relay until the sender has learned the
    # consumer's endpoint and seen the relay drained; then it goes direct.
    for i in range(200):
        client.send("svc.requests", i)
    before = counters(client)
    for i in range(200, 1000):
        client.send("svc.requests", i)
    reader.join(30)
    after = counters(client)
    assert received == list(range(1000))
    assert after["received"] == before["received"], "direct sends must not touch the relay"
    assert after["delivered"] == before["delivered"]


def test_falls_back_to_the_relay_and_delivers_when_the_consumer_returns(make_node):
    client = make_node("client", heartbeat=0.2)
    svc = make_node("svc", heartbeat=0.2)
    inbox = svc.consume("svc.work")
    for i in range(50):
        client.send("svc.work", i)
    assert collect(inbox, 50) == list(range(50))
    svc.close()
    # svc is gone (it said BYE on both paths): these wait in the relay.
    client.send_many([("svc.work", i) for i in range(50, 100)], timeout=30)
    assert client.status()["mailboxes"][0]["depth"] == 50
    svc = make_node("svc-again")
    assert collect(svc.consume("svc.work"), 50) == list(range(50, 100))


def test_a_consumer_that_takes_nothing_yet_does_not_hold_its_senders_up(make_node):
    """A direct consumer whose application takes nothing stalls the link:
    the sender gives the relay a copy of what is out on it and sends the
    mailbox's next messages through the relay, so sends return once stored,
    long before the link would time out; the application then gets every
    message once, in order."""
    svc, client = make_node("svc"), make_node("client")
    inbox = svc.consume("stalled", prefetch=20)
    t0 = time.monotonic()
    client.send_many([("stalled", i) for i in range(200)])
    took = time.monotonic() - t0
    assert client.path_counts["direct"] == 200, "the stream started direct"
    client.send_many([("stalled", i) for i in range(200, 300)])  # behind them, through the relay
    assert took < DEFAULT_DIRECT_TIMEOUT / 2, f"send_many waited {took:.1f}s for a consumer taking nothing"
    assert collect(inbox, 300) == list(range(300)), "FIFO, and each message once"
    assert inbox.get(timeout=0.5) is None, "the relay's copies are not handed out again"


def test_fifo_across_a_switch_from_direct_to_relay_and_back(make_node):
    release = threading.Event()
    seen: list = []
    svc, client = make_node("svc"), make_node("client", direct_timeout=0.5)
    inbox = svc.consume("fifo", prefetch=50)

    def read():
        while len(seen) < 3000:
            m = inbox.get(timeout=20)
            if m is None:
                return
            if m.body == 1500:
                release.wait(20)  # a stalled consumer: direct sends time out
            seen.append(m.body)
            m.ack()

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(1000):
        client.send("fifo", i)  # relay first, then direct
    relay_count = counters(client)["received"]
    futures = [client.send_async("fifo", i) for i in range(1000, 3000)]
    # The stall makes the direct link time out: its unconfirmed messages
    # go to the relay, oldest first.
    wait_for(lambda: counters(client)["received"] > relay_count, 20, what="switch to the relay")
    release.set()
    for f in futures:
        f.result(60)
    reader.join(60)
    assert seen == list(range(3000)), "FIFO and exactly-once across the switch"


STREAM_CONSUMER = """
import sys, json
from murano_zmq import Node
total = int(sys.argv[2])
with Node("stream-consumer", relay=sys.argv[1], heartbeat=0.2) as node:
    c = node.consume("stream", prefetch=500)
    print("ready", flush=True)
    bodies = []
    while len(set(bodies)) < total:
        m = c.get(timeout=30)
        if m is None:
            break
        bodies.append(m.body)
        m.ack()
    print(json.dumps(bodies), flush=True)
"""


def test_relay_killed_during_a_direct_stream_loses_and_duplicates_nothing(relay, children, make_node):
    total = 10_000
    warmup = 300
    consumer = children(STREAM_CONSUMER, relay.endpoint, str(total + warmup),
                        stdout=subprocess.PIPE, text=True)
    assert consumer.stdout.readline().strip() == "ready"
    producer = make_node("producer", heartbeat=0.2, timeout=60)
    wait_for(lambda: consumers_of(producer, "stream") == 1, 20, what="consumer")
    for i in range(warmup):  # establishes the direct path
        producer.send("stream", i)
    futures = [producer.send_async("stream", i) for i in range(warmup, warmup + total)]
    wait_for(lambda: sum(f.done() for f in futures[:5000]) >= 2000, 60, interval=0.005,
             what="part of the stream")
    relay.kill()
    for f in futures:
        f.result(60)
    producer.close()
    bodies = json.loads(consumer.stdout.readline())
    assert consumer.wait(30) == 0
    assert len(bodies) == len(set(bodies)), "a message reached application code twice"
    assert bodies == list(range(warmup + total))


DOOMED = """
import sys
from murano_zmq import Node
node = Node("doomed", relay=sys.argv[1], heartbeat=0.2)
c = node.consume("jobs", prefetch=1000)
print("ready", flush=True)
while True:
    m = c.get(timeout=30)
    print(m.body, flush=True)  # never acks
"""


def test_consumer_killed_mid_stream_its_unacked_messages_reach_the_other(relay, children, make_node):
    doomed = children(DOOMED, relay.endpoint, stdout=subprocess.PIPE, text=True)
    assert doomed.stdout.readline().strip() == "ready"
    survivor = make_node("survivor", heartbeat=0.2)
    producer = make_node("producer", heartbeat=0.2, direct_timeout=1.0)
    inbox = survivor.consume("jobs", prefetch=1000)
    wait_for(lambda: consumers_of(producer, "jobs") == 2, 20, what="two consumers")
    futures = [producer.send_async("jobs", i) for i in range(400)]
    first = int(doomed.stdout.readline())  # the doomed one holds some, unacked
    assert 0 <= first < 400
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    got = set(collect(inbox, 400, timeout=30))
    assert got == set(range(400))
    for f in futures:
        f.result(30)


def test_relay_only_node_never_binds(make_node):
    agent, c = make_node("agent", direct=False), make_node("conductor")
    assert agent.endpoint is None
    plans = agent.consume("agent.e1.u1")
    for i in range(100):
        c.send("agent.e1.u1", i)
    assert collect(plans, 100) == list(range(100))
    assert counters(c)["received"] == 100  # every one through the relay


def test_with_the_relay_down_messages_wait_bounded_or_fail_at_once(relay_factory, make_node):
    from murano_zmq import RelayUnavailable, SendQueueFull

    relay = relay_factory()
    endpoint, data_dir = relay.endpoint, relay.data_dir
    sender = make_node("sender", relay=endpoint, heartbeat=0.2, max_pending=50, timeout=30)
    sender.send("offline.agent", "before")
    relay.kill()
    wait_for(lambda: sender._core.state.value != "ready", 10, what="the node to notice")
    try:
        sender.send("offline.agent", "refused", wait=False)
    except RelayUnavailable as exc:
        assert "wait=False" in str(exc)
    else:
        raise AssertionError("wait=False with no relay must raise RelayUnavailable")
    held = [sender.send_async("offline.agent", i) for i in range(50)]
    try:
        sender.send_async("offline.agent", "one too many")
    except SendQueueFull as exc:
        assert "max_pending=50" in str(exc)
    else:
        raise AssertionError("the 51st held message must raise SendQueueFull")
    assert not any(f.done() for f in held)
    relay_factory(endpoint=endpoint, data_dir=data_dir)
    for f in held:
        f.result(30)
    agent = make_node("agent", relay=endpoint, direct=False)
    assert collect(agent.consume("offline.agent"), 51) == ["before", *range(50)]


def test_competing_direct_consumers_share_the_stream(make_node):
    a, b, client = make_node("a"), make_node("b"), make_node("client")
    got = {"a": [], "b": []}
    inboxes = {"a": a.consume("shared.work", prefetch=50), "b": b.consume("shared.work", prefetch=50)}
    wait_for(lambda: consumers_of(client, "shared.work") == 2, 10, what="two consumers")
    stop = threading.Event()

    def read(key: str) -> None:  # each consumer acks in its own thread, as a service would
        while not stop.is_set():
            m = inboxes[key].get(timeout=0.05)
            if m is not None:
                got[key].append(m.body)
                m.ack()

    readers = [threading.Thread(target=read, args=(k,)) for k in inboxes]
    for r in readers:
        r.start()
    try:
        for i in range(100):  # the sender learns both direct endpoints
            client.send("shared.work", i)
        before = counters(client)["received"]
        futures = [client.send_async("shared.work", i) for i in range(100, 2100)]
        for f in futures:
            f.result(30)
        wait_for(lambda: len(got["a"]) + len(got["b"]) >= 2100, 30, what="2,100 messages")
    finally:
        stop.set()
        for r in readers:
            r.join(10)
    assert sorted(got["a"] + got["b"]) == list(range(2100))
    late_a = [x for x in got["a"] if x >= 100]
    late_b = [x for x in got["b"] if x >= 100]
    assert len(late_a) > 200 and len(late_b) > 200, "direct traffic is shared by both consumers"
    assert counters(client)["received"] == before, "all of it went peer to peer"
