"""bench/compare.py's murano-zmq worker: one workload through Node or AsyncNode.

    python bench/cmp_mz.py node|async WORKLOAD SIZE COUNT RELAY SERVER_PID [MAILBOXES TTL]

Public API only.  Prints one JSON line (cmp_common.emit).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from murano_zmq import AsyncNode, Node  # noqa: E402
from cmp_common import Meter, body_of, chunk_of, emit_with_server_rss, pct, tune_client_heap  # noqa: E402

TIMEOUT = 120
# How often the expiry workload asks the relay what is left: a status of
# 10,000 mailboxes takes a few ms, and a coarser poll would be most of the
# figure past the TTL.
EXPIRY_POLL = 0.05

# The agent side of the request/reply hop: take a request, send the reply
# (durable), then ack the request.
AGENT = """
import asyncio, sys
from murano_zmq import AsyncNode, Node
kind, relay = sys.argv[1], sys.argv[2]
if kind == "node":
    with Node("agent", relay=relay) as node:
        requests = node.consume("cmp.rt.request", prefetch=100)
        print("ready", flush=True)
        while True:
            m = requests.get(timeout=120)
            if m is None or m.body == b"stop":
                break
            node.send_async("cmp.rt.reply", m.body)
            m.ack()
else:
    async def main():
        async with AsyncNode("agent", relay=relay) as node:
            requests = await node.consume("cmp.rt.request", prefetch=100)
            print("ready", flush=True)
            while True:
                m = await requests.get(timeout=120)
                if m is None or m.body == b"stop":
                    break
                node.send_nowait("cmp.rt.reply", m.body)
                m.ack()
            await asyncio.sleep(0.2)
    asyncio.run(main())
"""

# Ten subscribers of the progress topic in one process (Node: topics are
# peer to peer).  Counts what arrives; prints the delivered rate.
SUBSCRIBERS = """
import json, sys, threading, time
from murano_zmq import Node
pub, count, n = sys.argv[1], int(sys.argv[2]), 10
got = [0] * n
first, last = [None], [0.0]
warm = [threading.Event() for _ in range(n)]
done = threading.Event()
def make(i):
    def cb(ev):
        if ev.topic == "progress.warm":
            warm[i].set(); return
        now = time.perf_counter()
        if first[0] is None:
            first[0] = now
        last[0] = now
        got[i] += 1
        if sum(got) >= count * n:
            done.set()
    return cb
with Node("subs", relay=sys.argv[3], direct=False) as node:
    subs = [node.subscribe("progress.", callback=make(i), publishers=[pub]) for i in range(n)]
    for w in warm:
        w.wait(60)
    print("ready", flush=True)
    sys.stdin.readline()  # the publisher finished
    done.wait(2.0)
    total = sum(got)
    span = (last[0] - first[0]) if first[0] is not None else 0.0
    print(json.dumps({"delivered": total, "span": span}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise RuntimeError(f"helper did not start: {line!r}")
    return p


def finish(p: subprocess.Popen) -> None:
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


# --- Node -----------------------------------------------------------------------------


def node_latency(node, body, count, meter):
    for _ in range(min(50, count)):
        node.send("cmp.lat", body)
    samples = []
    meter.start()
    for _ in range(count):
        t0 = time.perf_counter()
        node.send("cmp.lat", body)
        samples.append(time.perf_counter() - t0)
    cpu = meter.stop()
    return {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}, count, cpu


def node_pipelined(node, body, count, meter):
    chunk = chunk_of(len(body))
    meter.start()
    for start in range(0, count, chunk):
        node.send_many([("cmp.pipe", body)] * min(chunk, count - start), timeout=TIMEOUT)
    cpu = meter.stop()
    return {"per_s": count / cpu["seconds"]}, count, cpu


def ack_next(consumer, stalled: str) -> None:
    """Take the next message and ack it; a minute with none is `stalled`."""
    m = consumer.get(timeout=60)
    if m is None:
        raise RuntimeError(stalled)
    m.ack()


async def ack_next_async(consumer, stalled: str) -> None:
    m = await consumer.get(timeout=60)
    if m is None:
        raise RuntimeError(stalled)
    m.ack()


def node_consume(node, body, count, meter):
    chunk = chunk_of(len(body))
    for start in range(0, count, chunk):
        node.send_many([("cmp.backlog", body)] * min(chunk, count - start), timeout=TIMEOUT)
    meter.start()
    consumer = node.consume("cmp.backlog", prefetch=100, direct=False)
    for _ in range(count):
        ack_next(consumer, "consume stalled")
    cpu = meter.stop()
    consumer.cancel()
    return {"per_s": count / cpu["seconds"]}, count, cpu


def node_round_trip(node, body, count, meter, relay):
    agent = spawn(AGENT, "node", relay)
    try:
        replies = node.consume("cmp.rt.reply", prefetch=100)
        samples = []
        for i in range(count + 50):
            if i == 50:
                meter.start((agent.pid,))
            t0 = time.perf_counter()
            sent = node.send_async("cmp.rt.request", body)
            ack_next(replies, "no reply")
            sent.result(60)
            if i >= 50:
                samples.append(time.perf_counter() - t0)
        cpu = meter.stop()
        node.send("cmp.rt.request", b"stop")
    finally:
        finish(agent)
    return {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}, count, cpu


def node_offline(node, body, count, meter, relay, mailboxes, ttl):
    names = [f"cmp.agent.{i}" for i in range(mailboxes)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda name: node.declare(name, ttl=ttl), names))
    node.send_many([(names[i % mailboxes], body) for i in range(count)], timeout=TIMEOUT)
    per = count // mailboxes
    meter.start()
    with Node("agents", relay=relay, timeout=TIMEOUT) as agents:
        consumers = [agents.consume(name, prefetch=100, direct=False) for name in names]
        for c in consumers:
            for _ in range(per):
                ack_next(c, "offline drain stalled")
        cpu = meter.stop()
    return {"drain_s": cpu["seconds"]}, count, cpu


def node_expiry(node, body, count, meter, relay, mailboxes, ttl):
    """`count` idle mailboxes with a ttl: time from the last declare until
    the relay has deleted them all."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(32) as pool:  # declares in flight together
        list(pool.map(lambda i: node.declare(f"cmp.idle.{i}", ttl=ttl), range(count)))
    meter.start()
    deadline = time.monotonic() + ttl + 120
    while time.monotonic() < deadline:
        left = sum(1 for mb in node.status()["mailboxes"] if mb["name"].startswith("cmp.idle."))
        if not left:
            break
        time.sleep(EXPIRY_POLL)
    cpu = meter.stop()
    return {"gone_s": cpu["seconds"]}, count, cpu


def node_fanout(node, body, count, meter, relay):
    port = free_port()
    pub_endpoint = f"tcp://127.0.0.1:{port}"
    with Node("progress", relay=relay, direct=False, bind=pub_endpoint) as pub:
        pub.publish("progress.warm", b"")
        subs = subprocess.Popen([sys.executable, "-c", SUBSCRIBERS, pub_endpoint, str(count), relay],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            while True:  # warm-up until every SUB hears us (slow joiners)
                pub.publish("progress.warm", b"")
                if select.select([subs.stdout], [], [], 0.05)[0]:
                    break
            if subs.stdout.readline().strip() != "ready":
                raise RuntimeError("subscribers did not start")
            meter.start((subs.pid,))
            for i in range(count):
                pub.publish("progress.task", body)
            subs.stdin.write("done\n")
            subs.stdin.flush()
            import json
            result = json.loads(subs.stdout.readline())
            cpu = meter.stop()
        finally:
            finish(subs)
    delivered = result["delivered"]
    rate = delivered / result["span"] if result["span"] > 0 else 0.0
    return {"per_s": rate, "delivered_fraction": delivered / (count * 10)}, delivered, cpu


# --- AsyncNode -----------------------------------------------------------------------


async def async_latency(node, body, count, meter):
    for _ in range(min(50, count)):
        await node.send("cmp.lat", body)
    samples = []
    meter.start()
    for _ in range(count):
        t0 = time.perf_counter()
        await node.send("cmp.lat", body)
        samples.append(time.perf_counter() - t0)
    cpu = meter.stop()
    return {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}, count, cpu


async def async_pipelined(node, body, count, meter):
    meter.start()
    chunk = chunk_of(len(body))
    for start in range(0, count, chunk):
        await node.send_many([("cmp.pipe", body)] * min(chunk, count - start), timeout=TIMEOUT)
    cpu = meter.stop()
    return {"per_s": count / cpu["seconds"]}, count, cpu


async def async_consume(node, body, count, meter):
    chunk = chunk_of(len(body))
    for start in range(0, count, chunk):
        await node.send_many([("cmp.backlog", body)] * min(chunk, count - start), timeout=TIMEOUT)
    meter.start()
    consumer = await node.consume("cmp.backlog", prefetch=100)
    for _ in range(count):
        await ack_next_async(consumer, "consume stalled")
    cpu = meter.stop()
    consumer.cancel()
    return {"per_s": count / cpu["seconds"]}, count, cpu


async def async_round_trip(node, body, count, meter, relay):
    agent = spawn(AGENT, "async", relay)
    try:
        replies = await node.consume("cmp.rt.reply", prefetch=100)
        samples = []
        for i in range(count + 50):
            if i == 50:
                meter.start((agent.pid,))
            t0 = time.perf_counter()
            sent = node.send_nowait("cmp.rt.request", body)
            await ack_next_async(replies, "no reply")
            await sent
            if i >= 50:
                samples.append(time.perf_counter() - t0)
        cpu = meter.stop()
        await node.send("cmp.rt.request", b"stop")
    finally:
        await asyncio.get_running_loop().run_in_executor(None, finish, agent)
    return {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}, count, cpu


async def async_offline(node, body, count, meter, relay, mailboxes, ttl):
    names = [f"cmp.agent.{i}" for i in range(mailboxes)]
    await asyncio.gather(*(node.declare(name, ttl=ttl) for name in names))
    await node.send_many([(names[i % mailboxes], body) for i in range(count)], timeout=TIMEOUT)
    per = count // mailboxes
    meter.start()
    async with AsyncNode("agents", relay=relay, timeout=TIMEOUT) as agents:
        consumers = await asyncio.gather(*(agents.consume(name, prefetch=100) for name in names))
        for c in consumers:
            for _ in range(per):
                await ack_next_async(c, "offline drain stalled")
        cpu = meter.stop()
    return {"drain_s": cpu["seconds"]}, count, cpu


async def async_expiry(node, body, count, meter, relay, mailboxes, ttl):
    await asyncio.gather(*(node.declare(f"cmp.idle.{i}", ttl=ttl) for i in range(count)))
    meter.start()
    deadline = time.monotonic() + ttl + 120
    while time.monotonic() < deadline:
        status = await node.status()
        if not any(mb["name"].startswith("cmp.idle.") for mb in status["mailboxes"]):
            break
        await asyncio.sleep(EXPIRY_POLL)
    cpu = meter.stop()
    return {"gone_s": cpu["seconds"]}, count, cpu


NODE = {"latency": node_latency, "pipelined": node_pipelined, "consume": node_consume,
        "roundtrip": node_round_trip, "offline": node_offline, "expiry": node_expiry,
        "fanout": node_fanout}
ASYNC = {"latency": async_latency, "pipelined": async_pipelined, "consume": async_consume,
         "roundtrip": async_round_trip, "offline": async_offline, "expiry": async_expiry}
EXTRA = {"roundtrip": 1, "fanout": 1, "offline": 3, "expiry": 3}  # takes relay (+ mailboxes, ttl)


def main() -> int:
    kind, workload, size, count, relay, server_pid = sys.argv[1:7]
    mailboxes, ttl = (int(sys.argv[7]), float(sys.argv[8])) if len(sys.argv) > 8 else (1, 60.0)
    size, count, server_pid = int(size), int(count), int(server_pid)
    tune_client_heap()
    body = body_of(size)
    meter = Meter(server_pid)
    extra = (relay, mailboxes, ttl)[:EXTRA.get(workload, 0)]
    if kind == "node":
        with Node("bench", relay=relay, timeout=TIMEOUT) as node:
            metrics, messages, cpu = NODE[workload](node, body, count, meter, *extra)
    else:
        async def run():
            async with AsyncNode("bench", relay=relay, timeout=TIMEOUT) as node:
                return await ASYNC[workload](node, body, count, meter, *extra)
        metrics, messages, cpu = asyncio.run(run())
    emit_with_server_rss(workload, metrics, messages, cpu, server_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
