"""The permissions file of docs/murano.md against a keyed relay: each agent
key reads its own queue only; the engine declares, sends and reads results."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from murano_zmq import PermissionDenied, RelayUnavailable
from murano_zmq.compat import murano as engine
from murano_zmq.compat import muranoagent as agent
from murano_zmq.security import CurveClient, create_key_pair, load_public_key, load_secret_key

DOC = Path(__file__).resolve().parents[2] / "docs" / "murano.md"


def doc_permissions() -> str:
    """The permissions file docs/murano.md gives (the toml block with the agent pattern)."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    (block,) = [b for b in blocks if '[identity."e*-h*"]' in b]
    return block


@pytest.fixture
def setup(tmp_path, relay_factory):
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    queue_a = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}"
    queue_b = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}"
    for name in ("relay", "murano-engine", queue_a, queue_b):
        create_key_pair(name, keys)
        if name != "relay":
            shutil.copy(keys / f"{name}.key", authorized / f"{name}.key")
    permissions = tmp_path / "permissions.toml"
    permissions.write_text(doc_permissions())
    probe = CurveClient(load_secret_key(keys / "murano-engine.key_secret"), load_public_key(keys / "relay.key"))
    relay = relay_factory("--key", str(keys / "relay.key_secret"), "--authorized-keys", str(authorized),
                          "--permissions", str(permissions), probe_curve=probe)
    host, port = relay.endpoint.rsplit("//", 1)[1].rsplit(":", 1)

    def client(flavour, password: str):
        return flavour.MqClient("murano", password, host, int(port), "/", ssl=True,
                                ca_certs=str(keys / "relay.key"))

    return client, keys, queue_a, queue_b


def test_an_agent_key_reads_its_own_queue_only(setup):
    client, keys, queue_a, queue_b = setup
    results = "-execution-results-regionone"
    with client(engine, str(keys / "murano-engine.key_secret")) as mq:  # password: a key file
        mq.declare(results, enable_ha=True, ttl=86400000)
        for queue in (queue_a, queue_b):
            mq.declare(queue, enable_ha=True, ttl=86400000)
            plan = engine.Message()
            plan.body, plan.id = {"ID": queue, "Body": "x"}, queue
            mq.send(plan, queue)

    secret_a = load_secret_key(keys / f"{queue_a}.key_secret").secret.decode()
    with client(agent, secret_a) as mq:  # password: the z85 secret, inline in the config
        with mq.open(queue_a) as subscription:
            msg = subscription.get_message(timeout=10)
            msg.ack()
        assert msg.id == queue_a
        with pytest.raises(PermissionDenied):
            with mq.open(queue_b):
                pass
        with pytest.raises(PermissionDenied):
            mq.declare(queue_b)
        with pytest.raises(PermissionDenied):
            stray = agent.Message()
            stray.body, stray.id = {"evil": True}, "x"
            mq.send(stray, queue_b)
        result = agent.Message()
        result.body, result.id = {"SourceID": queue_a}, queue_a
        mq.send(result, results)

    with client(engine, str(keys / "murano-engine.key_secret")) as mq, mq.open(results) as subscription:
        got = subscription.get_message(timeout=10)
        got.ack()
        assert got.body == {"SourceID": queue_a}


def test_an_agent_key_may_wait_on_its_queue_before_the_engine_declares_it(setup):
    """A VM may boot before the engine's lazy declare: with consume alone on
    its own mailbox the agent waits there, and gets the plan sent later."""
    client, keys, queue_a, queue_b = setup
    secret_a = load_secret_key(keys / f"{queue_a}.key_secret").secret.decode()
    with client(agent, secret_a) as mq, mq.open(queue_a, prefetch_count=1) as subscription:
        assert subscription.get_message(timeout=0.2) is None
        with pytest.raises(PermissionDenied):
            with mq.open(queue_b):  # not another's, declared or not
                pass
        with client(engine, str(keys / "murano-engine.key_secret")) as engine_mq:
            engine_mq.declare(queue_a, enable_ha=True, ttl=86400000)
            plan = engine.Message()
            plan.body, plan.id = {"ID": "p-early"}, "p-early"
            engine_mq.send(plan, queue_a)
        msg = subscription.get_message(timeout=10)
        msg.ack()
        # its result to a results queue nobody declared yet (or that expired): it waits there
        result = agent.Message()
        result.body, result.id = {"SourceID": "p-early"}, "p-early"
        mq.send(result, "-execution-results-late")
    assert msg.id == "p-early" and json.loads(msg.body) == {"ID": "p-early"}
    with client(engine, str(keys / "murano-engine.key_secret")) as mq:
        mq.declare("-execution-results-late", enable_ha=True, ttl=86400000)
        with mq.open("-execution-results-late") as subscription:
            got = subscription.get_message(timeout=10)
            got.ack()
    assert got.body == {"SourceID": "p-early"}


def test_the_engine_may_not_read_agent_queues_and_strangers_are_refused(setup):
    client, keys, queue_a, _ = setup
    with client(engine, str(keys / "murano-engine.key_secret")) as mq:
        mq.declare(queue_a, ttl=60000)
        with pytest.raises(PermissionDenied):
            with mq.open(queue_a):
                pass
    stranger = client(agent, "guest")  # no key pair: a fresh one the relay does not know
    stranger.timeout = 2.0
    with stranger, pytest.raises(RelayUnavailable):
        with stranger.open(queue_a):
            pass


def test_api_to_engine_over_oslo_and_engine_to_agent_on_one_relay(setup):
    """docs/murano.md's deployment: murano-api calls murano-engine through
    oslo.messaging (zmqrelay://), the engine hands the plan to an agent through
    the drop-in, all on one keyed relay with the doc's permissions file."""
    oslo_messaging = pytest.importorskip("oslo_messaging")
    from oslo_config import cfg

    client, keys, queue_a, _ = setup
    create_key_pair("murano-api", keys)
    shutil.copy(keys / "murano-api.key", keys.parent / "authorized" / "murano-api.key")
    relay_netloc = client(engine, "x").relay.split("//", 1)[1]

    def url(name: str) -> str:
        return (f"zmqrelay://{relay_netloc}/?curve_key={keys / (name + '.key_secret')}"
                f"&relay_key={keys / 'relay.key'}&relay_timeout=10")

    class EngineEndpoint:  # the engine's RPC side hands the task's plan to the agent
        def handle_task(self, context, task):
            with client(engine, str(keys / "murano-engine.key_secret")) as mq:
                mq.declare(queue_a, enable_ha=True, ttl=86400000)
                plan = engine.Message()
                plan.body, plan.id = {"ID": task["id"], "Body": task["body"]}, task["id"]
                mq.send(plan, queue_a)
            return "queued"

    engine_transport = oslo_messaging.get_rpc_transport(cfg.CONF, url=url("murano-engine"))
    api_transport = oslo_messaging.get_rpc_transport(cfg.CONF, url=url("murano-api"))
    server = oslo_messaging.get_rpc_server(engine_transport, oslo_messaging.Target(topic="murano", server="e1"),
                                           [EngineEndpoint()], executor="threading")
    server.start()
    try:
        api = oslo_messaging.get_rpc_client(api_transport, oslo_messaging.Target(topic="murano"), timeout=20)
        assert api.call({}, "handle_task", task={"id": "t1", "body": "deploy"}) == "queued"
    finally:
        server.stop()
        server.wait()
        api_transport.cleanup()
        engine_transport.cleanup()

    secret_a = load_secret_key(keys / f"{queue_a}.key_secret").secret.decode()
    with client(agent, secret_a) as mq, mq.open(queue_a) as subscription:
        msg = subscription.get_message(timeout=10)
        msg.ack()
    assert msg.id == "t1" and json.loads(msg.body) == {"ID": "t1", "Body": "deploy"}
