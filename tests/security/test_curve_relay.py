"""CURVE, ZAP and permissions against a real relay process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from murano_zmq import PermissionDenied, RelayUnavailable

from ..helpers import free_tcp_endpoint, wait_for
from ..integration.nodes import NODE_KINDS
from .conftest import relay_log

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nodes():
    made = []

    def make(kind: str, name: str, relay, keys=None, key: str | None = None, **kw):
        kw.setdefault("timeout", 10)
        if key is not None:
            kw.update(keys.node_kw(key))
        node = NODE_KINDS[kind](name, relay=relay.endpoint, **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def depth(ops_node, mailbox: str) -> int | None:
    for mb in ops_node.status()["mailboxes"]:
        if mb["name"] == mailbox:
            return mb["depth"]
    return None


@pytest.mark.parametrize("kind", sorted(NODE_KINDS))
def test_authorized_keys_talk_over_curve(secure_relay, keys, nodes, kind):
    conductor = nodes(kind, "conductor", secure_relay, keys, "conductor-1")
    if kind == "sync":  # no plaintext side door next to the CURVE relay socket
        assert conductor.endpoint is None
    sent = conductor.send("agent.e1.u1", {"plan": 1})
    agent = nodes(kind, "agent", secure_relay, keys, "agent-e1-u1")
    msg = agent.consume("agent.e1.u1").get(timeout=10)
    assert msg is not None and msg.id == sent and msg.body == {"plan": 1}
    msg.ack()
    agent.send("conductor.results", {"ok": True})
    ops = nodes(kind, "ops", secure_relay, keys, "ops")
    wait_for(lambda: depth(ops, "agent.e1.u1") == 0, 10, what="ack")
    assert depth(ops, "conductor.results") == 1


@pytest.mark.parametrize("who", ["no key", "unknown key", "wrong relay key"])
def test_unauthenticated_clients_are_refused_and_logged(secure_relay, keys, nodes, who):
    kw = {"no key": {}, "unknown key": keys.node_kw("stranger"),
          "wrong relay key": {"curve_key": keys.secret("agent-e1-u1"), "relay_key": keys.public("ops")}}[who]
    intruder = nodes("sync", "intruder", secure_relay, timeout=2, **kw)
    with pytest.raises(RelayUnavailable):
        intruder.send("agent.e1.u1", "let me in")
    intruder.close()
    expected = {"no key": "relay refused a client on",  # mechanism mismatch, or a broken pipe
                "unknown key": f"key {keys.public('stranger').decode()} is not in",
                "wrong relay key": "refused a client"}[who]
    wait_for(lambda: expected in relay_log(secure_relay), 10, what=f"the refusal in the relay's log ({expected})")
    ops = nodes("sync", "ops", secure_relay, keys, "ops")
    assert depth(ops, "agent.e1.u1") is None  # nothing reached the relay


def test_agent_cannot_touch_another_agents_mailbox(secure_relay, keys, nodes):
    conductor = nodes("sync", "conductor", secure_relay, keys, "conductor-1")
    plan = conductor.send("agent.e1.u2", {"plan": "for u2"})
    ops = nodes("sync", "ops", secure_relay, keys, "ops")
    before = {mb["name"]: mb for mb in ops.status()["mailboxes"]}

    agent1 = nodes("sync", "agent1", secure_relay, keys, "agent-e1-u1")
    with pytest.raises(PermissionDenied, match="agent-e1-u1 may not consume 'agent.e1.u2'"):
        agent1.consume("agent.e1.u2")
    with pytest.raises(PermissionDenied):
        agent1.send("agent.e1.u2", "forged plan")  # 403 for the record in CONFIRM
    with pytest.raises(PermissionDenied):
        agent1.send_many([("conductor.results", "fine"), ("agent.e1.u2", "forged")])
    with pytest.raises(PermissionDenied):
        agent1.declare("agent.e1.u2", ttl=1)
    with pytest.raises(PermissionDenied):
        agent1.delete("agent.e1.u2")
    with pytest.raises(PermissionDenied):
        agent1.status()
    with pytest.raises(PermissionDenied):  # dead letters are sends to the dead-letter mailbox
        conductor.declare("agent.e1.u3", dead_letter="ops.private")

    after = {mb["name"]: mb for mb in ops.status()["mailboxes"]}
    for field in ("depth", "ready", "unacked", "consumers", "declared", "options"):
        assert after["agent.e1.u2"][field] == before["agent.e1.u2"][field]
    assert "agent.e1.u3" not in after and "ops.private" not in after
    assert after["conductor.results"]["depth"] == 1  # the allowed record of send_many
    log = relay_log(secure_relay)
    assert "denied: agent-e1-u1 may not consume agent.e1.u2" in log
    assert "denied: agent-e1-u1 may not send agent.e1.u2" in log

    agent2 = nodes("sync", "agent2", secure_relay, keys, "agent-e1-u2")
    msg = agent2.consume("agent.e1.u2").get(timeout=10)
    assert msg is not None and msg.id == plan and msg.body == {"plan": "for u2"}
    assert msg.delivery_count == 1
    msg.ack()


def test_status_lists_only_what_the_identity_administers(relay_factory, keys, nodes, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(keys.permissions.read_text() + '\n[identity."conductor-1"]\nadmin = ["agent.*"]\n')
    relay = relay_factory(*keys.relay_args("--permissions", str(rules)), probe_curve=keys.client("ops"))
    conductor = nodes("sync", "conductor", relay, keys, "conductor-1")
    conductor.send("agent.e1.u1", 1)
    conductor.send("api.results", 2)
    assert [mb["name"] for mb in conductor.status()["mailboxes"]] == ["agent.e1.u1"]
    ops = nodes("sync", "ops", relay, keys, "ops")
    assert [mb["name"] for mb in ops.status()["mailboxes"]] == ["agent.e1.u1", "api.results"]


def test_removed_key_loses_access_without_a_restart(secure_relay, keys, nodes):
    agent = nodes("sync", "agent", secure_relay, keys, "agent-e1-u1")
    consumer = agent.consume("agent.e1.u1")
    agent.send("conductor.results", "before")

    (keys.authorized / "agent-e1-u1.key").unlink()
    wait_for(lambda: "removed ['agent-e1-u1']" in relay_log(secure_relay), 10, what="the reload")
    # The open session is dropped at once (its consumer with it), and its
    # next request is refused.
    wait_for(lambda: "dropped 1 session(s)" in relay_log(secure_relay), 10, what="the session dropped")
    with pytest.raises(PermissionDenied, match="no longer authorized"):
        agent.send("conductor.results", "after", timeout=5)
    conductor = nodes("sync", "conductor", secure_relay, keys, "conductor-1")
    conductor.send("agent.e1.u1", "not for a revoked agent")
    assert consumer.get(timeout=1.5) is None
    # A new connection with the key is refused at the handshake.
    again = nodes("sync", "agent-again", secure_relay, keys, "agent-e1-u1", timeout=2)
    with pytest.raises(RelayUnavailable):
        again.send("conductor.results", "after")
    ops = nodes("sync", "ops", secure_relay, keys, "ops")
    assert depth(ops, "conductor.results") == 1
    assert depth(ops, "agent.e1.u1") == 1  # kept for the agent, should it come back

    # Putting the key back gives access back, also without a restart.  (The
    # first agent goes first: back in, it would resume its consumer, and the
    # message could be its.)
    agent.close()
    (keys.authorized / "agent-e1-u1.key").write_bytes((keys.dir / "agent-e1-u1.key").read_bytes())
    wait_for(lambda: "added ['agent-e1-u1']" in relay_log(secure_relay), 10, what="the second reload")
    back = nodes("sync", "agent-back", secure_relay, keys, "agent-e1-u1")
    msg = back.consume("agent.e1.u1").get(timeout=10)
    assert msg is not None and msg.body == "not for a revoked agent"


def test_sighup_reloads_what_polling_cannot_see(secure_relay, keys, nodes):
    """Rewrite a key file in place with the same size and mtime: only SIGHUP notices."""
    path = keys.authorized / "agent-e1-u1.key"
    st = path.stat()
    text = path.read_text()
    path.write_text(text.replace(keys.public("agent-e1-u1").decode(), keys.public("stranger").decode()))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size

    secure_relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "authorized keys reloaded" in relay_log(secure_relay), 10, what="the SIGHUP reload")
    # The stranger's key now carries the name agent-e1-u1, with its rights.
    stranger = nodes("sync", "stranger", secure_relay, keys, "stranger")
    stranger.send("conductor.results", "hello")
    with pytest.raises(PermissionDenied):
        stranger.consume("agent.e1.u2")
    assert secure_relay.proc.poll() is None


def _relay_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "murano_zmq", "relay", "--bind", free_tcp_endpoint(), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_keys_without_permissions_refuse_to_start(keys, tmp_path, relay_factory, nodes):
    data = ("--data-dir", str(tmp_path / "d"))
    out = _relay_cli(*keys.relay_args(), *data)
    assert out.returncode != 0
    assert "--permissions FILE" in out.stderr and "--allow-all" in out.stderr
    out = _relay_cli("--permissions", str(keys.permissions), *data)
    assert out.returncode != 0 and "--key" in out.stderr
    out = _relay_cli(*keys.relay_args("--permissions", str(keys.permissions), "--allow-all"), *data)
    assert out.returncode != 0 and "exclude each other" in out.stderr
    out = _relay_cli("--key", str(tmp_path / "missing.key_secret"), "--allow-all", *data)
    assert out.returncode != 0 and "no key file" in out.stderr

    relay = relay_factory(*keys.relay_args("--allow-all"), probe_curve=keys.client("agent-e1-u1"))
    agent = nodes("sync", "agent", relay, keys, "agent-e1-u1")
    agent.send("agent.e1.u2", "allowed: --allow-all")  # authenticated, and every operation allowed
    assert agent.status()["mailboxes"][0]["name"] == "agent.e1.u2"
    stranger = nodes("sync", "stranger", relay, keys, "stranger", timeout=2)
    with pytest.raises(RelayUnavailable):
        stranger.status()


def test_cli_keygen_and_keyed_commands(secure_relay, keys, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "murano_zmq", *args], capture_output=True, text=True,
                              timeout=60)

    out = cli("keygen", "agent-e9-u9", "--dir", str(tmp_path / "new"))
    assert out.returncode == 0, out.stderr
    secret = tmp_path / "new" / "agent-e9-u9.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert cli("keygen", "agent-e9-u9", "--dir", str(tmp_path / "new")).returncode != 0  # never overwrites

    r = ("--relay", secure_relay.endpoint, "--key-dir", str(keys.dir), "--relay-key", "relay")
    assert cli("send", "agent.e1.u1", "plan", *r, "--key", "conductor-1").returncode == 0
    denied = cli("consume", "agent.e1.u1", *r, "--key", "agent-e1-u2", "--timeout", "1")
    assert denied.returncode == 1 and "PermissionDenied" in denied.stderr
    got = cli("consume", "agent.e1.u1", *r, "--key", "agent-e1-u1", "--count", "1", "--timeout", "10")
    assert got.returncode == 0 and got.stdout.strip() == "plan"
    refused = cli("status", *r, "--key", "stranger", "--timeout", "2")
    assert refused.returncode == 1 and "--relay-key" in refused.stderr
