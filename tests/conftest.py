"""Fixtures shared by the test suites: relays in child processes on loopback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from murano_zmq.testing import RelayProcess

from .helpers import free_tcp_endpoint
from .integration.nodes import NODE_KINDS


@pytest.fixture(autouse=True)
def _discovery_only_where_a_test_asks(monkeypatch):
    """An exported MURANO_ZMQ_DISCOVERY_INTERFACES must not make every relay
    and node of the suite advertise beyond what a test pins."""
    monkeypatch.delenv("MURANO_ZMQ_DISCOVERY_INTERFACES", raising=False)


@pytest.fixture
def relay_factory(tmp_path):
    """Start relays (child processes); every one is stopped by PID at teardown."""
    started: list[RelayProcess] = []

    def start(*extra: str, endpoint: str | None = None, data_dir: str | None = None, **kw) -> RelayProcess:
        log = open(tmp_path / f"relay-{len(started)}.log", "wb")
        relay = RelayProcess(endpoint or free_tcp_endpoint(), data_dir or str(tmp_path / "data"),
                             *extra, log_file=log, **kw)
        started.append(relay)
        return relay.start()

    yield start
    for relay in started:
        relay.kill()


@pytest.fixture
def relay(relay_factory) -> RelayProcess:
    return relay_factory()


@pytest.fixture
def children():
    """Popen objects a test starts; killed by PID at teardown."""
    procs: list[subprocess.Popen] = []

    def spawn(code: str, *args: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code, *args], **kw)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


# --- the node factory: node behaviour tests run on both runners --------------


@pytest.fixture(params=sorted(NODE_KINDS))
def node_kind(request):
    """Node (threads) or AsyncNode (asyncio, through a blocking facade)."""
    return NODE_KINDS[request.param]


@pytest.fixture
def make_node(node_kind, request):
    """make_node(name, **Node options): a node of the parametrized kind; the
    relay of the test's `relay` fixture unless given; closed at teardown."""
    made = []

    def make(name: str, **kw):
        if "relay" not in kw:
            kw["relay"] = request.getfixturevalue("relay").endpoint
        kw.setdefault("timeout", 15)
        node = node_kind(name, **kw)
        made.append(node)
        return node

    yield make
    for node in reversed(made):
        node.close()
