"""Two hosts in network namespaces this test creates: the relay in one, a node
in the other; the node finds the relay by zeroconf on its own interface; the
link is cut with `ip link set down` and restored: traffic resumes, nothing
is lost or duplicated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest


from ..helpers import wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (ip netns)")

RELAY_IP, NODE_IP = "10.250.7.1", "10.250.7.2"

SENDER = """
import json, sys, logging
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from murano_zmq import Node
total = int(sys.argv[1])
with Node("sender", relay="auto", discovery=sys.argv[2], heartbeat=0.2, direct=False, timeout=120) as node:
    print("relay " + node.relay_endpoint, flush=True)
    futures = []
    for i in range(total):
        futures.append(node.send_async("across", i))
        if i % 100 == 99:
            futures[-1].result(120)       # paced: the cut lands mid-stream
            print(f"confirmed {i + 1}", flush=True)
    ids = [f.result(120).hex() for f in futures]
    print("done " + json.dumps(ids), flush=True)
"""

CONSUMER = """
import json, sys
from murano_zmq import Node
with Node("reader", relay=sys.argv[1], direct=False, timeout=60) as node:
    c = node.consume("across", prefetch=500)
    bodies = []
    while True:
        m = c.get(timeout=3)
        if m is None:
            break
        bodies.append(m.body)
        m.ack()
    print(json.dumps(bodies), flush=True)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    tag = f"mzq{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        sh("ip", "link", "set", f"{tag}va", "netns", a)
        sh("ip", "link", "set", f"{tag}vb", "netns", b)
        for ns, dev, ip in ((a, f"{tag}va", RELAY_IP), (b, f"{tag}vb", NODE_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b, f"{tag}vb"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.timeout(240)
def test_link_cut_and_restored_between_two_hosts(two_hosts, tmp_path):
    ns_relay, ns_node, node_dev = two_hosts
    total = 3000
    procs: list[subprocess.Popen] = []

    def run_in(ns: str, *args: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], **kw)
        procs.append(p)
        return p

    try:
        relay = run_in(ns_relay, "-m", "murano_zmq", "--log-level", "INFO", "relay",
                       "--bind", f"tcp://{RELAY_IP}:5570", "--data-dir", str(tmp_path / "data"),
                       "--discovery-interfaces", RELAY_IP,
                       stderr=open(tmp_path / "relay.log", "wb"))
        sender = run_in(ns_node, "-c", SENDER, str(total), NODE_IP, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
        assert sender.stdout.readline().strip() == f"relay tcp://{RELAY_IP}:5570"  # found by zeroconf
        reconnecting = threading.Event()

        def watch_stderr() -> None:
            for line in sender.stderr:
                if "reconnecting" in line:
                    reconnecting.set()

        threading.Thread(target=watch_stderr, daemon=True).start()
        line = ""
        while not line.startswith("confirmed 1000"):
            line = sender.stdout.readline()
            assert line, "sender ended early"
        sh("ip", "-n", ns_node, "link", "set", node_dev, "down")
        # The node notices (heartbeats) and starts a new session; then the link returns.
        assert reconnecting.wait(30), "the node did not notice the cut"
        sh("ip", "-n", ns_node, "link", "set", node_dev, "up")
        done = ""
        while not done.startswith("done "):
            done = sender.stdout.readline()
            assert done, "sender ended without confirming everything"
        ids = json.loads(done[5:])
        assert sender.wait(60) == 0
        assert len(set(ids)) == total

        reader = run_in(ns_node, "-c", CONSUMER, f"tcp://{RELAY_IP}:5570", stdout=subprocess.PIPE, text=True)
        bodies = json.loads(reader.stdout.readline())
        assert reader.wait(60) == 0
        assert sorted(bodies) == list(range(total)), "lost or duplicated across the cut"
        assert len(bodies) == total
        relay.terminate()
        assert relay.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    wait_for(lambda: all(p.poll() is not None for p in procs), 10, what="children to exit")
