"""Topics (PUB/SUB): fan-out by prefix, through discovery and through the
forwarder device; on both runners (make_node)."""

from __future__ import annotations

import signal
import subprocess
import sys

from ..helpers import free_tcp_endpoint, wait_for


def publish_until_heard(publisher, topic: str, subscriptions, timeout: float = 10.0) -> None:
    """PUB/SUB joins late (slow joiner): publish a marker until every
    subscription has heard it, then the real traffic follows."""
    heard = [False] * len(subscriptions)

    def all_heard():
        publisher.publish(topic, "marker")
        for i, s in enumerate(subscriptions):
            while (e := s.get(timeout=0.02)) is not None:
                heard[i] = heard[i] or e.topic == topic
        return all(heard)

    wait_for(all_heard, timeout, interval=0, what="subscribers to join")


def events(subscription, n: int) -> list:
    out = []
    while len(out) < n:
        e = subscription.get(timeout=10)
        assert e is not None, f"got {len(out)} of {n} events"
        if e.body != "marker":
            out.append((e.topic, e.body))
    return out


def test_fan_out_to_several_subscribers_by_prefix(make_node):
    pub = make_node("conductor")
    pub.publish("progress.warmup", "creates the PUB")
    endpoint = wait_for(lambda: pub._topics.pub_endpoint, 10, what="PUB bound")
    a, b = make_node("api-1"), make_node("api-2")
    env1 = a.subscribe("progress.env1", publishers=[endpoint])
    everything = b.subscribe("progress.", publishers=[endpoint])
    other = b.subscribe("audit.", publishers=[endpoint])
    publish_until_heard(pub, "progress.env1.marker", [env1, everything])
    for i in range(20):
        pub.publish(f"progress.env{1 + i % 2}", i)
    assert events(env1, 10) == [("progress.env1", i) for i in range(0, 20, 2)]
    assert events(everything, 20) == [(f"progress.env{1 + i % 2}", i) for i in range(20)]
    assert other.get(timeout=0.2) is None


def test_an_event_over_the_size_limit_cuts_off_its_publisher_not_the_subscriber(make_node):
    """A hostile publisher's 40 MiB frame: a node's SUB read any size (an
    allocation as large as the publisher liked).  Now libzmq drops that
    publisher's connection (and does not connect to it again after such
    a protocol error); the node goes on hearing the other publishers."""
    import msgpack
    import zmq

    from murano_zmq.protocol.topics import SIGNATURE

    ctx = zmq.Context.instance()
    hostile, good = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    endpoints = []
    for pub in (hostile, good):
        pub.setsockopt(zmq.LINGER, 0)
        endpoints.append(free_tcp_endpoint())
        pub.bind(endpoints[-1])
    dropped = hostile.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        node = make_node("sub")
        subscription = node.subscribe("big.", publishers=endpoints)
        huge = msgpack.packb(["hostile", b"x" * (40 << 20), 0.0], use_bin_type=True)

        def heard(pub, topic: str):
            def check():
                pub.send_multipart([topic.encode(), SIGNATURE, msgpack.packb(["p", b"\xa5small", 0.0])])
                while (e := subscription.get(timeout=0.05)) is not None:
                    assert e.topic != "big.huge", "an event over the size limit reached the application"
                    if e.topic == topic:
                        return True
                return False
            return check

        wait_for(heard(hostile, "big.hostile"), 30, interval=0, what="the hostile publisher's first event")
        wait_for(heard(good, "big.good"), 30, interval=0, what="the good publisher's first event")
        hostile.send_multipart([b"big.huge", SIGNATURE, huge])

        def hostile_dropped():
            while (e := subscription.get(timeout=0.05)) is not None:
                assert e.topic != "big.huge", "an event over the size limit reached the application"
            return dropped.poll(0)

        wait_for(hostile_dropped, 30, interval=0, what="the subscriber to drop the hostile publisher")
        wait_for(heard(good, "big.after"), 30, interval=0, what="an event after the oversized one")
    finally:
        hostile.disable_monitor()
        dropped.close(0)
        hostile.close(0)
        good.close(0)


def test_subscribers_find_publishers_by_discovery(make_node):
    pub, sub = make_node("pub", discovery="127.0.0.1"), make_node("sub", discovery="127.0.0.1")
    subscription = sub.subscribe("task.")
    publish_until_heard(pub, "task.marker", [subscription], timeout=15)
    pub.publish("task.7", {"step": "deploy"})
    assert events(subscription, 1) == [("task.7", {"step": "deploy"})]


def test_callback_subscription(make_node):
    node = make_node("n", relay=free_tcp_endpoint())
    got = []
    node.subscribe("x.", callback=lambda e: got.append(e.body))
    wait_for(lambda: (node.publish("x.y", 1), got)[1], 10, what="callback")
    assert got[0] == 1


def test_forwarder_device_connects_publishers_and_subscribers(make_node):
    xsub, xpub = free_tcp_endpoint(), free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "devices.forwarder", "--xsub", xsub, "--xpub", xpub])
    try:
        pub, sub = make_node("pub", forwarder=(xsub, xpub)), make_node("sub", forwarder=(xsub, xpub))
        subscription = sub.subscribe("progress.")
        publish_until_heard(pub, "progress.marker", [subscription], timeout=15)
        for i in range(10):
            pub.publish("progress.env1", i)
        assert events(subscription, 10) == [("progress.env1", i) for i in range(10)]
        pub.close()
        sub.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_forwarder_drops_a_publisher_of_events_over_its_size_and_goes_on(make_node):
    """Its memory is bounded by --max-message-size times the events queued
    per slow subscriber: a larger event is not passed on (its publisher's
    connection drops, and comes back)."""
    xsub, xpub = free_tcp_endpoint(), free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "devices.forwarder", "--xsub", xsub, "--xpub", xpub,
                             "--max-message-size", "4096"])
    try:
        pub, sub = make_node("pub", forwarder=(xsub, xpub)), make_node("sub", forwarder=(xsub, xpub))
        subscription = sub.subscribe("progress.")
        publish_until_heard(pub, "progress.marker", [subscription], timeout=15)
        pub.publish("progress.big", b"x" * 100_000)
        seen = []

        def small_heard():
            pub.publish("progress.small", "after")
            while (e := subscription.get(timeout=0.05)) is not None:
                seen.append(e.topic)
            return "progress.small" in seen

        wait_for(small_heard, 30, interval=0, what="a small event after the big one")
        assert "progress.big" not in seen
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


HOSTILE_SUBSCRIBER = """
import os, sys, zmq
s = zmq.Context.instance().socket(zmq.XSUB)
for endpoint in sys.argv[1:]:
    s.connect(endpoint)
for _ in range(3):
    s.send(b"\\x01progress." + b"x" * (256 << 10))
sys.stdout.write("sent\\n")
sys.stdout.flush()
sys.stdin.read()
os._exit(0)  # (its own XSUB keeps the trie too: closing it would crash this process)
"""


def test_a_subscription_over_a_topics_size_costs_the_forwarder_nothing(make_node):
    """libzmq keeps a subscription as a trie, a node per byte (~80 bytes of
    memory each), and unsubscribes a leaving subscriber by recursing once
    per byte: one 256 KiB subscription crashed the forwarder (SIGSEGV) when
    its subscriber went, and a publisher node's PUB alike.  Now the XPUB
    (and a node's PUB) drops a subscriber that sends one."""
    xsub, xpub = free_tcp_endpoint(), free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "devices.forwarder", "--xsub", xsub, "--xpub", xpub])
    hostile = None
    try:
        pub, sub = make_node("pub", forwarder=(xsub, xpub)), make_node("sub", forwarder=(xsub, xpub))
        subscription = sub.subscribe("progress.")
        publish_until_heard(pub, "progress.marker", [subscription], timeout=15)
        own = wait_for(lambda: pub._topics.pub_endpoint, 10, what="the publisher's own PUB")
        hostile = subprocess.Popen([sys.executable, "-c", HOSTILE_SUBSCRIBER, xpub, own],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert hostile.stdout.readline() == "sent\n"
        publish_until_heard(pub, "progress.between", [subscription], timeout=15)  # (after its subscriptions)
        hostile.stdin.close()  # it leaves: its subscriptions go
        hostile.wait(10)
        publish_until_heard(pub, "progress.after", [subscription], timeout=15)
        assert proc.poll() is None, "the forwarder died"
    finally:
        if hostile is not None and hostile.poll() is None:
            hostile.kill()
            hostile.wait(10)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_an_event_over_the_largest_message_is_refused(make_node):
    """A forwarder drops a publisher that sends one (its --max-message-size
    is the same 16 MiB by default): publish() says so instead."""
    import pytest

    from murano_zmq import MessageTooLarge
    from murano_zmq.protocol.constants import DEFAULT_MAX_MESSAGE_SIZE

    node = make_node("publisher", relay=free_tcp_endpoint())
    with pytest.raises(MessageTooLarge, match="event"):
        node.publish("progress.big", b"x" * (DEFAULT_MAX_MESSAGE_SIZE + 1))
    node.publish("progress.small", "fine")


def test_the_longest_prefix_still_subscribes_where_subscriptions_are_bounded():
    """libzmq (ZMTP 3.1) sends a subscription as a command whose header is
    10 bytes, not 1: a bound of 1 + 4 x 255 dropped (and so looped on) a
    prefix of 253 or more 4-byte characters, a valid topic."""
    import zmq

    from murano_zmq.protocol.constants import MAX_NAME_LENGTH, MAX_SUBSCRIPTION_SIZE

    ctx = zmq.Context()
    xpub, sub = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB)
    try:
        for s in (xpub, sub):
            s.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_SIZE)
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        prefix = ("\U0001F680" * MAX_NAME_LENGTH).encode()
        sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(f"tcp://127.0.0.1:{port}")
        assert xpub.poll(10_000), "the subscription never came"
        assert xpub.recv() == b"\x01" + prefix
    finally:
        xpub.close(0)
        sub.close(0)
        ctx.term()


def test_a_prefix_longer_than_a_topic_is_refused(make_node):
    import pytest

    with pytest.raises(ValueError, match="prefix is at most 255"):
        make_node("sub").subscribe("p" * 256)


def test_a_cancelled_subscription_leaves_nothing_behind(make_node):
    """Its prefix and its publishers were kept for the node's life (ids
    never repeat): 369,000 subscribe/cancel cycles grew a node by 160 MB."""
    node = make_node("poller")
    for _ in range(50):
        node.subscribe("progress.").cancel()
    topics = node._topics
    wait_for(lambda: not topics._subs and not topics._prefixes and not topics._connected, 10,
             what="every subscription's state gone")
