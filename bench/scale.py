"""Scale-out benchmark: one relay on SQLite next to one relay on PostgreSQL.

    python bench/scale.py                 # table
    python bench/scale.py --json          # one JSON object
    python bench/scale.py --count 5000    # a quick run

Setups: one relay on SQLite; one relay on PostgreSQL; one relay on a
PostgreSQL primary with a synchronous standby (both on this machine: a
confirm waits for the standby's flush).  For each: pipelined durable sends per second (send_many in chunks
of 10,000, 1 KiB bodies) and consume + ack per second (one consumer,
prefetch 1000) of what was sent.  PostgreSQL runs in a temp dir, started
here as the tests start it (tests/pgserver.py: unix socket, fsync on unless
--no-fsync, synchronous_commit on).

2 and 3 relays over one PostgreSQL are not measured: several relays over
one database are not built yet (docs/scale-out.md); those rows say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from murano_zmq import Node  # noqa: E402
from murano_zmq.testing import RelayProcess, free_tcp_endpoint  # noqa: E402
from tests.pgserver import PostgresServer, find_bindir, new_schema  # noqa: E402

BODY = b"x" * 1024


def measure(endpoint: str, count: int) -> dict:
    with Node("bench-sender", relay=endpoint, timeout=120) as node:
        t0 = time.perf_counter()
        for start in range(0, count, 10_000):
            node.send_many([("scale", BODY)] * min(10_000, count - start), timeout=120)
        sends = count / (time.perf_counter() - t0)
    with Node("bench-consumer", relay=endpoint, timeout=120) as node:
        consumer = node.consume("scale", prefetch=1000)
        t0 = time.perf_counter()
        for _ in range(count):
            m = consumer.get(timeout=60)
            if m is None:
                raise RuntimeError("consumer starved: messages missing")
            m.ack()
        acks = count / (time.perf_counter() - t0)
    return {"sends_per_s": round(sends), "consume_ack_per_s": round(acks)}


def run_relay(tmp: str, name: str, count: int, *extra: str) -> dict:
    log = open(os.path.join(tmp, f"{name}.log"), "wb")
    relay = RelayProcess(free_tcp_endpoint(), os.path.join(tmp, name), *extra, log_file=log).start()
    try:
        return measure(relay.endpoint, count)
    finally:
        relay.stop()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20_000, help="messages per setup (default %(default)s)")
    ap.add_argument("--no-fsync", action="store_true", help="PostgreSQL with fsync=off (as the tests run it)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("scale.py: PostgreSQL not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="mzscale-") as tmp:
        results["1 relay, SQLite"] = run_relay(tmp, "sqlite", args.count)
        durable = {} if args.no_fsync else {"fsync": "on", "full_page_writes": "on"}
        pg = PostgresServer(bindir, settings=durable)
        try:
            pg.init().start()
            url = pg.url(new_schema(pg.dsn()))
            results["1 relay, PostgreSQL"] = run_relay(tmp, "pg1", args.count, "--store", url)
        finally:
            pg.cleanup()
        # A confirm on two machines (here: two servers on this one).
        primary = PostgresServer(bindir, settings={**durable, "synchronous_standby_names": "'standby1'"})
        standby = None
        try:
            primary.init().start()
            standby = primary.standby("standby1")
            standby.start()
            url = primary.url(new_schema(primary.dsn()))
            results["1 relay, PG + sync standby"] = run_relay(tmp, "pgsync", args.count, "--store", url)
        finally:
            if standby is not None:
                standby.cleanup()
            primary.cleanup()
    for n in (2, 3):
        results[f"{n} relays, PostgreSQL"] = "not built (docs/scale-out.md)"
    if args.json:
        print(json.dumps({"count": args.count, "pg_fsync": not args.no_fsync, "results": results}))
        return 0
    print(f"{args.count} messages of 1 KiB per setup; PostgreSQL fsync {'off' if args.no_fsync else 'on'}")
    print(f"{'setup':<28} {'sends/s':>10} {'consume+ack/s':>14}")
    for setup, r in results.items():
        if isinstance(r, str):
            print(f"{setup:<28} {r}")
        else:
            print(f"{setup:<28} {r['sends_per_s']:>10} {r['consume_ack_per_s']:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
