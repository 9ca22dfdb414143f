"""Several relays serving from one PostgreSQL database at once
(`relay --store postgresql://... --shared`; docs/scale-out.md).

Real relay processes (relay_factory, stopped by PID), one schema per test.
Consumers take their messages through the relay (direct=False), so the
claims are what is tested, not the direct path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from murano_zmq import Node

from ..helpers import wait_for
from ..pgserver import import_psycopg

psycopg = import_psycopg()


def _relays(relay_factory, pg_url, n: int = 3) -> list:
    return [relay_factory("--store", pg_url, "--shared") for _ in range(n)]


def _rows(pg_url_dsn: str, sql: str) -> list:
    with psycopg.connect(pg_url_dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


class _Collector:
    """One consumer node on one relay: what its application code saw."""

    def __init__(self, name: str, relay, mailbox: str, prefetch: int = 50, **node_kw):
        self.seen: list[bytes] = []
        self.bodies: list = []
        self.redelivered = 0
        self._stop = threading.Event()
        self.node = Node(name, relay=relay, timeout=30, **node_kw)
        self.consumer = self.node.consume(mailbox, prefetch=prefetch, direct=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self.consumer.get(timeout=0.1)
            if m is None:
                continue
            self.seen.append(m.id)
            self.bodies.append(m.body)
            self.redelivered += bool(m.redelivered)
            m.ack()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.node.close()


def _dsn(pg_server, pg_url: str) -> str:
    schema = pg_url.rsplit("search_path%3D", 1)[1]
    return f"{pg_server.dsn()} options='-c search_path={schema}'"


def test_three_relays_competing_consumers_each_message_once(relay_factory, pg_url, pg_server):
    relays = _relays(relay_factory, pg_url)
    collectors = [_Collector(f"worker-{i}", r.endpoint, "jobs") for i, r in enumerate(relays)]
    try:
        total_per_sender = 1000
        ids: list[bytes] = []
        for i, r in enumerate(relays):
            with Node(f"sender-{i}", relay=r.endpoint, timeout=60) as sender:
                ids += sender.send_many([("jobs", {"s": i, "n": n}) for n in range(total_per_sender)])
        every = lambda: sum(len(c.seen) for c in collectors)  # noqa: E731
        wait_for(lambda: every() >= len(ids), 60, what="every message delivered")
        time.sleep(0)  # (nothing more is expected: checked below against the database)
    finally:
        for c in collectors:
            c.close()
    counts = Counter(m for c in collectors for m in c.seen)
    assert set(counts) == set(ids), "a message was lost"
    assert max(counts.values()) == 1, f"delivered twice: {[m.hex() for m, n in counts.items() if n > 1][:5]}"
    assert sum(1 for c in collectors if c.seen) >= 2, "the relays' consumers did not compete"
    dsn = _dsn(pg_server, pg_url)
    wait_for(lambda: _rows(dsn, "SELECT count(*) FROM messages")[0][0] == 0, 10, what="every ack settled")


def test_a_message_sent_via_one_relay_wakes_a_consumer_on_another(relay_factory, pg_url):
    a, b = _relays(relay_factory, pg_url, 2)
    got = _Collector("consumer", b.endpoint, "fast")
    try:
        waits = []
        with Node("sender", relay=a.endpoint, timeout=30) as sender:
            sender.send("fast", "warm-up")
            wait_for(lambda: len(got.seen) == 1, 10, interval=0.001, what="warm-up")
            for i in range(20):
                t0 = time.monotonic()
                sender.send("fast", i)
                wait_for(lambda: len(got.seen) == i + 2, 10, interval=0.001, what=f"message {i}")
                waits.append(time.monotonic() - t0)
    finally:
        got.close()
    waits.sort()
    p50, worst = waits[len(waits) // 2], waits[-1]
    print(f"relay A -> consumer on relay B: p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms (send + confirm "
          "+ wake-up + claim + deliver)")
    assert got.bodies[1:] == list(range(20))
    assert p50 < 0.2, f"median {p50 * 1000:.0f} ms: woken by polling, not by NOTIFY?"


def test_fifo_per_sender_with_one_consumer(relay_factory, pg_url):
    relays = _relays(relay_factory, pg_url)
    got = _Collector("consumer", relays[2].endpoint, "fifo", prefetch=100)
    try:
        with Node("sender", relay=relays[0].endpoint, timeout=30) as sender:
            sender.send_many([("fifo", i) for i in range(2500)])  # more than one claim
        wait_for(lambda: len(got.bodies) >= 2500, 60, what="every message")
    finally:
        got.close()
    assert got.bodies == list(range(2500))


def test_shared_needs_postgresql_and_excludes_a_lone_relay(relay_factory, pg_url, tmp_path):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "murano_zmq", "relay", "--bind", "tcp://127.0.0.1:0",
                               "--data-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=60)

    r = cli("--shared")
    assert r.returncode == 1 and "--shared needs --store postgresql://" in r.stderr, r.stderr
    assert "--shared" in cli("--help").stdout
    lone = relay_factory("--store", pg_url)  # one relay without --shared owns the database
    r = cli("--store", pg_url, "--shared")
    assert r.returncode == 1 and "a relay without --shared is running" in r.stderr, r.stderr
    lone.stop()
    shared = relay_factory("--store", pg_url, "--shared", endpoint=lone.endpoint)
    r = cli("--store", pg_url)
    assert r.returncode == 1 and "another relay is running on this database" in r.stderr, r.stderr
    assert shared.proc.poll() is None
