"""Online traffic with the relay down from a cold start (issue 14, part 1):
adverts name the mailboxes a node consumes directly; a sender that cannot
reach the relay sends straight to a live direct consumer it knows of (from
adverts or an earlier LOOKUP); the direct path is taken as soon as the relay
says the mailbox is drained.  The relay is killed with SIGKILL."""

from __future__ import annotations

import subprocess
import threading

import pytest

from ..helpers import wait_for
from .test_direct import counters

CONSUMER = """
import sys
from murano_zmq import Node
with Node("direct-consumer", relay=sys.argv[1], discovery="127.0.0.1") as node:
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


# Default nodes (default heartbeat), as the issue tried them.  "noticed": the
# sender sends once it has seen the relay go; "at once": right after the
# kill, while its session still looks up (its LOOKUP then goes nowhere).
WHEN = pytest.mark.parametrize("noticed", [True, False], ids=["noticed", "at-once"])


def kill_relay(relay, sender, noticed: bool) -> None:
    relay.kill()
    if noticed:
        wait_for(lambda: relay_down(sender), 15, what="the sender to notice")


@WHEN
def test_cold_start_sender_reaches_a_direct_consumer_with_the_relay_killed(relay, children, make_node, noticed):
    consumer = start_consumer(children, relay)
    sender = make_node("sender", discovery="127.0.0.1", timeout=20)
    wait_for(lambda: advertises(sender, "direct-consumer", "direct.box"), 20, what="the consumer's advert")
    kill_relay(relay, sender, noticed)  # the sender never sent anything through it
    sender.send("direct.box", "cold", timeout=15)
    assert consumer.stdout.readline().strip() == "cold"


def test_a_sender_started_after_the_kill_reaches_a_direct_consumer(relay, children, make_node):
    consumer = start_consumer(children, relay)
    relay.kill()
    sender = make_node("sender", discovery="127.0.0.1", timeout=20)  # never had a relay session
    wait_for(lambda: advertises(sender, "direct-consumer", "direct.box"), 20, what="the consumer's advert")
    sender.send("direct.box", "late", timeout=15)
    assert consumer.stdout.readline().strip() == "late"


@WHEN
@pytest.mark.parametrize("discovery", ["127.0.0.1", False], ids=["adverts", "lookup-only"])
def test_after_one_send_the_next_goes_direct_with_the_relay_killed(relay, children, make_node, noticed,
                                                                    discovery):
    """lookup-only: the sender browses no adverts; what the relay's LOOKUP
    told it before the kill is all it has."""
    consumer = start_consumer(children, relay)
    sender = make_node("sender", discovery=discovery, timeout=20)
    sender.send("direct.box", "first", timeout=15)
    assert consumer.stdout.readline().strip() == "first"
    kill_relay(relay, sender, noticed)
    sender.send("direct.box", "second", timeout=15)
    sender.send("direct.box", "third", wait=False, timeout=15)
    assert [consumer.stdout.readline().strip() for _ in range(2)] == ["second", "third"]


def depth(node, mailbox: str) -> int:
    return sum(mb["depth"] for mb in node.status()["mailboxes"] if mb["name"] == mailbox)


def test_the_send_after_the_relay_drained_goes_direct_then_survives_a_kill(relay, children, make_node):
    """Messages a sender gave the relay while nobody consumed: once the
    relay has handed them all out and had them acked, the very next send
    goes direct (no warm-up), and the stream goes on with the relay killed."""
    sender = make_node("sender", discovery="127.0.0.1", timeout=20)
    sender.send_many([("direct.box", f"stored-{i}") for i in range(3)])
    consumer = start_consumer(children, relay)
    assert [consumer.stdout.readline().strip() for _ in range(3)] == [f"stored-{i}" for i in range(3)]
    wait_for(lambda: depth(sender, "direct.box") == 0, 10, what="the relay to drain")
    received = counters(sender)["received"]
    sender.send("direct.box", "next")
    assert consumer.stdout.readline().strip() == "next"
    assert counters(sender)["received"] == received, "the send after the drain went direct"
    relay.kill()
    sender.send("direct.box", "killed", timeout=15)
    assert consumer.stdout.readline().strip() == "killed"


SERVICE = """
import sys
from murano_zmq import Node
with Node("svc", relay=sys.argv[1], discovery="127.0.0.1") as node:
    box = node.consume("svc.box")
    relay_only = node.consume("svc.slow", direct=False)
    print("consuming", flush=True)
    sys.stdin.readline()
    box.cancel()
    print("cancelled", flush=True)
    sys.stdin.readline()
    box = node.consume("svc.box")
    print("consuming", flush=True)
    sys.stdin.readline()
"""


def test_advert_lists_the_mailboxes_consumed_directly(relay, children, make_node):
    """The advert of a consumer in another process follows its consumers,
    before and after the relay is killed."""
    svc = children(SERVICE, relay.endpoint, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    observer = make_node("observer", discovery="127.0.0.1")
    assert svc.stdout.readline().strip() == "consuming"
    wait_for(lambda: advertises(observer, "svc", "svc.box"), 20, what="svc.box in the advert")
    assert not advertises(observer, "svc", "svc.slow"), "a relay-only consumer is not advertised"
    relay.kill()  # adverts do not go through the relay
    svc.stdin.write("cancel\n")
    svc.stdin.flush()
    assert svc.stdout.readline().strip() == "cancelled"
    wait_for(lambda: not advertises(observer, "svc", "svc.box"), 20, what="svc.box out of the advert")
    relay.start()  # (same endpoint and data): consuming again needs the relay
    svc.stdin.write("consume\n")
    svc.stdin.flush()
    assert svc.stdout.readline().strip() == "consuming"
    wait_for(lambda: advertises(observer, "svc", "svc.box"), 20, what="svc.box back in the advert")
    svc.stdin.write("stop\n")
    svc.stdin.flush()
    assert svc.wait(20) == 0


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
