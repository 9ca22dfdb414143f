"""Online traffic with the relay down from a cold start (issue 14, part 1):
adverts name the mailboxes a node consumes directly; a sender that cannot
reach the relay sends straight to a live direct consumer it knows of (from
adverts or an earlier LOOKUP); the direct path is taken as soon as the relay
says the mailbox is drained.  The relay is killed with SIGKILL."""

from __future__ import annotations

import subprocess
import threading

from ..helpers import wait_for
from .test_direct import counters

CONSUMER = """
import sys
from murano_zmq import Node
with Node("direct-consumer", relay=sys.argv[1], discovery="127.0.0.1", heartbeat=0.2) as node:
    box = node.consume("direct.box")
    print("ready", flush=True)
    while True:
        m = box.get(timeout=60)
        if m is None:
            break
        print(m.body, flush=True)
        m.ack()
"""


def start_consumer(children, relay):
    consumer = children(CONSUMER, relay.endpoint, stdout=subprocess.PIPE, text=True)
    assert consumer.stdout.readline().strip() == "ready"
    return consumer


def advertises(node, name: str, mailbox: str) -> bool:
    return any(a.name == name and mailbox in a.mailboxes for a in node.peers.values())


def relay_down(node) -> bool:
    return node._core.state.value != "ready"


def test_cold_start_sender_reaches_a_direct_consumer_with_the_relay_killed(relay, children, make_node):
    consumer = start_consumer(children, relay)
    sender = make_node("sender", discovery="127.0.0.1", heartbeat=0.2, timeout=20)
    wait_for(lambda: advertises(sender, "direct-consumer", "direct.box"), 20, what="the consumer's advert")
    relay.kill()  # the sender never sent anything through it
    wait_for(lambda: relay_down(sender), 10, what="the sender to notice")
    sender.send("direct.box", "cold", timeout=15)
    assert consumer.stdout.readline().strip() == "cold"


def test_after_one_send_the_next_goes_direct_with_the_relay_killed(relay, children, make_node):
    consumer = start_consumer(children, relay)
    sender = make_node("sender", discovery="127.0.0.1", heartbeat=0.2, timeout=20)
    sender.send("direct.box", "first", timeout=15)
    assert consumer.stdout.readline().strip() == "first"
    relay.kill()
    wait_for(lambda: relay_down(sender), 10, what="the sender to notice")
    sender.send("direct.box", "second", timeout=15)
    sender.send("direct.box", "third", wait=False, timeout=15)
    assert [consumer.stdout.readline().strip() for _ in range(2)] == ["second", "third"]


def test_advert_lists_the_mailboxes_consumed_directly(make_node):
    observer = make_node("observer", discovery="127.0.0.1")
    svc = make_node("svc", discovery="127.0.0.1")
    box = svc.consume("svc.box")
    relay_only = svc.consume("svc.slow", direct=False)
    wait_for(lambda: advertises(observer, "svc", "svc.box"), 20, what="svc.box in the advert")
    assert not advertises(observer, "svc", "svc.slow"), "a relay-only consumer is not advertised"
    box.cancel()
    wait_for(lambda: not advertises(observer, "svc", "svc.box"), 20, what="svc.box out of the advert")
    relay_only.cancel()


def test_the_first_send_goes_direct_when_the_relay_has_nothing(make_node):
    svc, client = make_node("svc"), make_node("client")
    box = svc.consume("fresh.box")
    got: list = []

    def read() -> None:
        m = box.get(timeout=20)
        if m is not None:
            got.append(m.body)
            m.ack()

    reader = threading.Thread(target=read)
    reader.start()
    client.send("fresh.box", "at once")
    reader.join(20)
    assert got == ["at once"]
    assert counters(client)["received"] == 0, "no warm-up through the relay"
