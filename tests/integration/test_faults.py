"""Crashes and restarts: kill -9 of the relay and of consumers, SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from murano_zmq import Node
from murano_zmq.testing import relay_answers

from ..helpers import drain, kill_mid_stream, wait_for


def test_relay_kill9_mid_pipelined_sends_loses_nothing(relay_factory):
    relay = relay_factory()
    endpoint, data_dir = relay.endpoint, relay.data_dir
    total = 5000
    with Node("sender", relay=endpoint, heartbeat=0.2, timeout=60) as sender:
        futures = [sender.send_async("jobs", {"n": i}) for i in range(total // 2)]
        # Killed once part of the stream is confirmed, never all of it.
        confirmed_before_kill = kill_mid_stream(
            relay, lambda i: sender.send_async("jobs", {"n": total // 2 + i}), futures, total // 2, 500)
        relay_factory(endpoint=endpoint, data_dir=data_dir)
        ids = [f.result(timeout=60) for f in futures]  # the node resends what was unconfirmed
    assert len(set(ids)) == total
    with Node("receiver", relay=endpoint, timeout=30) as receiver:
        seen = [m.id for m in drain(receiver.consume("jobs", prefetch=500), total)]
    assert len(seen) == len(set(seen)), "a message reached application code twice"
    assert set(seen) == set(ids)
    assert confirmed_before_kill <= set(seen)


# Segment files are the SQLite store's (conftest.relay_factory may run relays on PostgreSQL).
ON_SQLITE = os.environ.get("MURANO_ZMQ_TEST_STORE") != "postgresql"


def big_body(n: int) -> bytes:
    """64 KiB that differ per message (segment files: store/segments.py)."""
    return hashlib.sha256(str(n).encode()).digest() * 2048


def test_relay_kill9_mid_pipelined_64k_sends_keeps_every_confirmed_body(relay_factory):
    relay = relay_factory()
    endpoint, data_dir = relay.endpoint, relay.data_dir
    total = 600
    with Node("sender", relay=endpoint, heartbeat=0.2, timeout=60) as sender:
        half = total // 2
        futures = [sender.send_async("big", big_body(i), headers={"n": str(i)}) for i in range(half)]
        confirmed_before_kill = kill_mid_stream(
            relay, lambda i: sender.send_async("big", big_body(half + i), headers={"n": str(half + i)}),
            futures, half, 100)
        if ON_SQLITE:
            assert os.listdir(os.path.join(data_dir, "segments"))  # the bodies went to segment files
        relay_factory(endpoint=endpoint, data_dir=data_dir)
        ids = [f.result(timeout=60) for f in futures]  # the node resends what was unconfirmed
    assert len(set(ids)) == total
    with Node("receiver", relay=endpoint, timeout=30) as receiver:
        messages = drain(receiver.consume("big", prefetch=100), total)
    for m in messages:
        assert m.body == big_body(int(m.headers["n"])), "a body came back different"
    seen = [m.id for m in messages]
    assert len(seen) == len(set(seen)), "a message reached application code twice"
    assert set(seen) == set(ids)
    assert confirmed_before_kill <= set(seen)
    # All acked: the first life's segment is deleted, the one being written stays.
    if ON_SQLITE:
            wait_for(lambda: len([f for f in os.listdir(os.path.join(data_dir, "segments")) if f.endswith(".seg")]) == 1,
                 15, what="segments reclaimed")


def test_relay_kill9_keeps_committed_messages_and_redelivers_unacked(relay_factory):
    relay = relay_factory()
    with Node("n", relay=relay.endpoint, heartbeat=0.2, timeout=30) as node:
        node.send_many([("durable", i) for i in range(100)])
        consumer = node.consume("durable", prefetch=10)
        held = [consumer.get(timeout=10) for _ in range(10)]  # delivered, not acked
        assert [m.body for m in held] == list(range(10))
        relay.kill()
        relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
        # The node reconnects and re-subscribes; the dedup window hides the
        # 10 it already handed out, which are acked now.
        for m in held:
            m.ack()
        rest = []
        while len(rest) < 90:
            m = consumer.get(timeout=15)
            assert m is not None, f"only {len(rest)} of 90 after restart"
            rest.append(m)
            m.ack()
        assert [m.body for m in rest] == list(range(10, 100))
        assert all(m.redelivered for m in rest)  # stored before the restart: maybe delivered
        wait_for(lambda: node.status()["mailboxes"][0]["depth"] == 0, 15, what="all acked")


CONSUMER = """
import sys, json
from murano_zmq import Node
node = Node("doomed", relay=sys.argv[1], heartbeat=0.2, direct=False)  # the relay's redelivery is the point
c = node.consume("shared", prefetch=5)
while True:
    m = c.get(timeout=30)
    print(json.dumps(m.body), flush=True)   # never acks
"""


def test_consumer_killed_with_unacked_messages_go_to_the_other(relay, children):
    doomed = children(CONSUMER, relay.endpoint, stdout=subprocess.PIPE, text=True)
    with Node("sender", relay=relay.endpoint) as sender:
        wait_for(lambda: sender.status()["mailboxes"] and sender.status()["mailboxes"][0]["consumers"] == 1,
                 20, what="doomed consumer")
        sender.send_many([("shared", i) for i in range(5)])
        held = [json.loads(doomed.stdout.readline()) for _ in range(5)]
        assert sorted(held) == list(range(5))
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        with Node("survivor", relay=relay.endpoint) as survivor:
            consumer = survivor.consume("shared", prefetch=10)
            got = [consumer.get(timeout=15) for _ in range(5)]
            assert all(m is not None for m in got)
            assert sorted(m.body for m in got) == list(range(5))
            assert all(m.redelivered and m.delivery_count == 2 for m in got)
            for m in got:
                m.ack()


def test_node_survives_relay_restart_and_resubscribes(relay_factory, node_kind):
    relay = relay_factory()
    with node_kind("a", relay=relay.endpoint, heartbeat=0.2) as a, \
            node_kind("b", relay=relay.endpoint, heartbeat=0.2) as b:
        consumer = b.consume("inbox")
        a.send("inbox", "before")
        m = consumer.get(timeout=10)
        assert m.body == "before"
        m.ack()
        relay.stop()
        relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
        a.send("inbox", "after", timeout=30)
        m = consumer.get(timeout=15)
        assert m is not None and m.body == "after"
        m.ack()


def test_sigterm_shuts_down_cleanly(relay_factory, tmp_path):
    relay = relay_factory()
    with Node("n", relay=relay.endpoint, heartbeat=0.2) as node:
        node.send("kept", "across a clean restart")
        consumer = node.consume("other")
        t0 = time.monotonic()
        assert relay.stop() == 0
        assert time.monotonic() - t0 < 5
    log = (tmp_path / "relay-0.log").read_text()
    assert "relay stopped" in log
    assert "Traceback" not in log
    again = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
    with Node("n2", relay=again.endpoint) as node:
        m = node.consume("kept").get(timeout=10)
        assert m.body == "across a clean restart"
        m.ack()
    del consumer


def test_a_started_relay_process_entered_as_a_context_runs_once(tmp_path):
    """`with RelayProcess(...).start() as relay` starts one relay: entering a
    started one leaves it as it is (it started a second, which ran on after
    the block, unstopped); the block's end stops it.  A stopped one starts
    again (a restart)."""
    from murano_zmq.testing import RelayProcess
    from ..helpers import free_tcp_endpoint

    relay = RelayProcess(free_tcp_endpoint(), str(tmp_path / "data")).start()
    first = relay.proc
    try:
        with relay:
            assert relay.proc is first and first.poll() is None
        assert first.poll() is not None  # stopped, and waited for
        relay.start()
        assert relay.proc is not first and relay_answers(relay.endpoint, 10)
    finally:
        relay.kill()
        if first.poll() is None:
            first.kill()
            first.wait(10)


def test_relay_with_nothing_listening_gives_relay_unavailable(node_kind):
    from murano_zmq import RelayUnavailable
    from ..helpers import free_tcp_endpoint

    endpoint = free_tcp_endpoint()
    assert not relay_answers(endpoint, 0.3)
    with node_kind("lonely", relay=endpoint, timeout=0.5) as node:
        try:
            node.status()
        except RelayUnavailable as exc:
            assert endpoint in str(exc)
        else:
            raise AssertionError("status() without a relay must raise RelayUnavailable")


def test_sends_without_a_relay_time_out_at_their_timeout(node_kind):
    """AsyncNode's send() and send_many() waited for ever while no relay
    answered: their timer's callback raised TypeError on the event loop
    (a parameter added to one side only), the default 30 s included."""
    from murano_zmq import RelayUnavailable
    from ..helpers import free_tcp_endpoint

    endpoint = free_tcp_endpoint()
    with node_kind("lonely", relay=endpoint, timeout=30, direct=False) as node:
        for call in (lambda: node.send("q", "x", timeout=0.5), lambda: node.send_many([("q", "x")], timeout=0.5)):
            started = time.monotonic()
            with pytest.raises(RelayUnavailable, match=f"no answer from relay {endpoint}.* within 0.5s"):
                call()
            assert time.monotonic() - started < 10, "the send outlived its timeout"


def test_device_entry_point_runs_the_relay(tmp_path):
    from ..helpers import free_tcp_endpoint

    endpoint = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "devices.relay", "--bind", endpoint,
                             "--data-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        assert relay_answers(endpoint, 15)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_an_ack_from_before_a_relay_lost_its_store_settles_nothing_new(relay_factory, node_kind, tmp_path):
    """A relay started on another store (a new data directory here; the next
    relay of a node's list alike) numbers deliveries from the same first
    tag.  The application's late ack of a message from the old relay went
    to the new one with that tag and deleted a different, confirmed
    message, never delivered to anyone but this consumer.  Now a tag is
    acked only on the connection that delivered it."""
    relay = relay_factory(data_dir=str(tmp_path / "first"))
    with node_kind("consumer", relay=relay.endpoint, timeout=20, direct=False) as consumer_node, \
            node_kind("producer", relay=relay.endpoint, timeout=20, direct=False) as producer:
        consumer = consumer_node.consume("q", prefetch=10)
        producer.send("q", "old")
        old = consumer.get(timeout=10)
        relay.kill()
        relay = relay_factory(endpoint=relay.endpoint, data_dir=str(tmp_path / "second"))  # the store is gone
        producer.send("q", "new")
        new = consumer.get(timeout=20)
        assert new.body == "new" and new.tag == old.tag  # (the same number, another message)
        old.ack()
        consumer_node.status()  # (the ack, had it gone, is at the relay before this reply)
        [q] = [m for m in producer.status()["mailboxes"] if m["name"] == "q"]
        assert (q["depth"], q["unacked"]) == (1, 1), "an ack of another store's message settled this one"
        new.ack()
        wait_for(lambda: [m["depth"] for m in producer.status()["mailboxes"] if m["name"] == "q"] == [0], 10,
                 what="the new message acked")


@pytest.mark.parametrize("copy_first", [False, True], ids=["rejected-then-copy", "copy-then-rejected"])
def test_a_message_rejected_around_a_relay_restart_is_dead_lettered(relay_factory, node_kind, copy_first):
    """The dedup window remembered a reject as settled, like an ack: the copy
    the restarted relay delivered again (before or after the application's
    nack) was acked, and the dead letter was lost."""
    relay = relay_factory()
    with node_kind("worker", relay=relay.endpoint, heartbeat=0.2, timeout=20, direct=False) as node:
        node.declare("q", dead_letter="dlq")
        node.send("q", "poison")
        msg = node.consume("q", prefetch=10).get(timeout=10)
        relay.kill()
        if not copy_first:
            msg.nack(requeue=False)  # (its NACK dies with the session)
        relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)

        def depths() -> dict:
            return {m["name"]: (m["depth"], m["unacked"]) for m in node.status()["mailboxes"]}

        if copy_first:
            wait_for(lambda: depths().get("q") == (1, 1), 20, what="the copy delivered again, kept aside")
            msg.nack(requeue=False)
        wait_for(lambda: depths().get("q") == (0, 0) and depths().get("dlq") == (1, 0), 20,
                 what="the rejected message in the dead-letter mailbox")
        dead = node.consume("dlq").get(timeout=10)
        assert dead.body == "poison"
        dead.ack()


def test_a_ttl_counts_from_the_send_not_from_when_a_relay_came(relay_factory, node_kind):
    """A relay counts a ttl from its receipt, and a node held its sends
    while no relay answered: a message sent with ttl=1 during an outage
    was stored with a full second to live when the relay came back, later
    (an oslo call that had timed out, run by a server afterwards).  Now the
    wait is taken off, and a message whose ttl passed is not sent."""
    from murano_zmq import RelayUnavailable
    from ..helpers import free_tcp_endpoint

    endpoint = free_tcp_endpoint()
    with node_kind("sender", relay=endpoint, timeout=30, direct=False) as node:
        short = node.send_async("q", "short", ttl=1.0)
        long = node.send_async("q", "long", ttl=30.0)
        time.sleep(1.5)  # (the outage: longer than the short ttl)
        relay_factory(endpoint=endpoint)
        with pytest.raises(RelayUnavailable, match="its ttl passed while no relay took it"):
            short.result(timeout=20)
        long.result(timeout=20)
        consumer = node.consume("q", prefetch=10)
        got = consumer.get(timeout=10)
        assert got.body == "long"
        assert got.expires_at - got.created_at < 30.5, "the ttl was counted from the relay's receipt (1.5 s later)"
        got.ack()
        assert consumer.get(timeout=0.5) is None


def test_a_node_moves_on_from_a_relay_that_refuses_it_before_the_liveness(relay_factory, node_kind):
    """relay=[dead, alive]: the connection to the first is refused at once,
    but the node waited five silent heartbeats (5 s) before the next."""
    from ..helpers import free_tcp_endpoint

    alive = relay_factory()
    with node_kind("sender", relay=[free_tcp_endpoint(), alive.endpoint], timeout=30, direct=False) as node:
        assert node.send("q", "x", timeout=4.0)  # (the second relay within 2 heartbeats, not 5)
