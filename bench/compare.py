"""murano-zmq side by side with RabbitMQ, on Murano's workloads.

    python bench/compare.py --quick                 # ~3 minutes: a smoke run
    python bench/compare.py                         # the full run: ~15 minutes on 2 cores
    python bench/compare.py --json > out.json --chart docs/compare.png

Each workload runs on murano-zmq (through Node and through AsyncNode, one
fresh relay per run) and on RabbitMQ (pika; durable queue, persistent
messages, publisher confirms, manual acks, prefetch 100), with 1 KiB and
64 KiB bodies, all on loopback:

  latency    one-at-a-time durable send, returning after the confirm: p50, p99
  pipelined  durable sends/s with many in flight (send_many / async confirms)
  consume    consume + ack of a backlog (100,000; 10,000 at 64 KiB)
  roundtrip  request -> agent process -> reply (the conductor -> agent ->
             conductor hop; both sends durable): p50, p99
  offline    10,000 messages into 1,000 mailboxes with a TTL, then the
             consumers appear: time to drain
  expiry     10,000 idle mailboxes with a TTL: time from the last declare
             until all are gone, and the server's RSS after
  fanout     progress events to 10 subscribers (murano-zmq topics vs a
             fanout exchange): events/s delivered

Systems run A B A B (--pairs, at least 3): each pair runs every system once
per workload, the order rotated by one system from pair to pair (the first
run of a workload can pay for the machine: on this VM, memory it lent back
to its host faulted in again, doubling the relay's system time); the table
shows medians over the pairs and the median of the per-pair ratios,
oriented so that > 1 means murano-zmq is better.  A third
column is the floor relay (bench/floor_relay.py, latency and pipelined
only): what the disk and pyzmq alone cost.  CPU per message is the client's
(getrusage, with its helper processes) and the server's (/proc/PID/stat of
the relay / beam.smp) over each measured phase.  Every client process,
murano-zmq's and pika's alike, keeps its freed heap
(murano_zmq.keep_freed_memory(), as the relay does), and a send_many call
holds at most 32 MiB of bodies.

RabbitMQ: --amqp URL uses a running broker (its beam.smp PID by --beam-pid
for CPU); otherwise bench/rabbitmq.sh starts a loopback-only one and stops
it at the end.  Without rabbitmq-server (apt-get install -y
rabbitmq-server) or pika (pip install pika, or the `bench` extra) only
murano-zmq's side runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from murano_zmq.testing import RelayProcess, free_tcp_endpoint  # noqa: E402

# (workload, metric, label, unit, better)
ROWS = [
    ("latency", "p50_us", "one-at-a-time durable send, p50", "µs", "lower"),
    ("latency", "p99_us", "one-at-a-time durable send, p99", "µs", "lower"),
    ("pipelined", "per_s", "pipelined durable sends", "msg/s", "higher"),
    ("consume", "per_s", "consume + ack of a backlog", "msg/s", "higher"),
    ("roundtrip", "p50_us", "request/reply round trip, p50", "µs", "lower"),
    ("roundtrip", "p99_us", "request/reply round trip, p99", "µs", "lower"),
    ("offline", "drain_s", "offline delivery: drain time", "s", "lower"),
    ("expiry", "gone_s", "idle mailboxes expiring: time until gone", "s", "lower"),
    ("expiry", "server_rss_mb", "idle mailboxes expiring: server RSS after", "MB", "lower"),
    ("fanout", "per_s", "progress fan-out to 10 subscribers", "events/s", "higher"),
]

FULL = {"latency": 2000, "pipelined": 100_000, "consume": 100_000, "roundtrip": 2000,
        "offline": 10_000, "expiry": 10_000, "fanout": 20_000}
QUICK = {"latency": 200, "pipelined": 5000, "consume": 4000, "roundtrip": 200,
         "offline": 1000, "expiry": 1000, "fanout": 1500}
BIG = 64 * 1024
BIG_COUNT_CAP = {"pipelined": 10_000, "consume": 10_000, "fanout": 5000}  # 64 KiB: disk and RAM
MAILBOXES = {"full": 1000, "quick": 100}
TTL = {"offline": 60.0, "expiry": 2.0}  # seconds; --quick expires after 1 s
SYSTEMS = ("node", "rabbitmq", "async", "floor")
FLOOR_WORKLOADS = ("latency", "pipelined")
ASYNC_SKIPS = ("fanout",)  # AsyncNode has no topics


def count_for(workload: str, size: int, quick: bool) -> int:
    n = (QUICK if quick else FULL)[workload]
    if size >= BIG and workload in BIG_COUNT_CAP:
        n = min(n, BIG_COUNT_CAP[workload] // (5 if quick else 1))
    return n


class RabbitMQ:
    """The broker for the run: given (--amqp), or started by bench/rabbitmq.sh."""

    def __init__(self, url: str | None, beam_pid: int | None):
        self.url, self.beam_pid, self.started, self.missing = url, beam_pid, False, None

    def __enter__(self) -> "RabbitMQ":
        try:
            import pika  # noqa: F401
        except ImportError:
            self.missing = "pika is not installed: pip install pika (or the bench extra)"
            return self
        if self.url:
            return self
        script = os.path.join(HERE, "rabbitmq.sh")
        out = subprocess.run([script, "start"], capture_output=True, text=True)
        if out.returncode != 0:
            self.missing = out.stderr.strip() or "bench/rabbitmq.sh start failed"
            return self
        self.started = True
        env = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
        self.url = env["AMQP_URL"]
        with open(os.path.join(env["STATE"], "beam.pid")) as f:
            self.beam_pid = int(f.read())
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            subprocess.run([os.path.join(HERE, "rabbitmq.sh"), "stop"], capture_output=True)


def run_worker(argv: list[str], timeout: float) -> dict:
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[0]} {argv[1:3]} failed: {out.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


RECYCLE_CAP = 2 << 30


def recycle_memory(tmp: str, nbytes: int) -> None:
    """Write `nbytes` to a file and delete it, so the next run's page cache
    and heap reuse memory this guest has touched before.  On a VM the first
    touch of a page is a fault in the hypervisor too: writing 64 KiB into
    fresh page cache cost ~160 µs of kernel CPU here, into reused pages
    ~20 µs, so without this whichever system ran first after a small
    workload paid for the memory every later one reused."""
    chunk = b"\0" * (1 << 20)
    path = os.path.join(tmp, "recycle")
    with open(path, "wb") as f:
        for _ in range(min(nbytes, RECYCLE_CAP) // len(chunk) + 1):
            f.write(chunk)
    os.unlink(path)


def run_one(system: str, workload: str, size: int, count: int, mode: str, tmp: str,
            rabbit: RabbitMQ) -> dict:
    recycle_memory(tmp, 2 * count * max(size, 1024))  # the relay's files, the client's buffers
    ttl = 1.0 if mode == "quick" and workload == "expiry" else TTL.get(workload)
    extra = [str(MAILBOXES[mode]), str(ttl)] if workload in TTL else []
    if system in ("node", "async"):
        endpoint = free_tcp_endpoint()
        data = tempfile.mkdtemp(dir=tmp)
        relay = RelayProcess(endpoint, data).start()
        try:
            return run_worker([os.path.join(HERE, "cmp_mz.py"), system, workload, str(size), str(count),
                               endpoint, str(relay.pid), *extra], 900)
        finally:
            relay.stop(60)
            shutil.rmtree(data, ignore_errors=True)
    if system == "rabbitmq":
        return run_worker([os.path.join(HERE, "cmp_rmq.py"), workload, str(size), str(count), rabbit.url,
                           str(rabbit.beam_pid or 0), *extra], 900)
    endpoint = free_tcp_endpoint()
    db = os.path.join(tempfile.mkdtemp(dir=tmp), "floor.db")
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "floor_relay.py"), "serve", endpoint, db],
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        return run_worker([os.path.join(HERE, "floor_relay.py"), workload, str(size), str(count), endpoint,
                           str(server.pid)], 900)
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def plan(args) -> list[tuple[str, int]]:
    sizes = [int(s) for s in args.sizes.split(",")]
    out = []
    for workload in dict.fromkeys(r[0] for r in ROWS):
        if args.workloads and workload not in args.workloads.split(","):
            continue
        for size in ([0] if workload == "expiry" else sizes):
            out.append((workload, size))
    return out


def oriented(mz: float, other: float, better: str) -> float | None:
    if not mz or not other:
        return None
    return other / mz if better == "lower" else mz / other


def summarize(runs: dict, args) -> list[dict]:
    rows = []
    for workload, metric, label, unit, better in ROWS:
        for (w, size), by_system in runs.items():
            if w != workload:
                continue
            row = {"workload": label + (f" ({size // 1024} KiB)" if size else ""), "key": f"{w}.{metric}",
                   "size": size, "unit": unit, "better": better}
            medians = {}
            for system, results in by_system.items():
                values = [r["metrics"][metric] for r in results if r and metric in r["metrics"]]
                if values:
                    medians[system] = statistics.median(values)
                    row[f"{system}_values"] = [round(v, 4) for v in values]
                    row[f"{system}_cpu_us_per_msg"] = cpu_per_message(results)
            row["murano_zmq"] = medians.get("node")
            row["murano_zmq_async"] = medians.get("async")
            row["rabbitmq"] = medians.get("rabbitmq")
            row["floor"] = medians.get("floor")
            for system, key in (("node", "ratio"), ("async", "ratio_async"), ("floor", "ratio_floor")):
                pairs = [oriented(a["metrics"].get(metric), b["metrics"].get(metric), better)
                         for a, b in zip(by_system.get(system, []), by_system.get("rabbitmq", []))
                         if a and b]
                pairs = [p for p in pairs if p is not None]
                row[key] = statistics.median(pairs) if pairs else None
                row[key + "_per_pair"] = [round(p, 2) for p in pairs]
            rows.append(row)
    return rows


def cpu_per_message(results: list[dict]) -> dict:
    ok = [r for r in results if r and r.get("messages")]
    if not ok:
        return {}
    return {"client": round(statistics.median(r["client_cpu_s"] / r["messages"] * 1e6 for r in ok), 1),
            "server": round(statistics.median(r["server_cpu_s"] / r["messages"] * 1e6 for r in ok), 1)}


def fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:,.0f} {unit}"


def table(rows: list[dict]) -> str:
    head = ["workload", "murano-zmq Node", "AsyncNode", "RabbitMQ", "floor relay", "ratio Node",
            "ratio Async", "CPU µs/msg relay+client (Node)", "CPU µs/msg broker+client (RabbitMQ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        def cpu(system):
            c = r.get(f"{system}_cpu_us_per_msg") or {}
            return f"{c['server']:.0f} + {c['client']:.0f}" if c else "—"
        ratio = lambda v: f"{v:.2f}×" if v is not None else "—"  # noqa: E731
        lines.append("| " + " | ".join([
            r["workload"], fmt(r["murano_zmq"], r["unit"]), fmt(r["murano_zmq_async"], r["unit"]),
            fmt(r["rabbitmq"], r["unit"]), fmt(r["floor"], r["unit"]), ratio(r["ratio"]),
            ratio(r["ratio_async"]), cpu("node"), cpu("rabbitmq")]) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio"] is not None or r["ratio_async"] is not None][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(shown) + 1.6))
    ys = range(len(shown))
    ax.barh([y + 0.2 for y in ys], [r["ratio"] or 0 for r in shown], height=0.4, label="Node")
    ax.barh([y - 0.2 for y in ys], [r["ratio_async"] or 0 for r in shown], height=0.4, label="AsyncNode")
    ax.set_yticks(list(ys), [r["workload"] for r in shown], fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16) if t <= max(
        [r["ratio"] or 0 for r in shown] + [r["ratio_async"] or 0 for r in shown] + [2]) * 2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1, color="black", linewidth=1)
    ax.axvline(2, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("murano-zmq vs RabbitMQ (> 1: murano-zmq better; median of per-pair ratios)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def chart_title(info: dict) -> str:
    return (f"murano-zmq vs RabbitMQ: {info['mode']} run, {info['pairs']} pairs, "
            f"{info['machine'].split(' (')[0]}, load {info['machine'].rsplit('load ', 1)[-1]}")


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import sqlite3
    import zmq
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, pyzmq {zmq.__version__} "
            f"(libzmq {zmq.zmq_version()}), SQLite {sqlite3.sqlite_version}, load {os.getloadavg()[0]:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts (a few minutes): smoke runs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart of the ratios (needs matplotlib)")
    parser.add_argument("--pairs", type=int, default=3, help="A B rounds (at least 3 for the medians)")
    parser.add_argument("--sizes", default=f"1024,{BIG}", help="body sizes in bytes, comma separated")
    parser.add_argument("--workloads", default="", help="only these, comma separated: " +
                        ",".join(dict.fromkeys(r[0] for r in ROWS)))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="of " + ",".join(SYSTEMS))
    parser.add_argument("--amqp", help="use this running RabbitMQ instead of starting one")
    parser.add_argument("--beam-pid", type=int, help="with --amqp: the broker's beam.smp PID (for CPU)")
    parser.add_argument("--replot", metavar="JSON", help="no run: table (and --chart) from a saved --json output")
    args = parser.parse_args()
    if args.replot:
        try:
            with open(args.replot) as f:
                info = json.load(f)
            info["workloads"], info["machine"]  # noqa: B018 - the keys a replot needs
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"--replot {args.replot}: not a compare.py --json output ({exc})", file=sys.stderr)
            return 2
        if args.chart:
            chart(info["workloads"], args.chart, chart_title(info))
        print(f"{info['machine']}\n{info['command']}: {info['seconds']} s, {info['pairs']} pairs\n")
        print(table(info["workloads"]))
        return 0
    mode = "quick" if args.quick else "full"
    names = list(dict.fromkeys(r[0] for r in ROWS))
    wrong = [w for w in args.workloads.split(",") if w and w not in names] + \
        [s for s in args.systems.split(",") if s not in SYSTEMS]
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        sizes = [0]
    if wrong or args.pairs < 1 or min(sizes) < 16:
        parser.error(f"unknown workload/system {wrong}" if wrong else
                     "--pairs must be >= 1 and --sizes whole numbers of bytes >= 16")
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    started = time.time()
    runs: dict = {}
    with RabbitMQ(args.amqp, args.beam_pid) as rabbit, \
            tempfile.TemporaryDirectory(prefix="murano-zmq-compare-") as tmp:
        if rabbit.missing and "rabbitmq" in systems:
            print(f"RabbitMQ side skipped: {rabbit.missing}", file=sys.stderr)
            systems.remove("rabbitmq")
        for pair in range(args.pairs):
            for workload, size in plan(args):
                count = count_for(workload, size, args.quick)
                for system in systems[pair % len(systems):] + systems[:pair % len(systems)]:
                    if (system == "floor" and workload not in FLOOR_WORKLOADS) or \
                            (system == "async" and workload in ASYNC_SKIPS):
                        continue
                    t0 = time.time()
                    try:
                        result = run_one(system, workload, size, count, mode, tmp, rabbit)
                    except Exception as exc:  # one failed run must not lose the others
                        print(f"  {system} {workload} {size}: FAILED {exc}", file=sys.stderr)
                        result = None
                    runs.setdefault((workload, size), {}).setdefault(system, []).append(result)
                    print(f"pair {pair + 1}/{args.pairs} {workload:<9} {size:>6} B {system:<8} "
                          f"{time.time() - t0:5.1f} s", file=sys.stderr, flush=True)
    rows = summarize(runs, args)
    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    info = {"machine": machine(), "command": command.strip(), "seconds": round(time.time() - started),
            "pairs": args.pairs, "mode": mode, "workloads": rows}
    if args.chart:
        chart(rows, args.chart, chart_title(info))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{info['machine']}\n{info['command']}: {info['seconds']} s, {args.pairs} pairs\n")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
