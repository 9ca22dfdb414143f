"""What storing a message costs, by layout: the evidence for the relay's next
store design (docs/performance.md, "Where a stored message's CPU goes").

    python bench/store_rows.py [--count 100000] [--per 100] [--group 5] [--size 1024] [--rate 60000] [--rounds 2] [--json]

Pipelined sends arrive as SEND commands of --per records, and the relay
commits several at once (a turn's worth: --group SENDs per commit).  Each
layout stores --count messages so, then settles them (acks of a SEND's
worth each, --group of them per commit), and the table gives this
process's CPU per message (user and system, getrusage) for each phase, and
messages/s:

  row per message   the relay's own schema and INSERT (store/schema.py,
                    store/sqlite.py): a row, an id index entry and a mailbox
                    index entry per message; settled by a range DELETE
  row per SEND      one row per SEND command: the records as the SEND
                    frame packed them, and their ids; settled by one DELETE
  append-only log   one write() of the packed SEND to a file of its own

Every commit is durable as the relay's are: SQLite in WAL mode (with the
relay's page size and page cache) at synchronous=FULL (an fdatasync of the WAL per
commit), and a PASSIVE checkpoint after 200 commits or 4 MiB of bodies, the
relay's thresholds (store/checkpoint.py), so the WAL restarts as the
relay's does; the log runs an fdatasync per group of writes.  The rounds
alternate the layouts.  No relay and no sockets: the store's share of a
relay's CPU per message, and how far each layout would let it go.  (Here
each SEND is packed before it is stored: the relay would store the frame
as it came, so the row-per-SEND figures are, if anything, high.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import time

import msgpack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cmp_common import pct  # noqa: E402

from murano_zmq.protocol.message import new_message_ids  # noqa: E402
from murano_zmq.store.checkpoint import CHECKPOINT_BYTES, CHECKPOINT_COMMITS  # noqa: E402
from murano_zmq.store.schema import CACHE_KIB, PAGE_SIZE, SCHEMA  # noqa: E402
from murano_zmq.store.sqlite import _INSERT_PLAIN  # noqa: E402  (the relay's usual INSERT, MultiRowInsert)

LAYOUTS = ("row per message", "row per SEND", "append-only log")


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class Phase:
    """CPU and wall time of one phase, per message."""

    def __init__(self, count: int):
        self.count = count
        self.t0, self.c0 = time.perf_counter(), cpu()

    def done(self) -> dict:
        seconds = time.perf_counter() - self.t0
        (u0, s0), (u1, s1) = self.c0, cpu()
        return {"user_us": (u1 - u0) / self.count * 1e6, "sys_us": (s1 - s0) / self.count * 1e6,
                "per_s": self.count / seconds}


def open_db(path: str, schema: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # the relay's
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    db.executescript(schema)
    return db


def groups(sends: list, group: int):
    """(first SEND's index, its group of SENDs): one commit each."""
    for first in range(0, len(sends), group):
        yield first, sends[first:first + group]


class Committer:
    """Commits, and a checkpoint when the relay's thresholds are reached."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.commits = self.nbytes = 0

    def __call__(self, sql, params: list, nbytes: int = 0) -> None:
        """sql: a statement for executemany(), or a MultiRowInsert and its flat parameters."""
        db = self.db
        db.execute("BEGIN")
        if isinstance(sql, str):
            db.executemany(sql, params)
        else:
            sql.run(db, params)
        db.execute("COMMIT")
        self.commits += 1
        self.nbytes += nbytes
        if self.commits >= CHECKPOINT_COMMITS or self.nbytes >= CHECKPOINT_BYTES:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.commits = self.nbytes = 0


def row_per_message(tmp: str, sends: list, per: int, group: int, count: int) -> dict:
    db = open_db(os.path.join(tmp, "rows.db"), SCHEMA)
    commit = Committer(db)
    phase = Phase(count)
    for first, some in groups(sends, group):
        params = [x for k, (req, records) in enumerate(some) for i, r in enumerate(records)
                  for x in ((first + k) * per + i, 1, r[0], r[3], r[4], 0)]
        commit(_INSERT_PLAIN, params, sum(len(r[3]) for req, records in some for r in records))
    stored = phase.done()
    phase = Phase(count)
    for first, some in groups(sends, group):
        commit("DELETE FROM messages WHERE seq>=? AND seq<=?",
               [(k * per, k * per + per - 1) for k in range(first, first + len(some))])
    settled = phase.done()
    db.close()
    return {"store": stored, "settle": settled}


def row_per_send(tmp: str, sends: list, per: int, group: int, count: int) -> dict:
    db = open_db(os.path.join(tmp, "sends.db"), "CREATE TABLE IF NOT EXISTS sends "
                 "(seq INTEGER PRIMARY KEY, mailbox INTEGER, count INTEGER, ids BLOB, records BLOB)")
    commit = Committer(db)
    phase = Phase(count)
    for first, some in groups(sends, group):
        # (each SEND's frame packed here, as it would come off the socket; its ids kept for dedup)
        rows = [(first + k, len(records), b"".join(r[0] for r in records), msgpack.packb([req, records]))
                for k, (req, records) in enumerate(some)]
        commit("INSERT INTO sends VALUES (?, 1, ?, ?, ?)", rows, sum(len(r[3]) for r in rows))
    stored = phase.done()
    phase = Phase(count)
    for first, some in groups(sends, group):
        commit("DELETE FROM sends WHERE seq=?", [(k,) for k in range(first, first + len(some))])
    settled = phase.done()
    db.close()
    return {"store": stored, "settle": settled}


def append_only_log(tmp: str, sends: list, per: int, group: int, count: int) -> dict:
    fd = os.open(os.path.join(tmp, "sends.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    phase = Phase(count)
    for first, some in groups(sends, group):
        for req, records in some:
            frame = msgpack.packb([req, records])
            os.write(fd, len(frame).to_bytes(4, "little") + frame)
        os.fdatasync(fd)
    stored = phase.done()
    os.close(fd)
    return {"store": stored, "settle": None}


RUNS = {"row per message": row_per_message, "row per SEND": row_per_send, "append-only log": append_only_log}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="messages per layout and round (100,000)")
    parser.add_argument("--per", type=int, default=100, help="records per SEND (100)")
    parser.add_argument("--group", type=int, default=5, help="SENDs per commit (5)")
    parser.add_argument("--size", type=int, default=1024, help="body bytes (1024)")
    parser.add_argument("--rate", type=float, default=60_000,
                        help="the sender's messages/s, which spaces the ids' clocks (60,000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the layouts alternating (2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.count < args.per or min(args.per, args.group, args.rounds) < 1 or args.size < 0 or args.rate <= 0:
        parser.error("--count must be at least --per; --per, --group and --rounds at least 1; "
                     "--size not negative; --rate above 0")
    count = args.count // args.per * args.per
    body, now = b"x" * args.size, time.time()
    # Ids as a sender makes them (new_message_ids(): one clock per SEND), the
    # clock moving on at --rate: ids of one millisecond have random low bits,
    # so one clock for all would make every id index insert a random one.
    sends = []
    for req in range(count // args.per):
        at = now + req * args.per / args.rate
        sends.append((req, [[m, "bench", b"", body, at, None, False] for m in new_message_ids(at, args.per)]))
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name in LAYOUTS:
            tmp = tempfile.mkdtemp(prefix="store-rows-")
            try:
                results[name].append(RUNS[name](tmp, sends, args.per, args.group, count))
            finally:
                shutil.rmtree(tmp)
    summary = []
    for name in LAYOUTS:
        row = {"layout": name, "rounds": results[name]}
        for phase in ("store", "settle"):
            runs = [r[phase] for r in results[name] if r[phase] is not None]
            row[phase] = {k: pct([r[k] for r in runs], 50) for k in ("user_us", "sys_us", "per_s")} if runs else None
        summary.append(row)
    if args.json:
        print(json.dumps({"count": count, "per": args.per, "group": args.group, "size": args.size,
                          "layouts": summary}, indent=1))
        return 0
    print(f"{count:,} messages of {args.size:,} B, {args.per} per SEND, {args.group} SENDs per commit, "
          f"medians of {args.rounds} round(s)")
    print("| layout | store: µs CPU/msg (user + sys) | store msg/s | settle: µs CPU/msg (user + sys) | settle msg/s |")
    print("| --- | --- | --- | --- | --- |")
    for row in summary:
        cells = []
        for phase in ("store", "settle"):
            p = row[phase]
            cells += ["—", "—"] if p is None else [
                f"{p['user_us'] + p['sys_us']:.1f} ({p['user_us']:.1f} + {p['sys_us']:.1f})", f"{p['per_s']:,.0f}"]
        print(f"| {row['layout']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
