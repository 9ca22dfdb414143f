"""A fault schedule against the delivery contract: producers and competing
consumers on several mailboxes (relay path and direct path) while, on a
random schedule from --seed, the relay, consumers and producers are killed
with SIGKILL and restarted, the relay's disk fills and is freed, and the
link between the nodes and the relay loses packets (tc netem) and recovers.

    python bench/chaos.py --minutes 2 --seed 7          # table
    python bench/chaos.py --minutes 2 --seed 7 --json   # one JSON object

Every send a producer saw confirmed and every message a consumer handed to
application code is written to a history file.  At the end the producers
stop, the faults stop, the consumers drain, and the run checks that no
confirmed message is lost and none reached application code twice within
one consumer's life.  Exit 0 only if both hold.  Allowed, and counted: a
message handed to another consumer life again (a consumer died before its
ack, or the relay lost an ack's commit), and one handed out whose send was
never confirmed (the producer died, or its send was refused StorageFull after
the relay had delivered it ahead of the commit that failed).

As root it mounts a tmpfs for the relay's data directory (disk faults) and
puts the relay in one network namespace and the nodes in another, joined by
a veth pair (link faults); without root those parts are skipped, with a
line that says so.  Every process is stopped by PID; namespaces and mounts
are removed even when the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaos_world import World  # noqa: E402

from murano_zmq.argtypes import positive_seconds  # noqa: E402

MAILBOXES = 3
PADDING = (0, 0, 0, 0, 1024, 64 * 1024)  # body padding a producer picks from, bytes
# seconds between two faults, and how long one lasts
GAP = (1.0, 4.0)
HOLD = (0.5, 3.0)
DRAIN_SECONDS = 90

# --- the roles (each runs in a child process: python bench/chaos.py --role ...) ---------


def run_producer(relay: str, name: str, history: str, direct: bool, seed: int) -> None:
    from murano_zmq import MuranoZmqError, Node, StorageFull

    rng = random.Random(seed)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(history, "a", buffering=1) as out, \
            Node(name, relay=relay, heartbeat=0.2, timeout=10, direct=direct) as node:
        n = 0
        while not stop:
            mailbox = f"chaos.{rng.randrange(MAILBOXES)}"
            n += 1
            pad = b"x" * rng.choice(PADDING)  # some large bodies, so a full disk shows
            try:
                msg_id = node.send(mailbox, {"from": name, "n": n, "pad": pad})
            except StorageFull:
                out.write(f"full {mailbox}\n")
            except MuranoZmqError as exc:  # not confirmed in time: may or may not arrive
                out.write(f"unconfirmed {mailbox} {type(exc).__name__}\n")
            else:
                out.write(f"confirmed {msg_id.hex()} {mailbox}\n")
            time.sleep(rng.uniform(0.005, 0.03))


def run_consumer(relay: str, name: str, history: str) -> None:
    from murano_zmq import Node

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(history, "a", buffering=1) as out, Node(name, relay=relay, heartbeat=0.2, timeout=30) as node:
        consumers = [node.consume(f"chaos.{i}", prefetch=20) for i in range(MAILBOXES)]
        while not stop:
            idle = True
            for c in consumers:
                m = c.get(timeout=0.05)
                if m is not None:
                    idle = False
                    out.write(f"handed {m.id.hex()} {m.mailbox}\n")  # before the ack: a kill may repeat it
                    m.ack()
            if idle:
                time.sleep(0.01)


# --- the run ----------------------------------------------------------------------------


FAULTS = {"relay": "kill -9 relay", "consumer": "kill -9 consumer", "producer": "kill -9 producer",
          "disk": "fill disk", "link": "link loss"}


def run(minutes: float, seed: int, producers: int, consumers: int, netns: bool,
        faults: tuple[str, ...] = tuple(FAULTS), keep: bool = False) -> dict:
    root = os.geteuid() == 0
    work = tempfile.mkdtemp(prefix="murano-chaos-")
    world = None
    try:
        world = World(work, seed, __file__, netns=root and netns and shutil.which("ip") is not None, disk=root)
        if not root:
            world.notes.append("not root: disk and link faults skipped (they need mount and ip netns)")
        elif not netns:
            world.notes.append("link faults skipped (--no-netns)")
        kinds = [FAULTS[f] for f in faults if f not in ("disk", "link")]
        kinds += ["fill disk"] if world.mounted and "disk" in faults else []
        kinds += ["link loss"] if world.ns_nodes and "link" in faults else []
        if not kinds:
            world.notes.append("no fault can run here: producers and consumers only")
        world.start_relay()
        for i in range(consumers):
            world.start_consumer(i)
        for i in range(producers):
            world.start_producer(i)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(world.rng.uniform(*GAP), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            if kinds:
                undo = world.fault(world.rng.choice(kinds), producers, consumers)
                time.sleep(world.rng.uniform(*HOLD))
                undo()
        for i in range(producers):  # no more sends; then heal everything and drain
            world.stop(f"producer{i}")
        world.free_disk()
        world.restore_link()
        if world.procs["relay"].poll() is not None:
            world.start_relay()
        for i in range(consumers):
            if world.procs[f"consumer{i}"].poll() is not None:
                world.start_consumer(i)
        drained = drain(work, DRAIN_SECONDS)
        for i in range(consumers):
            world.stop(f"consumer{i}")
        world.stop("relay")
        result = check(work)
        result.update(seed=seed, minutes=minutes, faults=dict(world.events), notes=world.notes,
                      drained=drained, lives={k: v for k, v in world.lives.items()}, work_dir=work)
        return result
    finally:
        if world is not None:
            world.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def read_history(work: str) -> tuple[set, Counter, dict]:
    confirmed, outcomes = set(), Counter()
    handed: dict[str, list[str]] = {}  # consumer life -> ids in order
    for name in os.listdir(work):
        if not name.endswith(".history"):
            continue
        with open(os.path.join(work, name)) as f:
            lines = f.read().splitlines()
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "confirmed" and len(parts) == 3:
                confirmed.add(parts[1])
            if parts[0] == "handed" and len(parts) == 3:
                handed.setdefault(name[:-len(".history")], []).append(parts[1])
            outcomes[parts[0]] += 1
    return confirmed, outcomes, handed


def drain(work: str, timeout: float) -> bool:
    """Wait until every confirmed message was handed to application code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        confirmed, _, handed = read_history(work)
        seen = set().union(*handed.values()) if handed else set()
        if confirmed <= seen:
            return True
        time.sleep(0.5)
    return False


def check(work: str) -> dict:
    confirmed, outcomes, handed = read_history(work)
    seen = set().union(*handed.values()) if handed else set()
    dup_in_life = sum(len(ids) - len(set(ids)) for ids in handed.values())
    across = Counter(i for ids in handed.values() for i in set(ids))
    lost = confirmed - seen
    return {
        "sends_confirmed": len(confirmed),
        "sends_refused_storage_full": outcomes["full"],
        "sends_unconfirmed": outcomes["unconfirmed"],
        "handed_to_application": outcomes["handed"],
        "distinct_handed": len(seen),
        "handed_but_never_confirmed": len(seen - confirmed),
        "handed_again_to_another_life": sum(1 for n in across.values() if n > 1),
        "duplicates_within_a_life": dup_in_life,
        "lost": len(lost),
        "lost_ids": sorted(lost)[:10],
        "ok": not lost and dup_in_life == 0,
    }


def print_table(r: dict) -> None:
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"seed {r['seed']}, {r['minutes']:g} min; process lives: "
          + ", ".join(f"{k} {v}" for k, v in sorted(r["lives"].items())))
    print("faults: " + (", ".join(f"{k} x{v}" for k, v in sorted(r["faults"].items())) or "none"))
    rows = [(k, r[k]) for k in ("sends_confirmed", "sends_refused_storage_full", "sends_unconfirmed",
                                "handed_to_application", "distinct_handed", "handed_but_never_confirmed",
                                "handed_again_to_another_life", "duplicates_within_a_life", "lost")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    if r["lost_ids"]:
        print("  lost (first 10): " + " ".join(r["lost_ids"]))
    if not r["drained"]:
        print(f"  drain did not finish in {DRAIN_SECONDS}s")
    print("chaos " + ("passed: no confirmed message lost, none twice within a life" if r["ok"] else "FAILED"))


def _terminate(signum, frame):
    raise SystemExit(143)


def _faults(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=positive_seconds, default=1.0, help="how long faults go on (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    p.add_argument("--producers", type=int, default=3, choices=range(1, 17), metavar="N")
    p.add_argument("--consumers", type=int, default=3, choices=range(1, 17), metavar="N")
    p.add_argument("--no-netns", action="store_true", help="no namespaces and link faults, even as root")
    p.add_argument("--faults", type=_faults, default=tuple(FAULTS), metavar="LIST",
                   help=f"which faults, comma-separated (default all: {','.join(FAULTS)})")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the work directory (histories, logs)")
    p.add_argument("--role", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    p.add_argument("--relay", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--history", help=argparse.SUPPRESS)
    p.add_argument("--direct", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "producer":
        run_producer(args.relay, args.name, args.history, bool(args.direct), args.seed)
        return 0
    if args.role == "consumer":
        run_consumer(args.relay, args.name, args.history)
        return 0
    signal.signal(signal.SIGTERM, _terminate)  # clean up (processes, namespaces, mount) on SIGTERM too
    result = run(args.minutes, args.seed, args.producers, args.consumers, not args.no_netns, args.faults,
                 args.keep)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
