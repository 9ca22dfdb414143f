"""Zeroconf discovery on loopback (pinned to 127.0.0.1): relays and peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from murano_zmq import Node
from murano_zmq.discovery import Advert, Discovery

from ..helpers import free_tcp_endpoint, kill_mid_stream, wait_for


def _unique_name() -> str:
    """A relay name no other run on this machine advertises: suites of other
    runs advertise relays on 127.0.0.1 too (named "relay" by default), and
    relay="auto" would take those as well."""
    return f"t-{uuid.uuid4().hex[:10]}"


def test_relay_auto_finds_an_advertised_relay(relay_factory, make_node):
    name = _unique_name()
    relay = relay_factory("--discovery-interfaces", "127.0.0.1", "--name", name)
    node = make_node("finder", relay=f"auto:{name}", discovery="127.0.0.1")
    assert node.relays == [relay.endpoint]
    # (found, then taken: the node connects once it has found it)
    wait_for(lambda: node.relay_endpoint is not None, 15, what="the relay in use")
    assert node.relay_endpoint == relay.endpoint
    node.send("found", "by zeroconf")
    assert node.status()["mailboxes"][0]["depth"] == 1


def test_relay_auto_takes_every_advertised_relay_and_later_ones(relay_factory, make_node, tmp_path):
    """Relays of one name (the default is "relay") are all seen, and one
    advertised after the node started joins its list, in sorted order."""
    name = _unique_name()
    first = [relay_factory("--discovery-interfaces", "127.0.0.1", "--name", name,
                           data_dir=str(tmp_path / f"r{i}")) for i in range(2)]
    node = make_node("finder", relay=f"auto:{name}", discovery=False)
    wait_for(lambda: len(node.relays) == 2, 15, what="both relays")
    assert node.relays == sorted(r.endpoint for r in first)
    late = relay_factory("--discovery-interfaces", "127.0.0.1", "--name", name, data_dir=str(tmp_path / "late"))
    wait_for(lambda: late.endpoint in node.relays, 15, what="the relay advertised later")
    assert node.relays == sorted(r.endpoint for r in [*first, late])
    assert node.relay_endpoint in node.relays
    # Plain "auto" takes every relay, whatever its name (here maybe others'
    # too: every run on this machine advertises on 127.0.0.1).
    everyone = make_node("everyone", relay="auto", discovery=False)
    wait_for(lambda: {r.endpoint for r in [*first, late]} <= set(everyone.relays), 15, what="every relay")
    everyone.consume("not.advertised")  # a consumer makes a discovering node re-advertise
    assert not any(a.role == "node" and a.name in ("finder", "everyone") for a in everyone.peers.values()), \
        "relay='auto' with discovery=False browses for relays only; the node advertises nothing"


def test_relay_auto_leaves_out_adverts_it_cannot_use_and_says_when_none_is_found(relay_factory, make_node):
    import pytest

    from murano_zmq import RelayUnavailable

    name = _unique_name()
    liar = Discovery("127.0.0.1")
    try:
        liar.advertise(Advert(name, "relay", "garbage"))  # a claim ZeroMQ cannot connect to
        assert liar.wait_for(lambda peers: any(a.endpoint == "garbage" for a in peers.values()), 15)
        with pytest.raises(RelayUnavailable, match=f"no relay named '{name}' advertised on 127.0.0.1"):
            make_node("finder", relay=f"auto:{name}", timeout=2)
        relay = relay_factory("--discovery-interfaces", "127.0.0.1", "--name", name)
        node = make_node("finder", relay=f"auto:{name}")
        assert node.relays == [relay.endpoint]
        node.send("found", "past the bad advert")
    finally:
        liar.close()


def test_relay_auto_moves_to_another_relay_when_its_relay_dies(relay_factory, make_node, tmp_path):
    """Two advertised relays with separate data: kill -9 the one the node
    uses mid-stream; the node's session moves to the other, what was
    unconfirmed is resent there, and its consumer is attached there."""
    name = _unique_name()
    relays = {r.endpoint: r for r in (relay_factory("--discovery-interfaces", "127.0.0.1", "--name", name,
                                                    data_dir=str(tmp_path / f"r{i}")) for i in range(2))}
    node = make_node("mover", relay=f"auto:{name}", heartbeat=0.2, timeout=60)
    # (both found, and one of them taken: the node connects once it has found one)
    wait_for(lambda: len(node.relays) == 2 and node.relay_endpoint is not None, 15, what="both relays, one in use")
    used = relays[node.relay_endpoint]
    other = next(r for e, r in relays.items() if e != used.endpoint)
    consumer = node.consume("work", prefetch=100, direct=False)
    total = 2000
    futures = [node.send_async("jobs", {"n": i}) for i in range(total // 2)]
    confirmed_before = kill_mid_stream(used, lambda i: node.send_async("jobs", {"n": total // 2 + i}),
                                       futures, total // 2, 100)
    killed = time.monotonic()
    wait_for(lambda: sum(f.done() for f in futures) > len(confirmed_before), 30, interval=0.005,
             what="a confirm from the other relay")
    took = time.monotonic() - killed
    ids = [f.result(timeout=60) for f in futures]
    assert node.relay_endpoint == other.endpoint
    print(f"served by the other relay {took:.2f}s after the kill")
    assert took < 5, f"the other relay served {took:.1f}s after the kill"
    assert len(set(ids)) == total
    # Every message is on one relay or the other (the dead one restarted on
    # its data): what the dead one confirmed there, the rest resent to the
    # other.  One it stored but did not confirm in time may be on both.
    # (Which relay confirmed what is not known from here: while the relay
    # is frozen, 5 silent heartbeats already move the node to the other.)
    used = relay_factory(endpoint=used.endpoint, data_dir=used.data_dir)  # not advertised
    with Node("reader-a", relay=used.endpoint, timeout=30) as reader_a, \
            Node("reader-b", relay=other.endpoint, timeout=30) as reader_b:
        takers = {"a": reader_a.consume("jobs", prefetch=500), "b": reader_b.consume("jobs", prefetch=500)}
        seen: dict[str, list] = {"a": [], "b": []}
        deadline = time.monotonic() + 60
        while set(seen["a"]) | set(seen["b"]) != set(ids) and time.monotonic() < deadline:
            for where, taker in takers.items():  # what each has now, then the other
                while (m := taker.get(timeout=0.05)) is not None:
                    seen[where].append(m.id)
                    m.ack()
        for where, taker in takers.items():  # anything more is an extra
            while (m := taker.get(timeout=0.5)) is not None:
                seen[where].append(m.id)
                m.ack()
        assert set(seen["a"]) | set(seen["b"]) == set(ids), "a confirmed message was lost"
        for where in seen:
            assert len(seen[where]) == len(set(seen[where])), f"relay {where} handed a message out twice"
        reader_b.send("work", "after the move")  # the node's consumer is attached there now
    m = consumer.get(timeout=15)
    assert m is not None and m.body == "after the move"
    m.ack()


def test_a_peer_consumer_is_learned_by_discovery_and_dropped_when_gone(make_node):
    producer = make_node("producer", discovery="127.0.0.1")
    svc = make_node("svc", discovery="127.0.0.1")
    svc.consume("svc.inbox")
    wait_for(lambda: any(a.name == "svc" and "svc.inbox" in a.mailboxes
                         for a in producer.peers.values()), 15, what="svc advert")
    svc.close()
    wait_for(lambda: not any(a.name == "svc" for a in producer.peers.values()), 15,
             what="svc to go away")


def test_peers_command_lists_what_discovery_sees(relay_factory):
    relay_factory("--discovery-interfaces", "127.0.0.1", "--name", "relay-under-test")
    extra = Discovery("127.0.0.1")
    try:
        extra.advertise(Advert("node-x", "node", free_tcp_endpoint(), mailboxes=("a.b",)))
        out = subprocess.run([sys.executable, "-m", "murano_zmq", "peers", "--json", "--wait", "30",
                              "--expect", "relay-under-test", "--expect", "node-x",
                              "--discovery-interfaces", "127.0.0.1"], capture_output=True, text=True,
                             timeout=60, env=os.environ)
    finally:
        extra.close()
    assert out.returncode == 0, out.stderr
    seen = {d["name"]: d for d in map(json.loads, out.stdout.splitlines())}
    assert seen["relay-under-test"]["role"] == "relay"
    assert seen["node-x"]["mailboxes"] == ["a.b"]


def test_an_advert_s_control_characters_never_reach_the_terminal():
    """Names, endpoints and mailboxes in adverts are a peer's text: `peers`
    shows their control characters (an escape sequence) as '?'."""
    name = _unique_name()
    liar = Discovery("127.0.0.1")
    try:
        liar.advertise(Advert(name, "node", "tcp://127.0.0.1:1", pub="\x00\x01",
                              mailboxes=("a\x1bb",)))
        out = subprocess.run([sys.executable, "-m", "murano_zmq", "peers", "--wait", "30", "--expect", name,
                              "--discovery-interfaces", "127.0.0.1"], capture_output=True, text=True,
                             timeout=60, env=os.environ)
    finally:
        liar.close()
    assert out.returncode == 0, out.stderr
    [line] = [line for line in out.stdout.splitlines() if name in line]
    assert "pub=??" in line and "mailboxes=a?b" in line
    assert not any(ord(c) < 32 for c in out.stdout.replace("\n", ""))


def test_peers_expect_fails_for_a_name_never_seen():
    out = subprocess.run([sys.executable, "-m", "murano_zmq", "peers", "--wait", "0.5", "--expect", "nobody-here",
                          "--discovery-interfaces", "127.0.0.1"], capture_output=True, text=True,
                         timeout=60, env=os.environ)
    assert out.returncode == 1 and "not seen within 0.5s: nobody-here" in out.stderr


def test_bad_interfaces_are_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="not an IPv4 address"):
        Discovery("eth0")


def test_cli_relay_auto_takes_an_advertised_relay(relay_factory):
    name = _unique_name()
    relay = relay_factory("--discovery-interfaces", "127.0.0.1", "--name", name)
    out = subprocess.run([sys.executable, "-m", "murano_zmq", "send", "by.cli", "hello", "--relay", f"auto:{name}"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MURANO_ZMQ_DISCOVERY_INTERFACES": "127.0.0.1"})
    assert out.returncode == 0, out.stderr
    with Node("checker", relay=relay.endpoint, timeout=15) as node:
        assert {m["name"]: m["depth"] for m in node.status()["mailboxes"]}["by.cli"] == 1


def test_a_publisher_advert_no_socket_can_connect_to_costs_a_subscriber_nothing(relay, make_node, caplog):
    """An advert is a claim: one whose PUB endpoint ZeroMQ refuses is logged
    and skipped, and the subscribing node goes on (its I/O thread died)."""
    import logging

    liar = Discovery("127.0.0.1")
    try:
        node = make_node("subscriber", relay=relay.endpoint, discovery="127.0.0.1")
        events = node.subscribe("progress.")
        with caplog.at_level(logging.WARNING, logger="murano_zmq.node"):
            liar.advertise(Advert(_unique_name(), "node", pub="bogus://x"))
            wait_for(lambda: "cannot subscribe to publisher 'bogus://x'" in caplog.text, 15,
                     what="the advert refused")
        node.send("still.up", "after the advert")

        def own_event_heard():  # (a PUB's first events may go before its subscribers join)
            node.publish("progress.x", "own event")
            return events.get(timeout=0.2)

        assert wait_for(own_event_heard, 15, what="its own event").body == "own event"
        import pytest

        with pytest.raises(ValueError, match="not a ZeroMQ endpoint"):  # the caller's own: an error
            node.subscribe("other.", publishers=["bogus://x"])
    finally:
        liar.close()
