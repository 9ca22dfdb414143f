"""Scale-out benchmark: one relay on SQLite, one on PostgreSQL, and 1, 2
and 3 relays serving at once over one PostgreSQL (`relay --shared`).

    python bench/scale.py                 # table
    python bench/scale.py --json          # one JSON object
    python bench/scale.py --count 5000    # a quick run
    python bench/scale.py --only shared   # the --shared rows only

Setups: one relay on SQLite; one relay on PostgreSQL; one relay on a
PostgreSQL primary with a synchronous standby (both on this machine: a
confirm waits for the standby's flush); 1, 2 and 3 relays started with
`--store postgresql://... --shared` on one database.

Each relay gets its own client processes, pinned to it (relay=its
endpoint): a sender that sends count/N messages of 1 KiB to its own
mailbox, pipelined (send_many in chunks of 10,000), then a consumer that
takes them through the same relay (prefetch 1000) and acks each one.  The
clients of all relays start together (they connect, say "ready", and go
on one word); a phase's rate is all its messages over the time from the
first client's start to the last one's end.

CPU per message: user + system time (/proc/PID/stat) of each relay process
and of the PostgreSQL server (the postmaster and every backend) over each
phase, divided by the phase's messages.  On this 2-core machine 3 relays,
PostgreSQL and the clients exceed the cores, so wall-clock rates of the
multi-relay rows are bounded by the cores, not by the design; the CPU
figures give the rates "on paper": messages per relay-CPU-second (what
one relay would do with a core of its own) and messages per
PostgreSQL-CPU-second (where one core of database would cap the fabric).

PostgreSQL runs in a temp dir, started here as the tests start it
(tests/pgserver.py: unix socket, fsync on unless --no-fsync,
synchronous_commit on).  A relay without `--shared` (a build before it)
makes the shared rows say "needs --shared (not built)".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from murano_zmq.testing import RelayProcess, free_tcp_endpoint  # noqa: E402
from tests.pgserver import PostgresServer, find_bindir, new_schema  # noqa: E402

BODY = b"x" * 1024
CHUNK = 10_000
TICKS = os.sysconf("SC_CLK_TCK")
NOT_BUILT = "needs --shared (not built)"


# --- the client processes ---------------------------------------------------------


def client(role: str, endpoint: str, mailbox: str, count: int) -> int:
    """(a child) connect, say ready, wait for "go", run, print the times."""
    from murano_zmq import Node

    with Node(f"bench-{role}-{os.getpid()}", relay=endpoint, timeout=120) as node:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        t0 = time.time()
        if role == "consume":
            consumer = node.consume(mailbox, prefetch=1000)
        if role == "send":
            for start in range(0, count, CHUNK):
                node.send_many([(mailbox, BODY)] * min(CHUNK, count - start), timeout=120)
        else:
            for _ in range(count):
                m = consumer.get(timeout=60)
                if m is None:
                    print(json.dumps({"error": "consumer starved: messages missing"}), flush=True)
                    return 1
                m.ack()
        t1 = time.time()
    # after close(): the last acks are out
    usage = os.times()
    print(json.dumps({"t0": t0, "t1": t1, "cpu": usage.user + usage.system}), flush=True)
    return 0


# --- CPU of processes -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, seconds (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def tree(root: int) -> list[int]:
    """`root` and its children (a postmaster and its backends)."""
    pids = [root]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == root:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return pids


class CpuMeter:
    """CPU seconds of the relays and the database server over a phase."""

    def __init__(self, relays: list, pg: PostgresServer | None):
        self.relays = relays
        self.pg = pg

    def snapshot(self) -> dict:
        snap = {"relays": [cpu_seconds(r.pid) for r in self.relays]}
        if self.pg is not None:
            snap["pg"] = {pid: cpu_seconds(pid) for pid in tree(self.pg.pid)}
        return snap

    def settle(self, timeout: float = 3.0) -> None:
        """Wait (bounded) until the relays stop using CPU: the last acks and
        commits of a phase count in it."""
        deadline = time.monotonic() + timeout
        last = self.snapshot()["relays"]
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.snapshot()["relays"]
            if all(b - a < 0.015 for a, b in zip(last, now)):
                return
            last = now

    @staticmethod
    def used(before: dict, after: dict) -> dict:
        out = {"relays": [b - a for a, b in zip(before["relays"], after["relays"])]}
        if "pg" in before:  # backends that started meanwhile count from 0
            out["pg"] = sum(cpu - before["pg"].get(pid, 0.0) for pid, cpu in after["pg"].items())
        return out


def run_phase(role: str, relays: list, count: int, meter: CpuMeter) -> dict:
    """One client of `role` per relay, all started together."""
    share = count // len(relays)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client", role, r.endpoint,
                               f"scale.{i}", str(share)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for i, r in enumerate(relays)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {role} client did not start")
        before = meter.snapshot()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline() or '{"error": "no result"}') for p in procs]
        for p in procs:
            p.wait(60)
        meter.settle()
        after = meter.snapshot()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for r in results:
        if "error" in r:
            raise RuntimeError(f"{role} client: {r['error']}")
    done = share * len(relays)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    used = CpuMeter.used(before, after)
    out = {"per_s": round(done / wall), "relay_cpu_us": [round(c / share * 1e6, 1) for c in used["relays"]],
           "client_cpu_us": round(sum(r["cpu"] for r in results) / done * 1e6, 1)}
    if "pg" in used:
        out["pg_cpu_us"] = round(used["pg"] / done * 1e6, 1)
    relay_cpu = sum(used["relays"])
    out["per_relay_cpu_s"] = round(done / relay_cpu) if relay_cpu > 0 else None
    if used.get("pg"):
        out["per_pg_cpu_s"] = round(done / used["pg"])
    return out


def run_setup(tmp: str, name: str, count: int, n: int = 1, pg: PostgresServer | None = None,
              extra: tuple = ()) -> dict:
    relays = []
    try:
        for i in range(n):
            log = open(os.path.join(tmp, f"{name}-{i}.log"), "wb")
            relays.append(RelayProcess(free_tcp_endpoint(), os.path.join(tmp, f"{name}-{i}"), *extra,
                                       log_file=log).start(timeout=60))
        meter = CpuMeter(relays, pg)
        sends = run_phase("send", relays, count, meter)
        acks = run_phase("consume", relays, count, meter)
    finally:
        for r in relays:
            r.stop()
            if r.log_file is not None:
                r.log_file.close()
    return {"relays": n, "sends_per_s": sends.pop("per_s"), "consume_ack_per_s": acks.pop("per_s"),
            "send": sends, "consume_ack": acks}


def shared_supported() -> bool:
    """Does this build's relay take --shared?"""
    out = subprocess.run([sys.executable, "-m", "murano_zmq", "relay", "--help"], capture_output=True,
                         text=True, timeout=60)
    return "--shared" in out.stdout


# --- the run and the table ----------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20_000, help="messages per setup (default %(default)s)")
    ap.add_argument("--no-fsync", action="store_true", help="PostgreSQL with fsync=off (as the tests run it)")
    ap.add_argument("--only", choices=["single", "shared"], help="only the 1-relay rows, or only the shared ones")
    ap.add_argument("--max-relays", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", nargs=4, metavar=("ROLE", "ENDPOINT", "MAILBOX", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        role, endpoint, mailbox, count = args.client
        return client(role, endpoint, mailbox, int(count))
    bindir = find_bindir()
    if bindir is None:
        print("scale.py: PostgreSQL not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    results: dict[str, dict | str] = {}
    durable = {} if args.no_fsync else {"fsync": "on", "full_page_writes": "on"}
    with tempfile.TemporaryDirectory(prefix="mzscale-") as tmp:
        if args.only != "shared":
            results["1 relay, SQLite"] = run_setup(tmp, "sqlite", args.count)
            pg = PostgresServer(bindir, settings=durable)
            try:
                pg.init().start()
                results["1 relay, PostgreSQL"] = run_setup(tmp, "pg1", args.count, pg=pg,
                                                           extra=("--store", pg.url(new_schema(pg.dsn()))))
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
                results["1 relay, PG + sync standby"] = run_setup(tmp, "pgsync", args.count, pg=primary,
                                                                  extra=("--store", url))
            finally:
                if standby is not None:
                    standby.cleanup()
                primary.cleanup()
        if args.only != "single":
            counts = range(1, args.max_relays + 1)
            if not shared_supported():
                for n in counts:
                    results[f"{n} relay{'s' if n > 1 else ''}, PostgreSQL --shared"] = NOT_BUILT
            else:
                for n in counts:
                    pg = PostgresServer(bindir, settings=durable)  # a fresh server per row
                    try:
                        pg.init().start()
                        url = pg.url(new_schema(pg.dsn()))
                        results[f"{n} relay{'s' if n > 1 else ''}, PostgreSQL --shared"] = run_setup(
                            tmp, f"shared{n}", args.count, n, pg=pg, extra=("--store", url, "--shared"))
                    finally:
                        pg.cleanup()
    meta = {"count": args.count, "pg_fsync": not args.no_fsync, "cores": os.cpu_count()}
    if args.json:
        print(json.dumps({**meta, "results": results}))
        return 0
    print_table(meta, results)
    return 0


def print_table(meta: dict, results: dict) -> None:
    print(f"{meta['count']} messages of 1 KiB per setup; PostgreSQL fsync {'on' if meta['pg_fsync'] else 'off'}; "
          f"{meta['cores']} cores")
    print("CPU: microseconds per message (relays: each relay's, per message through it; PostgreSQL: "
          "all backends, per message)")
    head = (f"{'setup':<32} {'sends/s':>8} {'cons+ack/s':>10} | {'send: relay µs':>16} {'pg µs':>6} "
            f"{'msg/relay-cpu-s':>15} {'msg/pg-cpu-s':>12} | {'ack: relay µs':>16} {'pg µs':>6} "
            f"{'msg/relay-cpu-s':>15} {'msg/pg-cpu-s':>12}")
    print(head)
    for setup, r in results.items():
        if isinstance(r, str):
            print(f"{setup:<32} {r}")
            continue
        cells = []
        for phase in ("send", "consume_ack"):
            p = r[phase]
            cells.append(f"{'/'.join(f'{c:g}' for c in p['relay_cpu_us']):>16} {p.get('pg_cpu_us', '-'):>6} "
                         f"{p['per_relay_cpu_s'] or '-':>15} {p.get('per_pg_cpu_s', '-'):>12}")
        print(f"{setup:<32} {r['sends_per_s']:>8} {r['consume_ack_per_s']:>10} | {cells[0]} | {cells[1]}")
    paper = on_paper(results)
    if paper:
        print()
        print("On paper (each relay on a core of its own; database cores as needed):")
        for line in paper:
            print("  " + line)


def on_paper(results: dict) -> list[str]:
    """Rates the CPU figures give where the cores run out: N relays, each
    on a core at its measured messages per relay-CPU-second, against one
    relay --shared; one core of PostgreSQL caps them at its measured
    messages per PostgreSQL-CPU-second, and keeping up takes that many
    database cores."""
    lines = []
    base = results.get("1 relay, PostgreSQL --shared")
    for setup, r in results.items():
        if isinstance(r, str) or "--shared" not in setup:
            continue
        for phase, label in (("send", "sends/s"), ("consume_ack", "consume+ack/s")):
            p = r[phase]
            relays = r["relays"] * (p["per_relay_cpu_s"] or 0)
            db = p.get("per_pg_cpu_s") or 0
            ratio = ""
            if isinstance(base, dict) and base[phase]["per_relay_cpu_s"] and r["relays"] > 1:
                ratio = f" = {relays / base[phase]['per_relay_cpu_s']:.1f}x one relay"
            need = f"; the database needs {relays / db:.1f} cores to keep up, one core caps it at {db:,}" if db else ""
            lines.append(f"{setup}: {label} {relays:,} relay-bound ({r['relays']} x "
                         f"{p['per_relay_cpu_s'] or 0:,}{ratio}){need}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
