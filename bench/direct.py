"""Direct path benchmark, side by side with raw pyzmq and with the relay path.

    python bench/direct.py            # table
    python bench/direct.py --json

Same workload for every row: 1 KiB bodies, acked by the receiving process,
window 1,000 messages in flight, two processes on loopback.  Throughput is
messages acked per second; round trip is one message sent and its ack back
(window 1), p50/p99.
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

import zmq  # noqa: E402

from murano_zmq import Node  # noqa: E402
from murano_zmq.testing import RelayProcess, free_tcp_endpoint  # noqa: E402

BODY = b"x" * 1024
WINDOW = 1000

RAW_RECEIVER = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.SNDHWM, 0)  # never drop an ack: the sender's window bounds them
s.setsockopt(zmq.ROUTER_MANDATORY, 1)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    ident, msg_id, body = s.recv_multipart()
    if body == b"stop":
        break
    s.send_multipart([ident, msg_id])   # the ack
"""

NODE_RECEIVER = """
import sys
from murano_zmq import Node
direct = sys.argv[2] == "direct"
with Node("receiver", relay=sys.argv[1], direct=direct) as node:
    c = node.consume("bench.direct", prefetch=1000)
    print("ready", flush=True)
    while True:
        m = c.get(timeout=120)
        if m is None or m.body == b"stop":
            if m is not None:
                m.ack()
            break
        m.ack()
"""


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def spawn(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def stop(p: subprocess.Popen) -> None:
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


def bench_raw(count: int, rt_count: int) -> dict:
    endpoint = free_tcp_endpoint()
    receiver = spawn(RAW_RECEIVER, endpoint)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.RCVTIMEO, 30_000)  # a lost ack fails the run instead of hanging it
    s.connect(endpoint)
    try:
        # throughput: window of WINDOW unacked
        t0 = time.perf_counter()
        sent = acked = 0
        while acked < count:
            while sent < count and sent - acked < WINDOW:
                s.send_multipart([sent.to_bytes(8, "big"), BODY])
                sent += 1
            s.recv_multipart()
            acked += 1
        dt = time.perf_counter() - t0
        samples = []
        for i in range(rt_count):
            t = time.perf_counter()
            s.send_multipart([i.to_bytes(8, "big"), BODY])
            s.recv_multipart()
            samples.append(time.perf_counter() - t)
        s.send_multipart([b"", b"stop"])
    finally:
        s.close(1000)
        stop(receiver)
    return {"per_second": round(count / dt), "rt_p50_us": round(pct(samples, 50) * 1e6),
            "rt_p99_us": round(pct(samples, 99) * 1e6)}


def bench_node(count: int, rt_count: int, path: str, tmp: str) -> dict:
    endpoint = free_tcp_endpoint()
    relay = RelayProcess(endpoint, os.path.join(tmp, f"data-{path}")).start()
    receiver = spawn(NODE_RECEIVER, endpoint, path)
    try:
        with Node("sender", relay=endpoint, direct=(path == "direct"), timeout=120) as node:
            for _ in range(200):  # warm up: the sender learns the direct path
                node.send("bench.direct", BODY)
            before = node.status()["counters"]["received"]
            t0 = time.perf_counter()
            futures = [node.send_async("bench.direct", BODY) for _ in range(count)]
            for f in futures:
                f.result(120)
            dt = time.perf_counter() - t0
            samples = []
            for _ in range(rt_count):
                t = time.perf_counter()
                node.send("bench.direct", BODY)  # returns when the receiver acked (direct) / stored (relay)
                samples.append(time.perf_counter() - t)
            through_relay = node.status()["counters"]["received"] - before
            node.send("bench.direct", b"stop")
    finally:
        stop(receiver)
        relay.stop()
    return {"per_second": round(count / dt), "rt_p50_us": round(pct(samples, 50) * 1e6),
            "rt_p99_us": round(pct(samples, 99) * 1e6), "via_relay": through_relay}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="messages per throughput run")
    parser.add_argument("--rt-count", type=int, default=2000, help="round trips per latency run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="murano-zmq-bench-") as tmp:
        rows = {
            "raw pyzmq": bench_raw(args.count, args.rt_count),
            "murano-zmq direct": bench_node(args.count, args.rt_count, "direct", tmp),
            "murano-zmq relay": bench_node(args.count // 4, args.rt_count // 4, "relay", tmp),
        }
    raw = rows["raw pyzmq"]["per_second"]
    for row in rows.values():
        row["vs_raw"] = round(row["per_second"] / raw, 2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'path':<20} {'acked msg/s':>12} {'vs raw':>7} {'rt p50 us':>10} {'rt p99 us':>10} {'via relay':>10}")
    for name, row in rows.items():
        print(f"{name:<20} {row['per_second']:>12} {row['vs_raw']:>7} {row['rt_p50_us']:>10} "
              f"{row['rt_p99_us']:>10} {row.get('via_relay', '-'):>10}")
    print("goals (issue 4): direct >= 0.5 x raw acked throughput; direct round trip p50 <= 150 us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
