"""Relay benchmark: durable sends, send latency, consume+ack, round trip,
and the relay's memory and restart time with a large backlog.

    python bench/relay.py            # table
    python bench/relay.py --json     # one JSON object
    python bench/relay.py --backlog 0 --count 20000   # skip the 1M backlog part

Everything runs on loopback against a relay child process; 1 KiB bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from murano_zmq import Node  # noqa: E402
from murano_zmq.testing import RelayProcess, free_tcp_endpoint, rss_mb  # noqa: E402

BODY = b"x" * 1024

ECHO = """
import sys
from murano_zmq import Node
with Node("echo", relay=sys.argv[1]) as node:
    requests = node.consume("rt.request", prefetch=10)
    print("ready", flush=True)
    while True:
        m = requests.get(timeout=60)
        if m is None or m.body == b"stop":
            break
        node.send_async("rt.reply", m.body)
        m.ack()
"""


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def bench_pipelined(node: Node, count: int) -> dict:
    """send_many in chunks of 10,000: one waiter per chunk."""
    t0 = time.perf_counter()
    for start in range(0, count, 10_000):
        node.send_many([("bench.pipe", BODY)] * min(10_000, count - start), timeout=120)
    dt = time.perf_counter() - t0
    return {"messages": count, "seconds": round(dt, 3), "per_second": round(count / dt)}


def bench_futures(node: Node, count: int) -> dict:
    """send_async per message: a future each."""
    t0 = time.perf_counter()
    futures = [node.send_async("bench.futures", BODY) for _ in range(count)]
    for f in futures:
        f.result(120)
    dt = time.perf_counter() - t0
    return {"messages": count, "seconds": round(dt, 3), "per_second": round(count / dt)}


def bench_send_latency(node: Node, count: int) -> dict:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        node.send("bench.lat", BODY)
        samples.append(time.perf_counter() - t0)
    return {"messages": count, "p50_us": round(pct(samples, 50) * 1e6), "p99_us": round(pct(samples, 99) * 1e6)}


def bench_consume(node: Node, count: int) -> dict:
    consumer = node.consume("bench.pipe", prefetch=1000)
    t0 = time.perf_counter()
    for _ in range(count):
        m = consumer.get(timeout=30)
        if m is None:
            raise RuntimeError("consume stalled")
        m.ack()
    dt = time.perf_counter() - t0
    consumer.cancel()
    return {"messages": count, "seconds": round(dt, 3), "per_second": round(count / dt)}


def bench_round_trip(node: Node, endpoint: str, count: int) -> dict:
    echo = subprocess.Popen([sys.executable, "-c", ECHO, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().strip() == "ready"
        replies = node.consume("rt.reply", prefetch=10)
        samples = []
        for i in range(count + 100):
            t0 = time.perf_counter()
            node.send_async("rt.request", BODY)
            m = replies.get(timeout=30)
            if m is None:
                raise RuntimeError("no reply")
            m.ack()
            if i >= 100:  # warm-up
                samples.append(time.perf_counter() - t0)
        node.send("rt.request", b"stop")
        echo.wait(30)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait(10)
    return {"round_trips": count, "p50_us": round(pct(samples, 50) * 1e6), "p99_us": round(pct(samples, 99) * 1e6)}


def bench_backlog(count: int, tmp: str) -> dict:
    """Queue `count` messages, read the relay's RSS, restart it, time the first delivery."""
    endpoint = free_tcp_endpoint()
    data = os.path.join(tmp, "backlog")
    relay = RelayProcess(endpoint, data).start()
    try:
        with Node("filler", relay=endpoint, timeout=120) as node:
            t0 = time.perf_counter()
            sent = 0
            while sent < count:
                n = min(50_000, count - sent)
                node.send_many([("backlog", BODY)] * n, timeout=300)
                sent += n
            fill_s = time.perf_counter() - t0
            depth = node.status()["mailboxes"][0]["depth"]
        rss_full, rss_peak = rss_mb(relay.pid), rss_mb(relay.pid, "VmHWM")
    finally:
        relay.stop(60)
    t0 = time.perf_counter()
    relay = RelayProcess(endpoint, data).start(timeout=60)
    try:
        with Node("reader", relay=endpoint, timeout=60) as node:
            m = node.consume("backlog", prefetch=100).get(timeout=60)
            first_delivery = time.perf_counter() - t0
            m.ack()
        rss_restarted = rss_mb(relay.pid)
    finally:
        relay.stop(60)
    db_mb = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)) / 1e6
    return {"messages": depth, "fill_per_second": round(count / fill_s), "rss_mb": round(rss_full, 1),
            "peak_rss_mb": round(rss_peak, 1), "restart_first_delivery_s": round(first_delivery, 3),
            "rss_after_restart_mb": round(rss_restarted, 1), "disk_mb": round(db_mb)}


GOALS = {
    "pipelined_sends": ("per_second", ">=", 50_000),
    "send_latency": ("p50_us", "<=", 300),
    "consume_ack": ("per_second", ">=", 40_000),
    "round_trip": ("p50_us", "<=", 500),
    "backlog": ("rss_mb", "<=", 200),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="messages for the throughput runs")
    parser.add_argument("--latency-count", type=int, default=2000, help="sends / round trips for latency")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="queued messages for RSS/restart (0: skip)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="murano-zmq-bench-") as tmp:
        endpoint = free_tcp_endpoint()
        relay = RelayProcess(endpoint, os.path.join(tmp, "data")).start()
        try:
            with Node("bench", relay=endpoint, timeout=120) as node:
                results["pipelined_sends"] = bench_pipelined(node, args.count)
                results["pipelined_futures"] = bench_futures(node, args.count // 2)
                results["consume_ack"] = bench_consume(node, args.count)
                results["send_latency"] = bench_send_latency(node, args.latency_count)
                results["round_trip"] = bench_round_trip(node, endpoint, args.latency_count)
            results["relay_peak_rss_mb"] = round(rss_mb(relay.pid, "VmHWM"), 1)
        finally:
            relay.stop()
        if args.backlog:
            results["backlog"] = bench_backlog(args.backlog, tmp)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'measure':<18} {'result':<64} {'goal':<16} met")
    for name, row in results.items():
        if not isinstance(row, dict):
            print(f"{name:<18} {row}")
            continue
        goal = GOALS.get(name)
        text = ", ".join(f"{k}={v}" for k, v in row.items())
        if goal:
            key, op, value = goal
            met = row[key] >= value if op == ">=" else row[key] <= value
            print(f"{name:<18} {text:<64} {key} {op} {value:<8} {'yes' if met else 'NO'}")
        else:
            print(f"{name:<18} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
