"""Murano's engine -> agent flow on the drop-in, against a real relay process.

The engine side runs in the test; each agent is a separate process
(agent_process.py) started only after its plan waits in its queue.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from murano_zmq import Node
from murano_zmq.compat import murano as engine

from ..helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
AGENT = "import sys; from tests.compat.agent_process import main; main(*sys.argv[1:])"
DAY_MS = 86400000


def host_port(relay) -> tuple[str, int]:
    host, port = relay.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def engine_client(relay) -> engine.MqClient:
    host, port = host_port(relay)
    return engine.MqClient(login="murano", password="guest", host=host, port=port, virtual_host="/")


def send_plan(relay, queue_name: str, results: str, plan: dict) -> None:
    """As the engine does before any agent exists: declare the results queue
    and the agent's queue (a day's TTL, HA asked for), send the plan."""
    with engine_client(relay) as client:
        client.declare(results, ttl=DAY_MS)
        client.declare(queue_name, enable_ha=True, ttl=DAY_MS)
        msg = engine.Message()
        msg.body, msg.id = plan, plan["ID"]
        client.send(msg, queue_name)


class Agent:
    """An agent process and its stdout lines (read by a thread: no lost buffering)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def read_line(self, timeout: float) -> str:
        """The agent's next stdout line, within `timeout` seconds."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the agent within {timeout}s") from None
        assert line is not None, f"agent exited with {self.proc.wait(5)} before printing"
        return line


def start_agent(children, relay, queue_name: str, results: str, mode: str, pem: str = "",
                **env: str) -> Agent:
    return Agent(children(AGENT, relay.endpoint, queue_name, results, mode, pem, cwd=str(ROOT),
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}))


def mailbox(relay, name: str) -> dict | None:
    with Node("observer", relay.endpoint, direct=False, discovery=False, timeout=10) as node:
        return next((m for m in node.status()["mailboxes"] if m["name"] == name), None)


@pytest.fixture
def signing_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def murano_sign(key, queue: str):
    """Murano's Agent._sign: PKCS#1 v1.5 / SHA-256 over queue name + JSON text."""
    return lambda data: key.sign((queue + data).encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())


def test_signed_plan_sent_before_the_agent_exists_then_result(relay, children, signing_key):
    env, host = uuid.uuid4().hex, uuid.uuid4().hex
    queue = f"e{env}-h{host}".lower()
    results = "-execution-results-regionone"
    plan = {"FormatVersion": "2.0.0", "ID": uuid.uuid4().hex, "Stamp": 7,
            "Body": "return 'ok'", "Scripts": {}, "Files": {}}
    sent = {}

    def sign(data):
        sent["data"] = data
        return murano_sign(signing_key, queue)(data)

    with engine_client(relay) as client:  # the engine: Agent._initialize, Agent._send
        client.declare(results, enable_ha=True, ttl=DAY_MS)
        client.declare(queue, enable_ha=True, ttl=DAY_MS)
        msg = engine.Message()
        msg.body, msg.id = plan, plan["ID"]
        client.send(message=msg, key=queue, signing_func=sign)  # returns once stored
    assert mailbox(relay, "murano:" + queue)["depth"] == 1
    assert mailbox(relay, "murano:" + queue)["ttl"] == 86400

    pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.PKCS1).decode()
    agent = start_agent(children, relay, queue, results, "ack", pem)
    assert agent.read_line(30) == "consuming"
    got = json.loads(agent.read_line(30))
    assert got["body"] == sent["data"] == json.dumps(plan)  # the exact text
    assert got["id"] == plan["ID"]
    assert got["verified"] is True
    assert base64.b64decode(got["signature"]) == murano_sign(signing_key, queue)(sent["data"])
    assert got["redelivered"] is False and got["reply_to"] is None
    assert agent.read_line(30) == "sent result"
    assert agent.proc.wait(30) == 0

    with engine_client(relay) as client:  # the engine: AgentListener._receive
        with client.open(results) as subscription:
            result = subscription.get_message(timeout=10)
            assert result is not None
            result.ack()
    assert result.id == plan["ID"]
    assert result.body == {"SourceID": plan["ID"], "ErrorCode": 0, "Body": {"echo": "return 'ok'"}}
    wait_for(lambda: mailbox(relay, "murano:" + queue)["depth"] == 0, 10, what="plan acked")
    wait_for(lambda: mailbox(relay, "murano:" + results)["depth"] == 0, 10, what="result acked")


def test_an_agent_that_boots_before_the_engine_declares_its_queue_gets_the_plan(relay, children):
    """The VM may boot before the engine's first send declares e<env>-h<host>
    (Agent._initialize is lazy): the agent's consume waits on the queue, the
    declare gives it its TTL, the plan reaches the waiting agent."""
    queue, results = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}", "-execution-results-r4"
    agent = start_agent(children, relay, queue, results, "ack")
    assert agent.read_line(30) == "consuming"
    plan = {"ID": uuid.uuid4().hex, "Body": "early"}
    send_plan(relay, queue, results, plan)
    assert mailbox(relay, "murano:" + queue)["ttl"] == 86400
    got = json.loads(agent.read_line(30))
    assert got["body"] == json.dumps(plan) and got["id"] == plan["ID"]
    assert agent.read_line(30) == "sent result"
    assert agent.proc.wait(30) == 0


def test_an_agent_only_connects_out_to_the_relay(relay, children):
    """A tenant VM behind NAT: the agent's process listens on no port and its
    only TCP connections go to the relay (direct=False, no discovery)."""
    psutil = pytest.importorskip("psutil")
    queue, results = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}", "-execution-results-r5"
    agent = start_agent(children, relay, queue, results, "ack")
    assert agent.read_line(30) == "consuming"
    connections = psutil.Process(agent.proc.pid).net_connections(kind="inet")
    assert [c for c in connections if c.status == psutil.CONN_LISTEN or not c.raddr] == []
    relay_port = host_port(relay)[1]
    assert connections and {c.raddr.port for c in connections} == {relay_port}
    send_plan(relay, queue, results, {"ID": uuid.uuid4().hex, "Body": "nat"})
    assert json.loads(agent.read_line(30))["id"]
    assert agent.read_line(30) == "sent result"


def test_queue_expires_after_its_ttl_when_no_agent_comes(relay):
    queue = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}"
    with engine_client(relay) as client:
        client.declare(queue, enable_ha=True, ttl=1500)  # ms
        msg = engine.Message()
        msg.body, msg.id = {"ID": "p1", "Body": "x"}, "p1"
        client.send(msg, queue)
    status = mailbox(relay, "murano:" + queue)
    assert status["depth"] == 1 and status["ttl"] == 1.5
    wait_for(lambda: mailbox(relay, "murano:" + queue) is None, 15, interval=0.2,
             what="the agent queue to expire")


def test_a_plan_taken_but_not_acked_goes_to_the_next_agent(relay, children):
    queue = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}"
    results = "-execution-results-r1"
    plan = {"ID": uuid.uuid4().hex, "Body": "b", "Stamp": 1}
    send_plan(relay, queue, results, plan)

    first = start_agent(children, relay, queue, results, "hold")
    assert first.read_line(30) == "consuming"
    taken = json.loads(first.read_line(30))
    assert first.read_line(10) == "holding"
    assert taken["body"] == json.dumps(plan) and taken["redelivered"] is False
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    second = start_agent(children, relay, queue, results, "ack")
    assert second.read_line(30) == "consuming"
    again = json.loads(second.read_line(30))  # after the relay saw the first one die
    assert again["body"] == json.dumps(plan) and again["id"] == plan["ID"]
    assert again["redelivered"] is True
    assert second.read_line(30) == "sent result"
    with engine_client(relay) as client, client.open(results) as subscription:
        result = subscription.get_message(timeout=10)
        result.ack()
    assert result.body["SourceID"] == plan["ID"]


def test_an_agent_monkey_patched_by_eventlet_without_oslo_messaging(relay, children):
    """murano-agent runs under eventlet.monkey_patch(); a tenant VM need not have oslo.messaging."""
    pytest.importorskip("eventlet")
    queue, results = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}", "-execution-results-r2"
    plan = {"ID": uuid.uuid4().hex, "Body": "green"}
    send_plan(relay, queue, results, plan)
    green = start_agent(children, relay, queue, results, "ack", COMPAT_TEST_EVENTLET="1")
    assert green.read_line(30) == "consuming"
    assert json.loads(green.read_line(30))["body"] == json.dumps(plan)
    assert green.read_line(30) == "sent result"
    assert green.proc.wait(30) == 0
    with engine_client(relay) as client, client.open(results) as subscription:
        result = subscription.get_message(timeout=10)
        result.ack()
    assert result.body["Body"] == {"echo": "green"}


GREEN_ENGINE = """
import eventlet; eventlet.monkey_patch()  # as murano/monkey_patch.py does (but on Windows)
import json, sys, time
from murano_zmq.compat import murano as engine
host, port = sys.argv[1].rsplit("//", 1)[1].rsplit(":", 1)
ticks = [0]
def ticker():
    while True:
        ticks[0] += 1
        eventlet.sleep(0.01)
def sender():  # another green thread of the engine: Agent._send
    eventlet.sleep(0.3)
    with engine.MqClient("m", "g", host, int(port), "/") as client:
        msg = engine.Message()
        msg.body, msg.id = {"SourceID": "r1"}, "r1"
        client.send(msg, "-execution-results-green")
eventlet.spawn(ticker)
with engine.MqClient("m", "g", host, int(port), "/") as client, client.open("-execution-results-green") as sub:
    start = time.monotonic()
    assert sub.get_message(timeout=1.0) is None
    idle = (time.monotonic() - start, ticks[0])
    eventlet.spawn(sender)
    msg = sub.get_message()  # AgentListener._receive: no timeout
    msg.ack()
print(json.dumps({"idle_s": idle[0], "ticks": idle[1], "body": msg.body}), flush=True)
"""


def test_the_engine_under_eventlet_waits_without_stopping_other_green_threads(relay, children):
    pytest.importorskip("eventlet")
    proc = children(GREEN_ENGINE, relay.endpoint, cwd=str(ROOT), stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = Agent(proc)
    report = json.loads(out.read_line(30))
    assert proc.wait(30) == 0
    assert report["body"] == {"SourceID": "r1"}
    assert 0.9 <= report["idle_s"] < 5
    assert report["ticks"] >= 30  # a 10 ms ticker kept running during the 1 s wait


GREEN_LISTENER = """
import eventlet; eventlet.monkey_patch()
import greenlet, json, sys, time
from murano_zmq.compat import murano as engine
host, port = sys.argv[1].rsplit("//", 1)[1].rsplit(":", 1)
queue = "-execution-results-stop"
clients, got = [], []
def receive():  # AgentListener._receive
    with engine.MqClient("m", "g", host, int(port), "/") as client:
        clients.append(client)
        client.declare(queue, enable_ha=True, ttl=86400000)
        with client.open(queue) as subscription:
            while True:
                msg = subscription.get_message()
                if not msg:
                    continue
                msg.ack()
                got.append(msg.body)
thread = eventlet.spawn(receive)
with engine.MqClient("m", "g", host, int(port), "/") as client:  # an agent's result
    msg = engine.Message()
    msg.body, msg.id = {"SourceID": "s1"}, "s1"
    client.send(msg, queue)
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    eventlet.sleep(0.05)
start = time.monotonic()
thread.kill()  # AgentListener.stop(): kill the green thread waiting in get_message()
try:
    thread.wait()
except greenlet.GreenletExit:
    pass
print(json.dumps({"got": got, "stop_s": time.monotonic() - start,
                  "closed": bool(clients) and clients[0]._node is None}), flush=True)
"""


def test_the_engine_listener_stops_by_killing_its_green_thread(relay, children):
    """AgentListener.stop() kills the green thread that waits in get_message()
    (no timeout): the wait ends at once and the client closes its node."""
    pytest.importorskip("eventlet")
    proc = children(GREEN_LISTENER, relay.endpoint, cwd=str(ROOT), stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(Agent(proc).read_line(30))
    assert proc.wait(30) == 0
    assert report["got"] == [{"SourceID": "s1"}]
    assert report["stop_s"] < 5 and report["closed"] is True


def test_a_plan_survives_kill_9_of_the_relay_once_send_returned(relay_factory, children):
    """send() returns once the relay stored the plan, as RabbitMQ with publisher confirms."""
    relay = relay_factory()
    queue, results = f"e{uuid.uuid4().hex}-h{uuid.uuid4().hex}", "-execution-results-r3"
    plan = {"ID": uuid.uuid4().hex, "Body": "durable"}
    send_plan(relay, queue, results, plan)
    relay.kill()  # SIGKILL: no goodbye, no final commit
    relay = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
    survivor = start_agent(children, relay, queue, results, "ack")
    assert survivor.read_line(30) == "consuming"
    got = json.loads(survivor.read_line(30))
    assert got["body"] == json.dumps(plan) and got["id"] == plan["ID"]
    assert survivor.read_line(30) == "sent result"
