"""Topics with CURVE: a keyed node's PUB admits only its authorized keys, a
SUB connects only to publishers whose key it knows (given, or from a pinned
advert), and the forwarder device with --key/--authorized-keys does the same
for publishers and subscribers that meet through it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from murano_zmq.security import create_key_pair

from ..helpers import free_tcp_endpoint, wait_for
from ..integration.test_topics import events, publish_until_heard

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nodes(node_kind):
    """Nodes of either runner (Node, or AsyncNode through its facade)."""
    made = []

    def make(name: str, relay_endpoint: str, keys=None, key: str | None = None, **kw):
        kw.setdefault("timeout", 10)
        if key is not None:
            kw.update(keys.node_kw(key))
        node = node_kind(name, relay=relay_endpoint, **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def pub_endpoint(node) -> str:
    return wait_for(lambda: node._topics.pub_endpoint, 10, what="the PUB bound")


def silent(subscription, wait: float = 0.5) -> bool:
    """Nothing arrives within `wait` seconds (called after an authorized
    subscriber has heard the same events)."""
    return subscription.get(timeout=wait) is None


def test_keyed_pub_sub_admits_only_authorized_subscribers(secure_relay, keys, nodes, caplog):
    relay = secure_relay.endpoint
    nowhere = free_tcp_endpoint()  # subscribers the relay does not know need no relay
    pub = nodes("conductor", relay, keys, "conductor-1", authorized_keys=keys.authorized)
    pub.publish("progress.warmup", "creates the PUB")
    endpoint = pub_endpoint(pub)
    pub_key = keys.public("conductor-1")

    api = nodes("api", relay, keys, "agent-e1-u1")
    heard = api.subscribe("progress.", publishers=[(endpoint, pub_key)])
    stranger = nodes("stranger", nowhere, keys, "stranger").subscribe("progress.", publishers=[(endpoint, pub_key)])
    plain = nodes("plain", nowhere).subscribe("progress.", publishers=[endpoint])
    # An authorized key expecting another server key: the PUB cannot prove it is that server.
    fooled = nodes("fooled", relay, keys, "agent-e1-u2").subscribe(
        "progress.", publishers=[(endpoint, keys.public("ops"))])
    own = pub.subscribe("progress.")  # the node's own subscriptions hear its PUB (its own key)

    publish_until_heard(pub, "progress.marker", [heard, own], timeout=15)
    for i in range(10):
        pub.publish("progress.env1", i)
    assert events(heard, 10) == [("progress.env1", i) for i in range(10)]
    assert events(own, 10) == [("progress.env1", i) for i in range(10)]
    for subscription in (stranger, plain, fooled):
        assert silent(subscription)
    wait_for(lambda: f"refused a CURVE client: key {keys.public('stranger').decode()}" in caplog.text, 10,
             what="the stranger refused by the publisher's ZAP handler")


def test_subscribers_use_discovered_publishers_only_when_pinned(secure_relay, keys, nodes, tmp_path):
    relay = secure_relay.endpoint
    pins = tmp_path / "pins"  # agent-e1-u2 trusts ops only, not conductor-1
    pins.mkdir()
    shutil.copy(keys.dir / "ops.key", pins / "ops.key")
    pub = nodes("conductor", relay, keys, "conductor-1", discovery="127.0.0.1",
                authorized_keys=keys.authorized)
    trusting = nodes("api", relay, keys, "agent-e1-u1", discovery="127.0.0.1", trusted_keys=keys.authorized)
    wary = nodes("wary", relay, keys, "agent-e1-u2", discovery="127.0.0.1", trusted_keys=pins)
    heard = trusting.subscribe("task.")
    unheard = wary.subscribe("task.")
    pub.publish("task.warmup", "creates and advertises the PUB")
    endpoint = pub_endpoint(pub)
    publish_until_heard(pub, "task.marker", [heard], timeout=20)
    pub.publish("task.7", {"step": "deploy"})
    assert events(heard, 1) == [("task.7", {"step": "deploy"})]
    # The wary node saw the advert (with its key) and did not connect.
    wait_for(lambda: any(a.pub == endpoint and a.key for a in wary.peers.values()), 10, what="the advert")
    assert endpoint not in wary._topics.publishers
    assert silent(unheard)


@pytest.fixture
def keyed_forwarder(keys):
    create_key_pair("forwarder", keys.dir)
    xsub, xpub = free_tcp_endpoint(), free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "devices.forwarder", "--xsub", xsub, "--xpub", xpub,
                             "--key", "forwarder", "--key-dir", str(keys.dir),
                             "--authorized-keys", str(keys.authorized)])
    yield proc, (xsub, xpub)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_forwarder_with_keys(secure_relay, keys, nodes, keyed_forwarder):
    proc, forwarder = keyed_forwarder
    relay, nowhere = secure_relay.endpoint, free_tcp_endpoint()
    fkey = keys.public("forwarder")
    pub = nodes("conductor", relay, keys, "conductor-1", forwarder=forwarder, forwarder_key=fkey)
    sub = nodes("api", relay, keys, "agent-e1-u1", forwarder=forwarder, forwarder_key=fkey)
    stranger = nodes("stranger", nowhere, keys, "stranger", forwarder=forwarder, forwarder_key=fkey)
    plain = nodes("plain", nowhere, forwarder=forwarder)
    heard = sub.subscribe("progress.")
    unheard = [stranger.subscribe("progress."), plain.subscribe("progress.")]
    publish_until_heard(pub, "progress.marker", [heard], timeout=20)
    assert pub._topics.pub_endpoint is None  # a keyed PUB is the forwarder's client and binds nothing
    for i in range(10):
        pub.publish("progress.env1", i)
    assert events(heard, 10) == [("progress.env1", i) for i in range(10)]
    for subscription in unheard:
        assert silent(subscription)
    # A publisher the forwarder does not know is not heard either: it keeps
    # publishing while the conductor's events get through.
    intruder = nodes("intruder", nowhere, keys, "stranger", forwarder=forwarder, forwarder_key=fkey)
    seen = []

    def conductor_heard_again() -> bool:
        intruder.publish("progress.env1", "forged")
        pub.publish("progress.after", "genuine")
        while (e := heard.get(timeout=0.02)) is not None:
            seen.append(e.body)
        return seen.count("genuine") >= 5

    wait_for(conductor_heard_again, 15, interval=0, what="events after the intruder's")
    assert "forged" not in seen
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_forwarder_refuses_a_key_without_authorized_keys(keys):
    create_key_pair("forwarder", keys.dir)
    result = subprocess.run([sys.executable, "-m", "devices.forwarder", "--xsub", free_tcp_endpoint(),
                             "--xpub", free_tcp_endpoint(), "--key", "forwarder", "--key-dir", str(keys.dir)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no --authorized-keys" in result.stderr
