"""Instructions per one-at-a-time confirmed send, counted by callgrind: a
figure other load on the machine does not move (docs/performance.md).

    python bench/callgrind_lone.py [relay|floor|node|async|raw|pipe|consume|node-consume|async-consume] [--count 1000]

relay, floor: starts the relay (this checkout's code) or the floor relay
(bench/floor_relay.py) under `valgrind --tool=callgrind`, warms it up with
lone sends from a raw DEALER, zeroes the counters, sends --count more one at
a time (each waits for its confirm), dumps, and prints the process's
instructions per send (all its threads) and SQLite's share
(`_pysqlite_query_execute`, inclusive).

node, async, raw: the other side.  The relay runs as usual and the sending
client runs under callgrind: a `Node` calling send(), an `AsyncNode`
awaiting send() in one coroutine, or the raw DEALER
above (what the wire protocol itself costs a client in Python).

node-consume, async-consume: the consuming client under callgrind, the
relay as usual: 500 + --count messages queued first (by a raw client, not
counted), then a `Node` or `AsyncNode` consumer (prefetch CONSUME_PREFETCH)
takes and acks 500 to warm up and --count counted: instructions per
consumed and acked message, all the client's threads.

pipe: the relay again, under pipelined sends instead (bench/raw_relay.py's
client: SENDs of PER_SEND records, IN_FLIGHT of them unconfirmed, --count
messages after 5,000 to warm up): instructions per stored message, the
relay's whole CPU budget on the pipelined workload, free of the machine's
noise.

consume: the relay again, with --count messages queued (pipelined, not
counted) and then consumed by that client (prefetch CONSUME_PREFETCH or --prefetch,
each DELIVER acked at once): instructions per delivered and acked message.

Needs valgrind; takes 1-2 minutes.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import msgpack
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from murano_zmq.protocol.constants import SIGNATURE  # noqa: E402
from murano_zmq.protocol.frames import Cmd  # noqa: E402
from murano_zmq.protocol.message import new_message_id  # noqa: E402
from murano_zmq.testing import free_tcp_endpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raw_relay import PER_SEND, Client  # noqa: E402  (pipe, consume: its pipelined SENDs and consumer)

BODY = b"x" * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
CONSUME_PREFETCH = 100  # as compare.py's consume workload


def sender(kind: str, endpoint: str):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    if kind == "floor":
        def send() -> None:
            sock.send(new_message_id(time.time()) + BODY)
            sock.recv()
        return sock, send
    sock.send_multipart([SIGNATURE, bytes([Cmd.HELLO]), msgpack.packb(["cg", os.urandom(16), 30.0])])
    sock.recv_multipart()  # (waits while valgrind starts the relay)
    req = [0]

    def send() -> None:
        req[0] += 1
        now = time.time()
        record = [new_message_id(now), "lone", b"", BODY, now, None, False]
        sock.send_multipart([SIGNATURE, bytes([Cmd.SEND]), msgpack.packb([req[0], [record]], use_bin_type=True)])
        frames = sock.recv_multipart()
        assert frames[1] == bytes([Cmd.CONFIRM]), frames
    return sock, send


CLIENT = """
import sys, time
sys.path.insert(0, sys.argv[3])
import callgrind_lone
from murano_zmq import Node
kind, endpoint = sys.argv[1], sys.argv[2]
if kind == "node":
    node = Node("cg", relay=endpoint, timeout=60)
    def send_n(n):
        for _ in range(n):
            node.send("lone", callgrind_lone.BODY)
elif kind == "async":
    import asyncio
    from murano_zmq import AsyncNode
    loop = asyncio.new_event_loop()
    async def started():
        return await AsyncNode("cg", relay=endpoint, timeout=60).start()
    node = loop.run_until_complete(started())
    async def sends(n):
        for _ in range(n):
            await node.send("lone", callgrind_lone.BODY)
    def send_n(n):
        loop.run_until_complete(sends(n))
elif kind == "node-consume":
    node = Node("cg", relay=endpoint, timeout=60)
    consumer = iter(node.consume("lone", prefetch=callgrind_lone.CONSUME_PREFETCH))
    def send_n(n):
        for _ in range(n):
            next(consumer).ack()
elif kind == "async-consume":
    import asyncio
    from murano_zmq import AsyncNode
    loop = asyncio.new_event_loop()
    async def started():
        node = await AsyncNode("cg", relay=endpoint, timeout=60).start()
        return (await node.consume("lone", prefetch=callgrind_lone.CONSUME_PREFETCH)).__aiter__()
    consumer = loop.run_until_complete(started())
    async def takes(n):
        for _ in range(n):
            (await consumer.__anext__()).ack()
    def send_n(n):
        loop.run_until_complete(takes(n))
else:
    _, send = callgrind_lone.sender("relay", endpoint)
    def send_n(n):
        for _ in range(n):
            send()
send_n(500)
print("warm", flush=True)
send_n(int(sys.stdin.readline()))
print("done", flush=True)
sys.stdin.readline()
"""


def client_under_callgrind(kind: str, count: int, tmp: str) -> str:
    """Run the sending client under callgrind against a relay run as usual;
    the dump of its lone sends."""
    from murano_zmq.testing import RelayProcess

    relay = RelayProcess(free_tcp_endpoint(), os.path.join(tmp, "data"), "--log-level", "WARNING").start()
    if kind.endswith("-consume"):  # what it takes, queued first (not counted)
        filler = Client(relay.endpoint, len(BODY))
        filler.send_pipelined("lone", (500 + count + PER_SEND - 1) // PER_SEND * PER_SEND)
        filler.sock.close(linger=0)
    out = os.path.join(tmp, "cg.out")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
                             "--dump-instr=no", sys.executable, "-c", CLIENT, kind, relay.endpoint, HERE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "warm"
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        proc.stdin.write(f"{count}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        relay.stop()
    return min(glob.glob(f"{out}.*.1"))


def total(path: str, inclusive: bool, pattern: str) -> int:
    out = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", path],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if re.search(pattern, line):
            return int(line.split()[0].replace(",", ""))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", choices=["relay", "floor", "node", "async", "raw", "pipe", "consume",
                                                         "node-consume", "async-consume"], default="relay")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=CONSUME_PREFETCH,
                        help=f"the raw consumer's window in `consume` (default {CONSUME_PREFETCH}, as compare.py's)")
    parser.add_argument("--keep", metavar="PATH", help="copy the callgrind dump there (for callgrind_annotate)")
    args = parser.parse_args()
    batched = args.kind in ("pipe", "consume")
    if args.count < (PER_SEND if batched else 1):
        parser.error(f"--count must be at least {PER_SEND if batched else 1}")
    endpoint = free_tcp_endpoint()
    if args.kind in ("node", "async", "raw", "node-consume", "async-consume"):
        with tempfile.TemporaryDirectory() as tmp:
            dump = client_under_callgrind(args.kind, args.count, tmp)
            ir = total(dump, False, "PROGRAM TOTALS")
            if args.keep:
                shutil.copy(dump, args.keep)
        what = "consumed and acked message" if args.kind.endswith("-consume") else "lone send"
        print(f"{args.kind} client: {ir / args.count:,.0f} instructions per {what} (all its threads)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.kind in ("relay", "pipe", "consume"):
            server = ["-m", "murano_zmq.relay", "--log-level", "WARNING", "--bind", endpoint, "--data-dir", tmp]
        else:
            server = [os.path.join(HERE, "floor_relay.py"), "serve", endpoint, os.path.join(tmp, "floor.db")]
        out = os.path.join(tmp, "cg.out")
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
                                 "--dump-instr=no", sys.executable, *server],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if batched:
                client = Client(endpoint, len(BODY))  # (its HELLO waits while valgrind starts the relay)
                sock, count = client.sock, args.count // PER_SEND * PER_SEND
                client.send_pipelined("lone", 5000 if args.kind == "pipe" else count)
                if args.kind == "consume":
                    time.sleep(1.0)  # (the fill's commits and checkpoint done)
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                if args.kind == "pipe":
                    client.send_pipelined("lone", count)
                else:
                    client.consume("lone", count, args.prefetch)
            else:
                sock, send = sender(args.kind, endpoint)
                for _ in range(500):
                    send()
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                for _ in range(args.count):
                    send()
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
            sock.close(linger=0)
        finally:
            proc.terminate()  # the floor relay ends on SIGTERM too (no handler: it dies)
            proc.wait(60)
        dump = min(glob.glob(f"{out}.*.1"))
        n = args.count // PER_SEND * PER_SEND if batched else args.count
        ir = total(dump, False, "PROGRAM TOTALS")
        sql = total(dump, True, r"cursor\.c:_pysqlite_query_execute ")
        if args.keep:
            shutil.copy(dump, args.keep)
    what = {"pipe": "stored message (pipelined)", "consume": "consumed and acked message"}.get(args.kind, "lone send")
    print(f"{args.kind}: {ir / n:,.0f} instructions per {what}, SQLite (_pysqlite_query_execute) {sql / n:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
