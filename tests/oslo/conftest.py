"""Fixtures for the oslo.messaging driver's tests: transports on a real relay,
RPC servers and notification listeners that are always stopped."""

from __future__ import annotations

import queue
import uuid
from urllib.parse import urlsplit

import pytest

oslo_messaging = pytest.importorskip("oslo_messaging")
from oslo_config import cfg  # noqa: E402


def zmqrelay_url(*relays, query: str = "") -> str:
    hosts = ",".join(urlsplit(r.endpoint).netloc for r in relays)
    return f"zmqrelay://{hosts}/" + (f"?{query}" if query else "")


@pytest.fixture
def url(relay) -> str:
    return zmqrelay_url(relay)


@pytest.fixture
def transports(relay_factory):
    """make(url, kind="rpc"|"notification"): transports cleaned up at teardown
    (before the relays stop)."""
    made = []

    def make(url: str, kind: str = "rpc", **kw):
        if kind == "rpc":
            transport = oslo_messaging.get_rpc_transport(cfg.CONF, url=url, **kw)
        else:
            transport = oslo_messaging.get_notification_transport(cfg.CONF, url=url, **kw)
        made.append(transport)
        return transport

    yield make
    for transport in reversed(made):
        transport.cleanup()


@pytest.fixture
def servers(transports):
    """start(server): start an RPC server or notification listener; all are
    stopped (and waited for) at teardown."""
    started = []

    def start(server):
        server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()
        server.wait()


@pytest.fixture
def topic() -> str:
    return f"topic-{uuid.uuid4().hex[:8]}"


class Recorder:
    """An RPC endpoint that records what it ran in `calls`, and with its
    server's name in `sink` (a queue several recorders may share)."""

    def __init__(self, name: str, sink: queue.Queue | None = None):
        self.name = name
        self.calls: queue.Queue = queue.Queue()
        self.sink = sink if sink is not None else queue.Queue()

    def _put(self, kind, value):
        self.calls.put((kind, value))
        self.sink.put((self.name, kind, value))

    def echo(self, ctxt, value):
        self._put("echo", value)
        return {"server": self.name, "value": value, "ctxt": ctxt}

    def record(self, ctxt, value):
        self._put("record", value)

    def fail(self, ctxt, text):
        raise ValueError(text)

    def fail_custom(self, ctxt, text):
        raise CustomError(text)

    def slow(self, ctxt, seconds):
        import time

        time.sleep(seconds)  # the server side of a long call: bounded by the test
        return seconds

    def taken(self, n: int, timeout: float = 10.0) -> list:
        return [self.calls.get(timeout=timeout) for _ in range(n)]


class CustomError(Exception):
    pass


class NotificationRecorder:
    """A notification endpoint: records (priority, event_type, payload);
    `requeue_first` requeues each event type the first time it comes."""

    def __init__(self, name: str = "", requeue_first: bool = False, sink: queue.Queue | None = None):
        self.name = name
        self.events: queue.Queue = queue.Queue()
        self.sink = sink if sink is not None else queue.Queue()  # (name, event_type), shareable
        self.requeue_first = requeue_first
        self._seen: set = set()

    def _record(self, priority, event_type, payload):
        if self.requeue_first and event_type not in self._seen:
            self._seen.add(event_type)
            self.events.put(("requeued", event_type, payload))
            return oslo_messaging.NotificationResult.REQUEUE
        self.events.put((priority, event_type, payload))
        self.sink.put((self.name, event_type))
        return oslo_messaging.NotificationResult.HANDLED

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        return self._record("info", event_type, payload)

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        return self._record("error", event_type, payload)


def drain(q: queue.Queue, idle: float = 0.3) -> list:
    """Everything `q` yields until it has been empty for `idle` seconds."""
    got = []
    while True:
        try:
            got.append(q.get(timeout=idle))
        except queue.Empty:
            return got


def pytest_collection_modifyitems(items):
    # oslo.messaging deprecates its executor argument; these tests name the
    # executor on purpose (threading, and eventlet in test_eventlet.py).
    here = str(__import__("pathlib").Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.filterwarnings("ignore:Using the 'executor' argument:DeprecationWarning"))
