"""The relay alone, seen by a raw DEALER client: no Node threads in the figure.

    python bench/raw_relay.py lone [--count 3000] [--size 1024]    # one-at-a-time SEND, p50/p99
    python bench/raw_relay.py pipe [--count 100000] [--size 1024] [--prefetch 1000]  # pipelined SENDs, then consume+ack

Starts a relay child process (this checkout's code) on a fresh data
directory, speaks the wire protocol itself (docs/protocol.md: HELLO, SEND,
CONSUME, ACK) with clock-led ids as `new_message_id()` makes them, and
prints the rates and the relay's CPU per message (/proc/PID/stat, all its
threads, then by kind of thread: its loop, libzmq's I/O thread, the rest:
committer and checkpoint).  Bodies of --size bytes (1 KiB).  Run it under the bench lock on
a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cmp_common import pct, process_cpu, thread_cpu  # noqa: E402

from murano_zmq.protocol.constants import SIGNATURE  # noqa: E402
from murano_zmq.protocol.frames import Cmd  # noqa: E402
from murano_zmq.protocol.message import new_message_id  # noqa: E402
from murano_zmq.testing import RelayProcess, free_tcp_endpoint  # noqa: E402

PER_SEND = 100  # records per pipelined SEND
IN_FLIGHT = 10  # pipelined SENDs not yet confirmed


def by_thread(before: dict[str, float], after: dict[str, float], count: int) -> str:
    """The relay's CPU per message by kind of thread, in µs."""
    return ", ".join(f"{kind} {(after[kind] - before.get(kind, 0.0)) / count * 1e6:.1f}" for kind in after)


class Client:
    def __init__(self, endpoint: str, size: int):
        self.body = b"x" * size
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.req = 0
        self.command(Cmd.HELLO, "raw-bench", os.urandom(16), 30.0)
        self.recv()

    def command(self, cmd: Cmd, *fields) -> None:
        self.sock.send_multipart([SIGNATURE, bytes([cmd]), msgpack.packb(fields, use_bin_type=True)])

    def recv(self) -> tuple[int, list]:
        frames = self.sock.recv_multipart()
        return frames[1][0], msgpack.unpackb(frames[2])

    def send(self, mailbox: str, n: int) -> None:
        self.req += 1
        now = time.time()
        records = [[new_message_id(now), mailbox, b"", self.body, now, None, False] for _ in range(n)]
        self.command(Cmd.SEND, self.req, records)

    def confirmed(self) -> None:
        cmd, fields = self.recv()
        if cmd != Cmd.CONFIRM or fields[1]:
            raise SystemExit(f"unexpected reply {cmd}: {fields}")

    def send_pipelined(self, mailbox: str, count: int) -> None:
        """`count` messages (whole SENDs of PER_SEND) to `mailbox`, IN_FLIGHT
        SENDs unconfirmed at once; returns once all are confirmed."""
        sent = done = 0
        while done < count:
            while sent < count and sent - done < PER_SEND * IN_FLIGHT:
                self.send(mailbox, PER_SEND)
                sent += PER_SEND
            self.confirmed()
            done += PER_SEND

    def consume(self, mailbox: str, count: int, prefetch: int) -> None:
        """Take `count` messages of `mailbox`, acking each DELIVER at once."""
        self.req += 1
        self.command(Cmd.CONSUME, self.req, 1, mailbox, prefetch, None)
        got = 0
        while got < count:
            cmd, fields = self.recv()
            if cmd != Cmd.DELIVER:
                continue
            got += len(fields[1])
            self.command(Cmd.ACK, [r[0] for r in fields[1]])


def lone(client: Client, pid: int, count: int) -> None:
    for _ in range(200):  # warm-up (the first makes the mailbox)
        client.send("lone", 1)
        client.confirmed()
    samples = []
    cpu0, threads0 = process_cpu(pid), thread_cpu(pid)
    for _ in range(count):
        t0 = time.perf_counter()
        client.send("lone", 1)
        client.confirmed()
        samples.append(time.perf_counter() - t0)
    cpu = process_cpu(pid) - cpu0
    print(f"one-at-a-time: {count} sends of {len(client.body):,} B, p50 {pct(samples, 50) * 1e6:.0f} µs, p99 {pct(samples, 99) * 1e6:.0f} µs, "
          f"relay CPU {cpu / count * 1e6:.0f} µs per send ({by_thread(threads0, thread_cpu(pid), count)})")


def pipe(client: Client, pid: int, count: int, prefetch: int = 1000) -> None:
    client.send("pipe", 1)  # makes the mailbox
    client.confirmed()
    cpu0, threads0, t0 = process_cpu(pid), thread_cpu(pid), time.perf_counter()
    client.send_pipelined("pipe", count)
    seconds, cpu = time.perf_counter() - t0, process_cpu(pid) - cpu0
    print(f"pipelined: {count / seconds:,.0f} msg/s, relay CPU {cpu / count * 1e6:.1f} µs per message "
          f"({by_thread(threads0, thread_cpu(pid), count)})")
    cpu0, threads0, t0 = process_cpu(pid), thread_cpu(pid), time.perf_counter()
    client.consume("pipe", count + 1, prefetch)  # (and the one that made the mailbox)
    seconds, cpu = time.perf_counter() - t0, process_cpu(pid) - cpu0
    print(f"consume+ack: {count / seconds:,.0f} msg/s, relay CPU {cpu / count * 1e6:.1f} µs per message "
          f"({by_thread(threads0, thread_cpu(pid), count)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["lone", "pipe"])
    parser.add_argument("--count", type=int, help="sends (default 3,000 lone, 100,000 pipelined)")
    parser.add_argument("--size", type=int, default=1024, help="body bytes (default 1024)")
    parser.add_argument("--prefetch", type=int, default=1000,
                        help="the consumer's window for pipe's consume+ack (default 1,000; compare.py's consumers take 100)")
    args = parser.parse_args()
    count = args.count or (3000 if args.workload == "lone" else 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayProcess(free_tcp_endpoint(), tmp, "--log-level", "WARNING").start()
        try:
            client = Client(relay.endpoint, args.size)
            if args.workload == "lone":
                lone(client, relay.pid, count)
            else:
                pipe(client, relay.pid, count, args.prefetch)
            client.sock.close(linger=0)
        finally:
            relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
