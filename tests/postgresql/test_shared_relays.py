"""Several relays serving from one PostgreSQL database at once
(`relay --store postgresql://... --shared`; docs/scale-out.md).

Real relay processes (relay_factory, stopped by PID), one schema per test.
Consumers take their messages through the relay (direct=False), so the
claims are what is tested, not the direct path.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections import Counter

from murano_zmq import Node

from ..helpers import wait_for
from ..pgserver import import_psycopg

psycopg = import_psycopg()


def _relays(relay_factory, pg_url, n: int = 3) -> list:
    return [relay_factory("--store", pg_url, "--shared") for _ in range(n)]


def _rows(dsn: str, sql: str) -> list:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


class _Collector:
    """One consumer node on one relay: what its application code saw."""

    def __init__(self, name: str, relay, mailbox: str, prefetch: int = 50, **node_kw):
        self.seen: list[bytes] = []
        self.bodies: list = []
        self.times: list[float] = []  # when each was seen (monotonic)
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
            self.times.append(time.monotonic())
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


class _Moves(logging.Handler):
    """When each node opened a relay session (node/sockets.py logs it)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.at: dict[str, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if ": relay session to " in msg:
            self.at.setdefault(msg.split()[1].rstrip(":"), []).append(time.monotonic())


def test_kill9_of_one_relay_mid_stream(relay_factory, pg_url, pg_server):
    """Three relays; every node has all three (relay=[...], each its own
    first).  Relay A dies by SIGKILL mid-stream: its nodes move on, every
    send is confirmed, every confirmed message reaches the consumer, none
    twice; A's claims come back to the others when their lease passes."""
    relays = _relays(relay_factory, pg_url)
    moves = _Moves()
    node_log = logging.getLogger("murano_zmq.node")
    node_log.addHandler(moves)
    level = node_log.level
    node_log.setLevel(logging.INFO)
    eps = [r.endpoint for r in relays]
    order = lambda i: eps[i:] + eps[:i]  # noqa: E731  (node i starts on relay i)
    got = _Collector("consumer", order(0), "jobs", prefetch=100, heartbeat=0.5)
    senders = [Node(f"sender-{i}", relay=order(i), heartbeat=0.5, timeout=60) for i in range(3)]
    try:
        total = 15000  # per sender: queued at once, confirmed over a few seconds
        futures: list[list] = [[], [], []]
        confirmed = [[], [], []]  # when each sender's confirms came (monotonic), in order

        def send(i: int) -> None:
            for n in range(total):
                f = senders[i].send_async("jobs", {"s": i, "n": n})
                f.add_done_callback(lambda _, i=i: confirmed[i].append(time.monotonic()))
                futures[i].append(f)

        # Every send queued before the kill: the test process's own work
        # (the GIL) must not slow the nodes it measures afterwards.  The
        # killed relay's sender last, so that its stream is under way then.
        threads = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        send(0)
        wait_for(lambda: len(confirmed[0]) >= 300 and len(got.seen) >= 100, 60, interval=0.005,
                 what="the stream under way")
        killed = time.monotonic()  # (the nodes may move before kill() has reaped it)
        relays[0].kill()
        confirmed_before = {f.result() for fs in futures for f in fs if f.done()}
        assert len(confirmed[0]) < total, "the kill came after the stream: nothing to move"
        ids = {f.result(timeout=60) for fs in futures for f in fs}
        wait_for(lambda: set(got.seen) >= ids, 60, what="every confirmed message consumed")
        drained = time.monotonic() - killed
        # Acks the killed relay took with it: those messages come again once
        # A's claims lapse, to the consumer still here, which settles them
        # as the copies they are (its dedup window); then the table is empty.
        dsn = _dsn(pg_server, pg_url)
        wait_for(lambda: _rows(dsn, "SELECT count(*) FROM messages")[0][0] == 0, 30, what="every ack settled")
    finally:
        for s in senders:
            s.close()
        got.close()
        node_log.removeHandler(moves)
        node_log.setLevel(level)
    # Served again: the first confirm (delivery) after the node's session
    # to another relay opened, counted from the kill.
    moved_at = {name: min(t for t in times if t > killed) for name, times in moves.at.items()
                if any(t > killed for t in times)}
    assert set(moved_at) == {"sender-0", "consumer"}, f"the nodes that moved: {sorted(moved_at)}"
    sender_moved = min(t for t in confirmed[0] if t > moved_at["sender-0"]) - killed
    consumer_moved = min(t for t in got.times if t > moved_at["consumer"]) - killed
    print(f"relay A killed: its sender served by another relay after {sender_moved:.2f}s, its consumer after "
          f"{consumer_moved:.2f}s; every message consumed {drained:.2f}s after the kill "
          f"({got.redelivered} marked redelivered)")
    assert len(ids) == 3 * total
    assert confirmed_before <= set(got.seen)
    assert len(got.seen) == len(set(got.seen)), "a message reached application code twice"
    assert sender_moved < 2 and consumer_moved < 2, "nodes not served again within 2 s"


def _counters(endpoint: str) -> dict:
    with Node("admin", relay=endpoint, timeout=30) as admin:
        return admin.status()["counters"]


def test_message_ttl_dead_letters_each_message_once_across_relays(relay_factory, pg_url, pg_server):
    relays = _relays(relay_factory, pg_url)
    with Node("setup", relay=relays[0].endpoint, timeout=30) as node:
        node.declare("work", message_ttl=1.0, dead_letter="dead")
    ids = []
    for i, r in enumerate(relays):  # every relay stores some; nobody consumes them
        with Node(f"sender-{i}", relay=r.endpoint, timeout=30) as sender:
            ids += sender.send_many([("work", n) for n in range(100)])
    dsn = _dsn(pg_server, pg_url)
    count = ("SELECT count(*) FROM messages m JOIN mailboxes b ON b.id = m.mailbox WHERE b.name = '{}'").format
    wait_for(lambda: _rows(dsn, count("dead"))[0][0] == len(ids), 30, interval=0.1, what="every message dead-lettered")
    assert _rows(dsn, count("work"))[0][0] == 0
    got = _Collector("reader", relays[1].endpoint, "dead")
    try:
        wait_for(lambda: len(got.seen) >= len(ids), 30, what="the dead letters consumed")
    finally:
        got.close()
    assert sorted(got.seen) == sorted(ids), "each expired message dead-lettered exactly once"
    assert _rows(dsn, "SELECT count(*) FROM messages")[0][0] == 0
    per_relay = [_counters(r.endpoint)["dead_lettered_expired"] for r in relays]
    assert sum(per_relay) == len(ids), f"dead-lettered per relay: {per_relay}"
    assert sorted(per_relay)[:2] == [0, 0], f"only the sweeper expires: {per_relay}"


def test_an_idle_mailbox_is_deleted_once_and_made_again_on_use(relay_factory, pg_url, pg_server, tmp_path):
    relays = _relays(relay_factory, pg_url)
    with Node("setup", relay=relays[0].endpoint, timeout=30) as node:
        node.declare("tmp", ttl=1.0)
    with Node("sender", relay=relays[1].endpoint, timeout=30) as sender:
        sender.send("tmp", "gone with the mailbox")
    dsn = _dsn(pg_server, pg_url)
    wait_for(lambda: not _rows(dsn, "SELECT id FROM mailboxes WHERE name='tmp'"), 20, interval=0.1,
             what="the idle mailbox deleted")
    assert _rows(dsn, "SELECT count(*) FROM messages")[0][0] == 0
    deleted = [line for i in range(3) for line in (tmp_path / f"relay-{i}.log").read_text().splitlines()
               if "mailbox tmp deleted" in line]
    assert len(deleted) == 1, deleted
    # Used again through a relay that knew it: made again, and the message is there.
    with Node("sender", relay=relays[1].endpoint, timeout=30) as sender:
        sender.send("tmp", "after")
    got = _Collector("reader", relays[2].endpoint, "tmp")
    try:
        wait_for(lambda: got.bodies == ["after"], 20, what="the message in the mailbox made again")
    finally:
        got.close()


def test_a_consumer_that_leaves_gives_its_messages_to_another_relays_consumer(relay_factory, pg_url):
    """Its relay lives on and renews its claims: only the release (in the
    turn's commit, with a wake-up) lets the other relay's consumer have them."""
    a, b = _relays(relay_factory, pg_url, 2)
    with Node("sender", relay=a.endpoint, timeout=30) as sender:
        ids = sender.send_many([("jobs", n) for n in range(500)])
    holder = Node("holder", relay=a.endpoint, timeout=30)
    try:
        held = holder.consume("jobs", prefetch=300, direct=False)  # more than the window keeps on a requeue
        taken = []
        wait_for(lambda: taken.append(held.get(timeout=0.05)) or len([m for m in taken if m]) >= 300, 30,
                 interval=0, what="300 messages held, unacked")
        got = _Collector("worker", b.endpoint, "jobs")
        wait_for(lambda: len(got.seen) >= 200, 30, what="the 200 not held")
    finally:
        holder.close()  # its 300 unacked messages go back
    left = time.monotonic()
    try:
        wait_for(lambda: set(got.seen) == set(ids), 30, what="the released messages on the other relay")
        took = time.monotonic() - left
    finally:
        got.close()
    print(f"300 released messages reached a consumer on another relay within {took:.2f}s")
    assert len(got.seen) == len(ids)


def test_a_relay_that_stops_hands_its_claims_over_at_once(relay_factory, pg_url):
    a, b = _relays(relay_factory, pg_url, 2)
    with Node("sender", relay=a.endpoint, timeout=30) as sender:
        ids = sender.send_many([("jobs", n) for n in range(200)])
    holder = Node("holder", relay=a.endpoint, timeout=30)
    try:
        held = holder.consume("jobs", prefetch=200, direct=False)
        taken = []
        wait_for(lambda: taken.append(held.get(timeout=0.05)) or len([m for m in taken if m]) >= 200, 30,
                 interval=0, what="every message held, unacked")
        got = _Collector("worker", b.endpoint, "jobs")
        stopped = time.monotonic()
        assert a.stop() == 0  # SIGTERM: its last commit, then its claims go back
        wait_for(lambda: set(got.seen) == set(ids), 30, what="the stopped relay's messages on the other relay")
        took = time.monotonic() - stopped
    finally:
        holder.close()
    got.close()
    print(f"a stopped relay's 200 claimed messages reached another relay's consumer {took:.2f}s after SIGTERM")
    assert took < 1.2, "waited for the lease instead of a hand-over"  # a lease renewed 2/3 s ago holds >= 1.3 s
