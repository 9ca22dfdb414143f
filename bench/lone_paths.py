"""One-at-a-time sends through four paths in the same minutes: what the
relay adds over the floor relay, and what Node adds over a raw client.

    python bench/lone_paths.py [--rounds 10] [--block 200] [--size 1024] [--node-from TREE] [--json]

Starts this checkout's relay and the floor relay (bench/floor_relay.py),
each on a fresh data directory, and sends one message at a time, each
waiting for its confirm, in blocks of --block that take turns:

  floor      a raw DEALER to the floor relay (one frame per message)
  raw        a raw DEALER speaking the relay's wire protocol (HELLO, SEND)
  node       a Node's send()
  async      an AsyncNode's send(), awaited on an event loop of its own

With --node-from TREE, four more: a Node and an AsyncNode from this
checkout and from TREE (e.g. `git worktree add /tmp/base HEAD~1`), each in
a child process of its own, against the same relay: an A/B of the nodes'
lone paths.

Taking turns in blocks puts the paths in the same minutes of a machine
whose lone-send latency swings by 2x within an hour (docs/performance.md),
which a run per path (compare.py) cannot.  Prints p50/p90/p99 per path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cmp_common import check_lone_arguments, lone_arguments, pct  # noqa: E402
from raw_relay import Client  # noqa: E402

from murano_zmq import AsyncNode, Node  # noqa: E402
from murano_zmq.testing import RelayProcess, free_tcp_endpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ("floor", "raw", "node", "async")

# --node-from: a Node or an AsyncNode in a process of its own, importing
# murano_zmq from a given tree; it sends a block of lone sends for each line
# "N" on stdin and answers with the block's latencies (seconds) as a JSON line.
_CHILD = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from murano_zmq import AsyncNode, Node
endpoint, name, body = sys.argv[2], sys.argv[3], b"x" * int(sys.argv[4])
if sys.argv[5] == "node":
    node = Node(name, endpoint)
    def block(count):
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            node.send(name, body)
            out.append(time.perf_counter() - t0)
        return out
else:
    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(AsyncNode(name, endpoint).start())
    async def sends(count):
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            await node.send(name, body)
            out.append(time.perf_counter() - t0)
        return out
    def block(count):
        return loop.run_until_complete(sends(count))
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(block(int(line))), flush=True)
"""


class ChildNode:
    """A Node or AsyncNode (`kind`) from the tree at `root`, in a child
    process (see _CHILD)."""

    def __init__(self, root: str, endpoint: str, name: str, size: int, kind: str):
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, root, endpoint, name, str(size), kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the Node from {root} did not start")

    def block(self, out: list, count: int) -> None:
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        out.extend(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lone_arguments(parser)
    parser.add_argument("--node-from", metavar="TREE",
                        help="also a Node and an AsyncNode from another checkout (e.g. a git worktree of an "
                             "older commit) and from this checkout, each in a process of its own: an A/B of the "
                             "nodes' lone paths in the same minutes")
    args = parser.parse_args()
    check_lone_arguments(parser, args)
    if args.node_from is not None and not os.path.isdir(os.path.join(args.node_from, "murano_zmq")):
        parser.error(f"--node-from: no murano_zmq package under {args.node_from}")
    body = b"x" * args.size
    children = {}
    paths = PATHS
    if args.node_from is not None:
        children = {f"{kind} ({name}, own process)": (root, kind) for kind in ("node", "async")
                    for name, root in (("this tree", os.path.join(HERE, "..")), (args.node_from, args.node_from))}
        paths = PATHS + tuple(children)
    samples: dict[str, list[float]] = {path: [] for path in paths}
    with tempfile.TemporaryDirectory() as tmp:
        floor_endpoint = free_tcp_endpoint()
        floor = subprocess.Popen([sys.executable, os.path.join(HERE, "floor_relay.py"), "serve", floor_endpoint,
                                  os.path.join(tmp, "floor.db")], stdout=subprocess.PIPE)
        relay = None
        try:
            if floor.stdout.readline().strip() != b"ready":
                raise SystemExit("the floor relay did not start")
            os.mkdir(os.path.join(tmp, "relay"))
            relay = RelayProcess(free_tcp_endpoint(), os.path.join(tmp, "relay"), "--log-level", "WARNING").start()
            floor_sock = zmq.Context.instance().socket(zmq.DEALER)
            floor_sock.connect(floor_endpoint)
            raw = Client(relay.endpoint, args.size)
            loop = asyncio.new_event_loop()
            anode = loop.run_until_complete(AsyncNode("lone-paths-async", relay.endpoint).start())
            with Node("lone-paths", relay.endpoint) as node:

                def send_floor() -> None:
                    floor_sock.send(os.urandom(16) + body[16:])
                    floor_sock.recv()

                def send_raw() -> None:
                    raw.send("lone.raw", 1)
                    raw.confirmed()

                def send_node() -> None:
                    node.send("lone.node", body)

                async def async_block(out: list, count: int) -> None:
                    for _ in range(count):
                        t0 = time.perf_counter()
                        await anode.send("lone.async", body)
                        out.append(time.perf_counter() - t0)

                sends = {"floor": send_floor, "raw": send_raw, "node": send_node}
                for i, (path, (root, kind)) in enumerate(children.items()):
                    children[path] = ChildNode(os.path.abspath(root), relay.endpoint, f"lone.child{i}", args.size,
                                               kind)

                def block(path: str, out: list, count: int) -> None:
                    if path in children:
                        children[path].block(out, count)
                        return
                    if path == "async":  # (the loop runs only while its block does)
                        loop.run_until_complete(async_block(out, count))
                        return
                    send = sends[path]
                    for _ in range(count):
                        t0 = time.perf_counter()
                        send()
                        out.append(time.perf_counter() - t0)

                for path in paths:  # warm-up (the first send makes the mailbox)
                    block(path, [], 50)
                for _ in range(args.rounds):
                    for path in paths:
                        block(path, samples[path], args.block)
            loop.run_until_complete(anode.close())
            loop.close()
            floor_sock.send(b"stop")
            floor_sock.close(linger=1000)
        finally:
            for child in children.values():
                if isinstance(child, ChildNode):
                    child.stop()
            if relay is not None:
                relay.stop()
            floor.kill()
            floor.wait()
    result = {path: {f"p{p}_us": pct(samples[path], p) * 1e6 for p in (50, 90, 99)} for path in paths}
    if args.json:
        print(json.dumps({"rounds": args.rounds, "block": args.block, "size": args.size, "paths": result}))
        return 0
    print(f"{args.rounds} rounds of {args.block} sends of {args.size:,} B per path")
    print("| path | p50 | p90 | p99 |")
    print("| --- | --- | --- | --- |")
    for path in paths:
        r = result[path]
        print(f"| {path} | {r['p50_us']:,.0f} µs | {r['p90_us']:,.0f} µs | {r['p99_us']:,.0f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
