"""Fixtures shared by the test suites: relays in child processes on loopback."""

from __future__ import annotations

import os
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
def relay_factory(tmp_path, request):
    """Start relays (child processes); every one is stopped by PID at teardown.

    MURANO_ZMQ_TEST_STORE=postgresql runs them on PostgreSQL, a schema per
    data directory (as SQLite has a file per data directory), to check the
    relay behaves the same there."""
    started: list[RelayProcess] = []
    # (postgresql-shared: the same, each relay with --shared: one relay of a shared database)
    which = os.environ.get("MURANO_ZMQ_TEST_STORE", "")
    pg = request.getfixturevalue("pg_server") if which in ("postgresql", "postgresql-shared") else None
    schemas: dict[str, str] = {}

    def start(*extra: str, endpoint: str | None = None, data_dir: str | None = None, **kw) -> RelayProcess:
        if pg is not None and "--store" not in extra:
            from .pgserver import new_schema

            where = data_dir or str(tmp_path / "data")
            if where not in schemas:
                schemas[where] = pg.url(new_schema(pg.dsn()))
            extra = (*extra, "--store", schemas[where], *(["--shared"] if which == "postgresql-shared" else []))
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


# --- PostgreSQL (tests/pgserver.py) ---------------------------------------------------


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL cluster for the session, on a unix socket in a temp dir.
    Skipped where PostgreSQL is not installed, unless MURANO_ZMQ_REQUIRE_PG=1
    (CI sets it: there a missing server fails the tests)."""
    from .pgserver import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("MURANO_ZMQ_REQUIRE_PG") == "1":
            pytest.fail("PostgreSQL (initdb) not found and MURANO_ZMQ_REQUIRE_PG=1")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    from .pgserver import import_psycopg

    import_psycopg()
    server = PostgresServer(bindir)
    try:
        server.init().start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(pg_server) -> str:
    """A conninfo string for a database of this test's own (a fresh schema)."""
    from .pgserver import new_schema, with_schema

    return with_schema(pg_server.dsn(), new_schema(pg_server.dsn()))


@pytest.fixture
def pg_url(pg_server) -> str:
    """The same as a postgresql:// URL, for `relay --store`."""
    from .pgserver import new_schema

    return pg_server.url(new_schema(pg_server.dsn()))
