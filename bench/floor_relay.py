"""The floor: the least a durable relay can do on this disk, for comparison.

One thread, one ROUTER; a message is one frame (16-byte id + body); each
poll batch is one SQLite transaction (WAL, synchronous=FULL); the id goes
back as the confirm after the commit.  No mailboxes, no delivery: it shows
what the disk and pyzmq cost, so compare.py can show what the path adds.

    python bench/floor_relay.py serve ENDPOINT DB
    python bench/floor_relay.py latency|pipelined SIZE COUNT ENDPOINT SERVER_PID
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cmp_common import Meter, body_of, emit, pct, tune_client_heap  # noqa: E402


# A message's row: its 16-byte id and its body (bench/lone_stages.py times this).
INSERT = "INSERT OR IGNORE INTO m (id, body) VALUES (?, ?)"


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS m (seq INTEGER PRIMARY KEY, id BLOB UNIQUE, body BLOB)")
    return db


def serve(endpoint: str, path: str) -> None:
    db = open_db(path)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at its HWM: never drop a confirm
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        sock.poll()
        batch = []
        while len(batch) < 2000:
            try:
                batch.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        if any(len(f) == 2 and f[1] == b"stop" for f in batch):
            return
        db.execute("BEGIN")
        db.executemany(INSERT, [(f[1][:16], f[1][16:]) for f in batch])
        db.execute("COMMIT")
        for identity, frame in batch:
            sock.send_multipart([identity, frame[:16]])


def client(workload: str, size: int, count: int, endpoint: str, server_pid: int) -> None:
    tune_client_heap()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    body = body_of(size)[16:]
    meter = Meter(server_pid)

    def message() -> bytes:
        return os.urandom(16) + body

    for _ in range(50):  # warm-up
        sock.send(message())
        sock.recv()
    if workload == "latency":
        samples = []
        meter.start()
        for _ in range(count):
            t0 = time.perf_counter()
            sock.send(message())
            sock.recv()
            samples.append(time.perf_counter() - t0)
        cpu = meter.stop()
        metrics = {"p50_us": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6}
    else:  # pipelined: up to 1,000 unconfirmed
        meter.start()
        sent = confirmed = 0
        while confirmed < count:
            while sent < count and sent - confirmed < 1000:
                sock.send(message())
                sent += 1
            sock.recv()
            confirmed += 1
        cpu = meter.stop()
        metrics = {"per_s": count / cpu["seconds"]}
    sock.send(b"stop")
    sock.close(linger=1000)
    emit(metrics, count, cpu)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        client(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
