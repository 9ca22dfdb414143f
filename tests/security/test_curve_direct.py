"""Direct (peer-to-peer) links with CURVE: keyed nodes deliver directly when
the receiver authorizes the sender's key; otherwise, or when the receiver's
permissions refuse, their messages take the relay (whose permissions then
decide); discovery's keys are used only when pinned by the node's trusted keys."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest
import zmq

from murano_zmq import Node, PermissionDenied
from murano_zmq.discovery.zeroconf import Advert, Discovery

from ..helpers import free_tcp_endpoint, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nodes(node_kind):
    """Keyed nodes of either runner (Node, or AsyncNode through its facade)."""
    made = []

    def make(name: str, relay, keys, key: str, **kw):
        kw.setdefault("timeout", 10)
        node = node_kind(name, relay=relay.endpoint, **keys.node_kw(key), **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def counters(ops: Node) -> dict:
    return ops.status()["counters"]


def depth(ops: Node, mailbox: str) -> int | None:
    for mb in ops.status()["mailboxes"]:
        if mb["name"] == mailbox:
            return mb["depth"]
    return None


def read_in_background(consumer, n: int) -> tuple[list, threading.Thread]:
    """Bodies of the next `n` messages, acked as they come (a direct send
    returns only once the consumer's application acked it).  The reader
    gives up after 20 s without a message, or once `reader.stop` is set (a
    test that reads fewer than `n`: no thread left waiting on a closed node)."""
    got: list = []
    stop = threading.Event()

    def run():
        idle_since = time.monotonic()
        while len(got) < n and not stop.is_set():
            m = consumer.get(timeout=0.2)
            if m is None:
                if time.monotonic() - idle_since > 20:
                    return
                continue
            idle_since = time.monotonic()
            got.append(m.body)
            m.ack()

    thread = threading.Thread(target=run, daemon=True)
    thread.stop = stop
    thread.start()
    return got, thread


def key_dir(tmp_path, keys, *names: str):
    """An authorized/trusted keys directory holding only `names`."""
    directory = tmp_path / ("keys-" + "-".join(names or ("none",)))
    directory.mkdir()
    for name in names:
        shutil.copy(keys.dir / f"{name}.key", directory / f"{name}.key")
    return directory


def test_keyed_nodes_exchange_messages_directly(secure_relay, keys, nodes):
    conductor = nodes("conductor", secure_relay, keys, "conductor-1", authorized_keys=keys.authorized)
    agent = nodes("agent", secure_relay, keys, "agent-e1-u1")
    ops = nodes("ops", secure_relay, keys, "ops")
    assert conductor.endpoint.startswith("tcp://127.0.0.1:")
    assert agent.endpoint is None  # keys but no authorized keys: it sends directly, binds no ROUTER
    got, reader = read_in_background(conductor.consume("conductor.results"), 1000)
    # The first sends take the relay until the agent learned the consumer's
    # endpoint and key from LOOKUP and saw the relay drained; then direct
    # (on a loaded machine that may take more than a few sends).
    sent = 0
    while sent < 200 or (sent < 900 and not agent._core.paths.is_direct("conductor.results")):
        agent.send("conductor.results", sent)
        sent += 1
    before = counters(ops)
    for i in range(sent, 1000):
        agent.send("conductor.results", i)
    reader.join(30)
    after = counters(ops)
    assert got == list(range(1000))
    assert after["received"] == before["received"], "direct sends must not touch the relay"
    assert after["delivered"] == before["delivered"]


def test_a_sender_the_receiver_does_not_authorize_goes_through_the_relay(secure_relay, keys, nodes,
                                                                          tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="murano_zmq")
    only_u2 = key_dir(tmp_path, keys, "agent-e1-u2")  # the conductor admits agent-e1-u2, not u1
    conductor = nodes("conductor", secure_relay, keys, "conductor-1", authorized_keys=only_u2)
    agent = nodes("agent", secure_relay, keys, "agent-e1-u1")
    ops = nodes("ops", secure_relay, keys, "ops")
    got, reader = read_in_background(conductor.consume("conductor.results"), 300)
    before = counters(ops)
    for i in range(300):
        agent.send("conductor.results", i)
    reader.join(30)
    assert got == list(range(300)), "all delivered, in order, once"
    assert counters(ops)["received"] - before["received"] == 300, "every message took the relay"
    # It did try the direct path (the relay names the consumer with its key),
    # and the conductor's ZAP handler refused the agent's key in the handshake.
    wait_for(lambda: "the peer refused this node's key" in caplog.text, 10, what="the refused handshake")
    assert f"refused a CURVE client: key {keys.public('agent-e1-u1').decode()}" in caplog.text


def test_the_receivers_permissions_send_refused_messages_through_the_relay(secure_relay, keys, nodes,
                                                                          tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="murano_zmq")
    # The relay lets agents send to conductor.results; this conductor's own
    # permissions file does not, so it refuses them on its direct ROUTER
    # (403 in CONFIRM) and the agent hands them to the relay.
    rules = tmp_path / "conductor-rules.toml"
    rules.write_text('[identity."agent-*-*"]\nsend = ["api.results"]\n')
    conductor = nodes("conductor", secure_relay, keys, "conductor-1", authorized_keys=keys.authorized,
                      permissions=rules)
    agent = nodes("agent", secure_relay, keys, "agent-e1-u1")
    ops = nodes("ops", secure_relay, keys, "ops")
    got, reader = read_in_background(conductor.consume("conductor.results"), 300)
    before = counters(ops)
    for i in range(300):
        agent.send("conductor.results", i)
    reader.join(30)
    assert got == list(range(300))
    assert counters(ops)["received"] - before["received"] == 300
    wait_for(lambda: "refused 1 direct message(s) from agent-e1-u1" in caplog.text, 10,
             what="the direct refusal")
    assert "peer refused (403 agent-e1-u1 may not send to 'conductor.results' (direct))" in caplog.text


def test_a_direct_send_the_relay_would_deny_fails_with_permission_denied(secure_relay, keys, nodes):
    # The agent learns by discovery (pinned: conductor-1's key is trusted)
    # that the conductor consumes "conductor" directly.  Agents may not send
    # there: the conductor refuses the direct SEND (403), the message goes to
    # the relay, and the relay's 403 reaches the caller.
    conductor = nodes("conductor", secure_relay, keys, "conductor-1", discovery="127.0.0.1",
                      authorized_keys=keys.authorized, permissions=keys.permissions)
    tasks = conductor.consume("conductor")
    agent = nodes("agent", secure_relay, keys, "agent-e1-u1", discovery="127.0.0.1",
                  trusted_keys=keys.authorized)
    wait_for(lambda: agent._core.paths.is_direct("conductor"), 20, what="the conductor's advert")
    with pytest.raises(PermissionDenied, match="may not send to 'conductor'"):
        agent.send("conductor", "a forged task")
    assert tasks.get(timeout=0.5) is None
    ops = nodes("ops", secure_relay, keys, "ops")
    assert not depth(ops, "conductor")


def test_adverts_are_used_only_with_a_trusted_key_that_may_consume(secure_relay, keys, nodes):
    ctx = zmq.Context.instance()
    traps = {}  # name -> (ROUTER, monitor of accepted connections)
    for name in ("stranger", "liar", "nokey"):
        sock = ctx.socket(zmq.ROUTER)
        monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED)
        sock.bind(free_tcp_endpoint())
        traps[name] = (sock, monitor)

    def endpoint(name):
        return traps[name][0].getsockopt_string(zmq.LAST_ENDPOINT)

    adverts = Discovery("127.0.0.1")
    try:
        # An unknown key, a trusted key claiming a mailbox it may not
        # consume (as well as its own), and no key at all.
        adverts.advertise(Advert("stranger", "node", endpoint("stranger"),
                                 mailboxes=("agent.e1.u1", "agent.e1.u3"), key=keys.public("stranger").decode()))
        adverts.advertise(Advert("liar", "node", endpoint("liar"), mailboxes=("agent.e1.u1", "agent.e1.u2"),
                                 key=keys.public("agent-e1-u2").decode()))
        adverts.advertise(Advert("nokey", "node", endpoint("nokey"), mailboxes=("agent.e1.u1", "agent.e1.u3")))
        # The conductor pins adverts to the authorized keys and checks what
        # they claim against the permissions; ops only pins (no permissions).
        conductor = nodes("conductor", secure_relay, keys, "conductor-1", discovery="127.0.0.1",
                          trusted_keys=keys.authorized, permissions=keys.permissions)
        ops = nodes("ops", secure_relay, keys, "ops", discovery="127.0.0.1", trusted_keys=keys.authorized)
        for node in (conductor, ops):
            wait_for(lambda: {"stranger", "liar", "nokey"} <= {a.name for a in node.peers.values()}, 20,
                     what="the adverts")
            wait_for(lambda: node._core.paths.is_direct("agent.e1.u2"), 10, what="the pinned advert taken")
            paths = node._core.paths
            assert paths.key_of(endpoint("liar")) == keys.public("agent-e1-u2")
            assert not paths.is_direct("agent.e1.u3"), "an untrusted key, or none, is never used"
            assert paths.key_of(endpoint("stranger")) is None and paths.key_of(endpoint("nokey")) is None
        assert not conductor._core.paths.is_direct("agent.e1.u1"), "agent-e1-u2 may not consume agent.e1.u1"
        assert ops._core.paths.is_direct("agent.e1.u1"), "without permissions a pinned key is believed"

        conductor.send("agent.e1.u1", {"plan": 1})  # stored by the relay, not given to a claimant
        assert depth(ops, "agent.e1.u1") == 1
        for name in ("stranger", "nokey"):
            assert not traps[name][1].poll(300), f"a node connected to {name}"
    finally:
        adverts.close()
        for sock, monitor in traps.values():
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)


def test_a_key_removed_from_the_receiver_stops_an_open_direct_link(secure_relay, keys, nodes, tmp_path,
                                                                  caplog):
    caplog.set_level(logging.INFO, logger="murano_zmq")
    allowed = key_dir(tmp_path, keys, "agent-e1-u1", "agent-e1-u2")
    conductor = nodes("conductor", secure_relay, keys, "conductor-1", authorized_keys=allowed)
    agent = nodes("agent", secure_relay, keys, "agent-e1-u1")
    ops = nodes("ops", secure_relay, keys, "ops")
    got, reader = read_in_background(conductor.consume("conductor.results"), 10_000)
    sent = 0

    def send_until(condition) -> bool:
        nonlocal sent
        agent.send("conductor.results", sent)
        sent += 1
        return condition()

    wait_for(lambda: send_until(lambda: agent._core.paths.is_direct("conductor.results")), 20,
             interval=0, what="the direct path")
    before = counters(ops)["received"]
    (allowed / "agent-e1-u1.key").unlink()  # the conductor reloads its directory within about 1 s
    wait_for(lambda: send_until(lambda: counters(ops)["received"] > before), 20, interval=0.01,
             what="sends through the relay again")
    wait_for(lambda: len(got) == sent, 20, what="every message delivered")
    reader.stop.set()
    reader.join(5)
    assert got == list(range(sent))
    wait_for(lambda: "is not authorized here" in caplog.text, 10, what="the refusal on the open link")


def test_keyed_node_arguments(keys, secure_relay, node_kind):
    with pytest.raises(ValueError, match="need CURVE keys"):
        node_kind("n", relay=secure_relay.endpoint, authorized_keys=keys.authorized)
    with pytest.raises(ValueError, match="forwarder_key"):
        node_kind("n", relay=secure_relay.endpoint, forwarder=(free_tcp_endpoint(), free_tcp_endpoint()),
                  **keys.node_kw("ops"))
    with node_kind("n", relay=secure_relay.endpoint, timeout=5, **keys.node_kw("ops")) as node:
        with pytest.raises(ValueError, match="publishes only with authorized_keys"):
            node.publish("progress.x", 1)
        with pytest.raises(ValueError, match="needs its public key"):
            node.subscribe("progress.", publishers=[free_tcp_endpoint()])
