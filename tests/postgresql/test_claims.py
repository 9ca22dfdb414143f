"""The database side of several relays over one PostgreSQL (store/claims.py):
competing claims, leases, the sweeper lease, seq blocks, wake-ups.

`relay --shared` uses them through store/shared.py (end to end:
test_shared_relays.py); these tests drive them as three relays would, each
with connections of its own.
"""

from __future__ import annotations

import select
import threading
import time

import pytest

from ..pgserver import import_psycopg

psycopg = import_psycopg()

from murano_zmq.store.claims import Claims, SweepLease, Wakeups, ensure_schema, notify, seq_block  # noqa: E402
from murano_zmq.store.postgresql import PostgresStore  # noqa: E402


@pytest.fixture
def db(pg_dsn):
    PostgresStore(pg_dsn, exclusive=False).close()  # the store's tables
    opened = []

    def connect():
        conn = psycopg.connect(pg_dsn, autocommit=True)
        opened.append(conn)
        return conn

    ensure_schema(connect())
    yield connect
    for conn in opened:
        conn.close()


def fill(conn, mailbox: int, n: int, first: int = 1) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO messages (seq, mailbox, msg_id, headers, body, created) "
                        "VALUES (%s, %s, %s, '', 'b', 0)",
                        [(s, mailbox, s.to_bytes(16, "big")) for s in range(first, first + n)])


def test_three_relays_compete_each_message_once(db):
    fill(db(), 1, 3000)
    got: dict[str, list[int]] = {}

    def relay(name: str) -> None:
        claims = Claims(db(), name, lease=30)
        mine = got.setdefault(name, [])
        while True:
            rows = claims.claim(1, 50)
            if not rows:
                return
            mine += [r.seq for r in rows]
            assert claims.settle([r.seq for r in rows]) == len(rows)  # acked: gone

    threads = [threading.Thread(target=relay, args=(f"relay-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [s for seqs in got.values() for s in seqs]
    assert sorted(every) == list(range(1, 3001)), "each message exactly once"
    assert sum(1 for seqs in got.values() if seqs) >= 2, "the relays competed"
    for seqs in got.values():
        assert seqs == sorted(seqs)  # each relay takes the mailbox in order


def test_a_dead_relays_claims_pass_to_another_when_the_lease_ends(db):
    fill(db(), 1, 10)
    dead, alive = Claims(db(), "a", lease=1.0), Claims(db(), "b", lease=30)
    assert [r.seq for r in dead.claim(1, 4)] == [1, 2, 3, 4]
    assert [r.seq for r in alive.claim(1, 3)] == [5, 6, 7]  # a's are not free
    assert dead.renew() == 4
    assert [r.seq for r in alive.claim(1, 10)] == [8, 9, 10]  # still not free: the lease holds
    deadline = time.monotonic() + 5
    taken = []
    while time.monotonic() < deadline and len(taken) < 4:
        taken += [r.seq for r in alive.claim(1, 10) if r.seq <= 4]
        time.sleep(0.05)
    assert sorted(taken) == [1, 2, 3, 4]  # a stopped renewing: b has them
    assert dead.settle([1, 2]) == 0, "a late ack of a lost claim deletes nothing"
    assert alive.release([1, 2, 3, 4]) == 4
    assert [r.seq for r in Claims(db(), "c", 30).claim(1, 2)] == [1, 2]


def test_claims_skip_locked_rows_instead_of_waiting(db):
    fill(db(), 1, 4)
    holder = db()
    with holder.transaction():  # another relay's claim in progress holds rows 1-2
        holder.execute("SELECT seq FROM messages WHERE seq <= 2 FOR UPDATE")
        t0 = time.monotonic()
        assert [r.seq for r in Claims(db(), "b", 30).claim(1, 10)] == [3, 4]
        assert time.monotonic() - t0 < 2


def test_one_sweeper_at_a_time(db):
    leases = [SweepLease(db(), f"relay-{i}", lease=0.3) for i in range(3)]
    assert [lease.acquire() for lease in leases] == [True, False, False]
    assert leases[0].acquire()  # renews
    deadline = time.monotonic() + 5
    while not leases[1].acquire():  # relay-0 died: its lease passes
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not leases[0].acquire() and not leases[2].acquire()
    leases[1].give_up()
    assert leases[2].acquire()


def test_seq_blocks_are_disjoint_and_increasing(db):
    blocks = [seq_block(db()) for _ in range(3)]
    assert blocks == sorted(blocks) and len(set(blocks)) == 3
    assert all(b - a >= 1 << 40 for a, b in zip(blocks, blocks[1:]))


def test_a_commit_on_one_relay_wakes_another_within_milliseconds(db, pg_dsn):
    wakeups = Wakeups(pg_dsn)
    try:
        writer = db()
        waits = []
        for i in range(20):
            t0 = time.monotonic()
            with writer.transaction():
                fill(writer, 7, 1, first=100 + i)
                notify(writer, [7, 7])
            ready, _, _ = select.select([wakeups.fileno()], [], [], 5)
            assert ready, "no wake-up within 5 s"
            ids = wakeups.take()
            deadline = time.monotonic() + 5
            while not ids and time.monotonic() < deadline:  # the fd woke before the whole packet arrived
                ids = wakeups.take()
            waits.append(time.monotonic() - t0)
            assert ids == {7}
        waits.sort()
        assert waits[len(waits) // 2] < 0.05, f"median wake-up {waits[len(waits) // 2] * 1000:.1f} ms"
    finally:
        wakeups.close()


def test_seq_blocks_start_above_what_a_lone_relay_numbered(db):
    conn = db()
    conn.execute("INSERT INTO meta VALUES ('seq', %s) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                 ((5 << 40) + 7,))
    ensure_schema(conn)  # a shared relay starting
    assert seq_block(conn) >= 6 << 40


def test_a_claim_starts_past_a_seq_and_a_wake_up_says_the_lowest_seq(db, pg_dsn):
    fill(db(), 1, 10)
    assert [r.seq for r in Claims(db(), "a", 30).claim(1, 3, after=5)] == [6, 7, 8]
    wakeups = Wakeups(pg_dsn)
    try:
        writer = db()
        with writer.transaction():
            notify(writer, {1: 4, 2: 9})
        deadline = time.monotonic() + 5
        seen: dict = {}
        while len(seen) < 2 and time.monotonic() < deadline:
            select.select([wakeups.fileno()], [], [], 0.5)
            seen.update(wakeups.take_seqs())
        assert seen == {1: 4, 2: 9}
    finally:
        wakeups.close()
