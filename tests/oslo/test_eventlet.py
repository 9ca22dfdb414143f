"""The driver in a process eventlet has monkey-patched (as eventlet services
and oslo.messaging's functional suite are), with the eventlet executor.

It runs in a child process: this one must stay unpatched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import zmqrelay_url

pytest.importorskip("eventlet")
pytest.importorskip("oslo_messaging")

CHILD = r'''
import eventlet
eventlet.monkey_patch()

import queue
import sys
import warnings

warnings.simplefilter("ignore")
import oslo_messaging as om
from oslo_config import cfg

url = sys.argv[1]
transport = om.get_rpc_transport(cfg.CONF, url=url)
got = queue.Queue()


class Endpoint:
    def __init__(self, name):
        self.name = name

    def echo(self, ctxt, value):
        return [self.name, value]

    def fanned(self, ctxt, value):
        got.put((self.name, value))

    def fail(self, ctxt):
        raise ValueError("green failure")


servers = []
for name in ("a", "b"):
    server = om.get_rpc_server(transport, om.Target(topic="green", server=name), [Endpoint(name)],
                               executor="eventlet")
    server.start()
    servers.append(server)

client = om.get_rpc_client(transport, om.Target(topic="green"), timeout=10)
print(">> call", sorted({client.call({}, "echo", value=i)[0] for i in range(4)}), flush=True)
try:
    client.call({}, "fail")
except ValueError as exc:
    print(">> remote", exc, flush=True)
try:
    om.get_rpc_client(transport, om.Target(topic="nobody"), timeout=0.5).call({}, "echo", value=1)
except om.MessagingTimeout:
    print(">> timeout", flush=True)
om.get_rpc_client(transport, om.Target(topic="green", fanout=True)).cast({}, "fanned", value="f")
print(">> fanout", sorted(got.get(timeout=10) for _ in servers), flush=True)


class Notifications:
    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        got.put(event_type)


notify_transport = om.get_notification_transport(cfg.CONF, url=url)
listener = om.get_notification_listener(notify_transport, [om.Target(topic="green-notes")],
                                        [Notifications()], executor="eventlet")
listener.start()
om.Notifier(notify_transport, "pub", driver="messaging", topics=["green-notes"]).info({}, "green.event", {})
print(">> notification", got.get(timeout=10), flush=True)

for server in servers + [listener]:
    server.stop()
    server.wait()
transport.cleanup()
notify_transport.cleanup()
print(">> done", flush=True)
'''


@pytest.mark.parametrize("discovery", ["off", "127.0.0.1"])
def test_rpc_and_notifications_with_the_eventlet_executor_under_monkey_patching(relay, children, discovery):
    # Discovery on: two transports are two Nodes, two zeroconf Discoverys in
    # one OS thread (they hung the functional suite before they shared a loop).
    env = dict(os.environ)
    if discovery != "off":
        env["MURANO_ZMQ_DISCOVERY_INTERFACES"] = discovery
    proc = children(CHILD, zmqrelay_url(relay), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"the eventlet child hung:\n{out.decode()}\n{err.decode()[-3000:]}")
    lines = [line[3:] for line in out.decode().splitlines() if line.startswith(">> ")]
    assert proc.returncode == 0, f"{out.decode()[-3000:]}\n{err.decode()[-3000:]}"
    assert lines == [
        "call ['a', 'b']",
        "remote green failure",
        "timeout",
        "fanout [('a', 'f'), ('b', 'f')]",
        "notification green.event",
        "done",
    ], err.decode()[-3000:]
    assert sys.modules.get("eventlet") is None or not __import__("eventlet").patcher.is_monkey_patched("thread")
