"""Zeroconf discovery on loopback (pinned to 127.0.0.1): relays and peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from murano_zmq import Node
from murano_zmq.discovery import Advert, Discovery

from ..helpers import free_tcp_endpoint, wait_for


def test_relay_auto_finds_an_advertised_relay(relay_factory, make_node):
    relay = relay_factory("--discovery-interfaces", "127.0.0.1")
    node = make_node("finder", relay="auto", discovery="127.0.0.1")
    assert node.relay == relay.endpoint
    node.send("found", "by zeroconf")
    assert node.status()["mailboxes"][0]["depth"] == 1


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
        out = subprocess.run([sys.executable, "-m", "murano_zmq", "peers", "--json", "--wait", "2",
                              "--discovery-interfaces", "127.0.0.1"], capture_output=True, text=True,
                             timeout=60, env=os.environ)
    finally:
        extra.close()
    assert out.returncode == 0, out.stderr
    seen = {d["name"]: d for d in map(json.loads, out.stdout.splitlines())}
    assert seen["relay-under-test"]["role"] == "relay"
    assert seen["node-x"]["mailboxes"] == ["a.b"]


def test_bad_interfaces_are_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="not an IPv4 address"):
        Discovery("eth0")
