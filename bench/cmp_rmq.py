"""bench/compare.py's RabbitMQ worker: one workload through pika.

    python bench/cmp_rmq.py WORKLOAD SIZE COUNT AMQP_URL BEAM_PID [MAILBOXES TTL]

What a careful RabbitMQ user of Murano's flows runs: durable queues,
persistent messages (delivery_mode 2), publisher confirms, manual acks,
prefetch 100.  Progress events (fanout) are transient and auto-acked, as
they are lossy on murano-zmq's side too.  Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cmp_common import Meter, body_of, emit_with_server_rss, pct, tune_client_heap  # noqa: E402

PERSISTENT = pika.BasicProperties(delivery_mode=2)
WINDOW = 1000  # unconfirmed publishes in flight (pipelined)
HERE = os.path.dirname(os.path.abspath(__file__))

AGENT = """
import sys, pika
url = sys.argv[1]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
ch.basic_qos(prefetch_count=100)
persistent = pika.BasicProperties(delivery_mode=2)
print("ready", flush=True)
for method, props, body in ch.consume("cmp.rt.request", inactivity_timeout=120):
    if method is None or body == b"stop":
        if method is not None:
            ch.basic_ack(method.delivery_tag)
        break
    ch.basic_publish("", "cmp.rt.reply", body, persistent)
    ch.basic_ack(method.delivery_tag)
conn.close()
"""

SUBSCRIBERS = """
import json, sys, time, pika
url, count, n = sys.argv[1], int(sys.argv[2]), 10
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
got, first, last = [0], [None], [0.0]
def on(ch_, method, props, body):
    now = time.perf_counter()
    if first[0] is None:
        first[0] = now
    last[0] = now
    got[0] += 1
for i in range(n):
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "cmp.progress")
    ch.basic_consume(q, on, auto_ack=True)
print("ready", flush=True)
deadline = time.monotonic() + 300
quiet_since = time.monotonic()
seen = 0
while got[0] < count * n and time.monotonic() < deadline:
    conn.process_data_events(0.2)
    if got[0] != seen:
        seen, quiet_since = got[0], time.monotonic()
    elif got[0] and time.monotonic() - quiet_since > 2.0:
        break
span = (last[0] - first[0]) if first[0] is not None else 0.0
print(json.dumps({"delivered": got[0], "span": span}), flush=True)
conn.close()
"""


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def publish_pipelined(url: str, items: list[tuple[str, bytes]]) -> None:
    """Publish persistent messages with async confirms, WINDOW in flight."""
    state = {"sent": 0, "confirmed": 0, "error": None}
    conn = None

    def on_open(c):
        c.channel(on_open_callback=on_channel)

    def on_channel(ch):
        state["ch"] = ch
        ch.confirm_delivery(on_confirm)
        pump()

    def pump():
        ch = state["ch"]
        while state["sent"] < len(items) and state["sent"] - state["confirmed"] < WINDOW:
            queue, body = items[state["sent"]]
            ch.basic_publish("", queue, body, PERSISTENT)
            state["sent"] += 1

    def on_confirm(frame):
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            state["error"] = "nack"
        tag = method.delivery_tag
        state["confirmed"] = tag if method.multiple else max(state["confirmed"], tag)
        if state["confirmed"] >= len(items) or state["error"]:
            conn.close()
        else:
            pump()

    def on_closed(c, reason):
        if state["confirmed"] < len(items) and not state["error"]:
            state["error"] = f"connection closed: {reason}"
        c.ioloop.stop()

    conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=on_open,
                                 on_open_error_callback=lambda c, e: (state.update(error=str(e)), c.ioloop.stop()),
                                 on_close_callback=on_closed)
    conn.ioloop.start()
    if state["error"] or state["confirmed"] < len(items):
        raise RuntimeError(f"pipelined publish failed: {state['error']} ({state['confirmed']}/{len(items)})")


def fill(url: str, items: list[tuple[str, bytes]]) -> None:
    """A backlog to measure against (not itself measured): pipelined, and
    once more for what a dropped connection left unconfirmed."""
    try:
        publish_pipelined(url, items)
    except RuntimeError as exc:
        print(f"fill: {exc}; publishing again with blocking confirms", file=sys.stderr)
        conn = connect(url)
        ch = conn.channel()
        ch.confirm_delivery()
        for queue, body in items:  # duplicates are harmless: drained by count
            ch.basic_publish("", queue, body, PERSISTENT)
        conn.close()


def declare(ch, name: str, ttl: float | None = None) -> None:
    args = {"x-expires": int(ttl * 1000)} if ttl else None
    ch.queue_declare(name, durable=True, arguments=args)


def fresh(url: str, *names: str) -> None:
    conn = connect(url)
    ch = conn.channel()
    for name in names:
        ch.queue_delete(name)
        declare(ch, name)
    conn.close()


def drop(url: str, *names: str) -> None:
    conn = connect(url)
    ch = conn.channel()
    for name in names:
        ch.queue_delete(name)
    conn.close()


def spawn(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("helper did not start")
    return p


def latency(url, body, count, meter):
    fresh(url, "cmp.lat")
    conn = connect(url)
    ch = conn.channel()
    ch.confirm_delivery()
    for _ in range(min(50, count)):
        ch.basic_publish("", "cmp.lat", body, PERSISTENT)
    samples = []
    meter.start()
    for _ in range(count):
        t0 = time.perf_counter()
        ch.basic_publish("", "cmp.lat", body, PERSISTENT)
        samples.append(time.perf_counter() - t0)
    cpu = meter.stop()
    ch.queue_delete("cmp.lat")
    conn.close()
    return {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}, count, cpu


def pipelined(url, body, count, meter):
    fresh(url, "cmp.pipe")
    items = [("cmp.pipe", body)] * count
    meter.start()
    publish_pipelined(url, items)
    cpu = meter.stop()
    drop(url, "cmp.pipe")
    return {"per_s": count / cpu["seconds"]}, count, cpu


def consume(url, body, count, meter):
    fresh(url, "cmp.backlog")
    fill(url, [("cmp.backlog", body)] * count)
    conn = connect(url)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    meter.start()
    n = 0
    for method, props, data in ch.consume("cmp.backlog", inactivity_timeout=60):
        if method is None:
            raise RuntimeError("consume stalled")
        ch.basic_ack(method.delivery_tag)
        n += 1
        if n == count:
            break
    cpu = meter.stop()
    ch.cancel()
    ch.queue_delete("cmp.backlog")
    conn.close()
    return {"per_s": count / cpu["seconds"]}, count, cpu


def round_trip(url, body, count, meter):
    fresh(url, "cmp.rt.request", "cmp.rt.reply")
    agent = spawn(AGENT, url)
    conn = connect(url)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_qos(prefetch_count=100)
    replies = ch.consume("cmp.rt.reply", inactivity_timeout=60)
    samples = []
    try:
        for i in range(count + 50):
            if i == 50:
                meter.start((agent.pid,))
            t0 = time.perf_counter()
            ch.basic_publish("", "cmp.rt.request", body, PERSISTENT)
            method, props, data = next(replies)
            if method is None:
                raise RuntimeError("no reply")
            ch.basic_ack(method.delivery_tag)
            if i >= 50:
                samples.append(time.perf_counter() - t0)
        cpu = meter.stop()
        ch.basic_publish("", "cmp.rt.request", b"stop", PERSISTENT)
    finally:
        agent.wait(30)
    ch.cancel()
    conn.close()
    drop(url, "cmp.rt.request", "cmp.rt.reply")
    return {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}, count, cpu


def offline(url, body, count, meter, mailboxes, ttl):
    names = [f"cmp.agent.{i}" for i in range(mailboxes)]
    conn = connect(url)
    ch = conn.channel()
    for name in names:
        ch.queue_delete(name)
        declare(ch, name, ttl)
    conn.close()
    fill(url, [(names[i % mailboxes], body) for i in range(count)])
    meter.start()
    conn = connect(url)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    got = [0]

    def on(ch_, method, props, data):
        ch_.basic_ack(method.delivery_tag)
        got[0] += 1

    for name in names:
        ch.basic_consume(name, on)
    deadline = time.monotonic() + 300
    while got[0] < count and time.monotonic() < deadline:
        conn.process_data_events(0.1)
    cpu = meter.stop()
    for name in names:
        ch.queue_delete(name)
    conn.close()
    return {"drain_s": cpu["seconds"]}, got[0], cpu


def queues_left(prefix: str) -> int:
    out = subprocess.run([os.path.join(HERE, "rabbitmq.sh"), "ctl", "list_queues", "-q",
                          "--no-table-headers", "name"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.split() if line.startswith(prefix))


def expiry(url, body, count, meter, mailboxes, ttl):
    conn = connect(url)
    ch = conn.channel()
    for i in range(count):
        declare(ch, f"cmp.idle.{i}", ttl)
    conn.close()
    meter.start()
    deadline = time.monotonic() + ttl + 300
    while time.monotonic() < deadline and queues_left("cmp.idle."):
        time.sleep(0.1)
    cpu = meter.stop()
    cpu["client_cpu_s"] = 0.0  # rabbitmqctl's own CPU is not the client's
    return {"gone_s": cpu["seconds"]}, count, cpu


def fanout(url, body, count, meter):
    conn = connect(url)
    ch = conn.channel()
    ch.exchange_declare("cmp.progress", "fanout")
    subs = spawn(SUBSCRIBERS, url, str(count))
    try:
        meter.start((subs.pid,))
        for _ in range(count):
            ch.basic_publish("cmp.progress", "", body)
        result = json.loads(subs.stdout.readline())
        cpu = meter.stop()
    finally:
        subs.wait(30)
    ch.exchange_delete("cmp.progress")
    conn.close()
    delivered = result["delivered"]
    rate = delivered / result["span"] if result["span"] > 0 else 0.0
    return {"per_s": rate, "delivered_fraction": delivered / (count * 10)}, delivered, cpu


WORKLOADS = {"latency": latency, "pipelined": pipelined, "consume": consume, "roundtrip": round_trip,
             "offline": offline, "expiry": expiry, "fanout": fanout}


def main() -> int:
    workload, size, count, url, beam_pid = sys.argv[1:6]
    mailboxes, ttl = (int(sys.argv[6]), float(sys.argv[7])) if len(sys.argv) > 7 else (1, 60.0)
    extra = (mailboxes, ttl) if workload in ("offline", "expiry") else ()
    meter = Meter(int(beam_pid))
    tune_client_heap()
    metrics, messages, cpu = WORKLOADS[workload](url, body_of(int(size)), int(count), meter, *extra)
    emit_with_server_rss(workload, metrics, messages, cpu, int(beam_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
