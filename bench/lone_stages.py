"""Where a one-at-a-time send's time goes, stage by stage, next to the floor's.

    python bench/lone_stages.py [--rounds 10] [--block 200] [--size 1024] [--json]

Starts this checkout's relay in a child process whose loop, engine and store
have timers wrapped around their steps, and the floor relay
(bench/floor_relay.py).  A raw client (bench/raw_relay.py) sends one message
at a time to each, each send waiting for its confirm, in blocks of --block
that take turns (the same minutes, as in bench/lone_paths.py); a third block
times the floor relay's own statements (BEGIN, INSERT, COMMIT with its
fsync) on a database of this process, one lone send's worth at a time.

Each row is a median over the sends of the relay's lone path (engine
send_alone), so the rows do not add up exactly.  "Outside the relay" is the
round trip's median less the relay's (poll return to confirm sent): the two
sockets, libzmq's I/O threads, the client.  The timers cost ~0.2 µs a step,
which the relay's rows include.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import floor_relay  # noqa: E402
from cmp_common import check_lone_arguments, lone_arguments, pct  # noqa: E402
from raw_relay import Client  # noqa: E402

from murano_zmq.testing import free_tcp_endpoint, relay_answers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# The relay's rows: (key, what it is).  A store step is timed only inside a
# lone send's commit_insert().
RELAY_STAGES = (
    ("relay", "relay: poll return to CONFIRM sent"),
    ("read", "relay: read the SEND off the socket"),
    ("engine", "relay: engine (checks, row, CONFIRM; send_alone less the store)"),
    ("store", "relay: store, commit_insert()"),
    ("begin", "store: BEGIN IMMEDIATE"),
    ("commit", "store: COMMIT (the WAL frames written)"),
    ("body", "store: large body written, its write-back started"),
    ("body_wait", "store: large body, wait for its write"),
    ("record", "store: journal record made (msgpack, CRC-32)"),
    ("journal", "store: journal record written and fdatasynced (store/journal.py)"),
    ("wal_sync", "store: WAL fdatasync"),
    ("body_after", "store: large body, pages dropped after the sync"),
    ("segment_sync", "store: large body, segment fdatasync (not on the WAL's flush)"),
    ("store_rest", "store: INSERT and the store's Python"),
    ("send", "relay: send the CONFIRM"),
    ("early", "relay: a journaled large body written to a segment after its CONFIRM (write_early)"),
    ("owed", "relay: the journaled rows into the database after a CONFIRM (write_owed; per write: 16 small "
             "rows, or the large ones the store's thread synced, 8 at a time)"),
    ("owed_sync", "relay: of which Segments.sync (the fdatasync of the bodies written early)"),
    ("early_sync", "store's thread: the bodies written early, fdatasynced beside the loop (EarlySync.run)"),
)
WARM_UP = 50  # sends to each relay before the timed ones
FLOOR_STAGES = (
    ("floor_begin", "floor store: BEGIN"),
    ("floor_insert", "floor store: INSERT"),
    ("floor_commit", "floor store: COMMIT (with its fsync)"),
)


def serve(endpoint: str, data_dir: str, out_path: str) -> int:
    """The relay, with its lone path's steps timed; writes them to
    `out_path` (JSON: stage -> seconds per send) when it stops."""
    from murano_zmq.relay.engine import RelayEngine
    from murano_zmq.relay.main import main as relay_main
    from murano_zmq.relay.server import Relay
    from murano_zmq.store.journal import Journal
    from murano_zmq.store.segments import EarlySync, Segments
    from murano_zmq.store.sqlite import SQLiteStore

    clock = time.perf_counter
    sends: list[dict] = []
    current: dict = {}
    polled = [0.0]

    def wrap(cls, name, after):
        real = getattr(cls, name)

        def timed(self, *args, **kwargs):
            t0 = clock()
            result = real(self, *args, **kwargs)
            after(t0, clock(), args, result)
            return result

        setattr(cls, name, timed)

    def add(key):
        def after(t0, t1, args, result):
            if current.get("in_store"):
                current[key] = current.get(key, 0.0) + t1 - t0
        return after

    import murano_zmq.relay.server as server

    real_poll = server.zmq_poll

    def poll(sockets, timeout):
        result = real_poll(sockets, timeout)
        polled[0] = clock()
        return result

    server.zmq_poll = poll  # (the loop's wait: zmq_poll on its Poller's sockets)
    wrap(Relay, "_read_one", lambda t0, t1, args, result: current.update(read=t1 - t0))

    def engine_done(t0, t1, args, result):
        if result is not None:
            current["engine"] = t1 - t0 - current.get("store", 0.0)
            current["lone"] = True

    wrap(RelayEngine, "send_alone", engine_done)
    real_commit_insert = SQLiteStore.commit_insert

    def commit_insert(self, messages):
        current["in_store"] = True
        t0 = clock()
        try:
            return real_commit_insert(self, messages)
        finally:
            current["in_store"] = False
            current["store"] = clock() - t0

    SQLiteStore.commit_insert = commit_insert

    def statement(t0, t1, args, result):
        if current.get("in_store"):
            key = {"BEGIN IMMEDIATE": "begin", "COMMIT": "commit"}.get(args[0])
            if key is not None:
                current[key] = current.get(key, 0.0) + t1 - t0

    wrap(SQLiteStore, "_execute_waiting", statement)
    wrap(SQLiteStore, "_sync_wal", add("wal_sync"))
    wrap(Journal, "record", add("record"))
    wrap(Journal, "append", add("journal"))
    real_write_owed = SQLiteStore.write_owed

    def write_owed(self, *args):
        owed = len(self._owed)
        t0 = clock()
        real_write_owed(self, *args)
        if len(self._owed) < owed and sends:  # (written after a CONFIRM: the last send's record)
            sends[-1]["owed"] = clock() - t0

    SQLiteStore.write_owed = write_owed
    wrap(Segments, "write_unsynced", add("body"))
    wrap(Segments, "wait_unsynced", add("body_wait"))
    wrap(Segments, "flushed", add("body_after"))
    segment_sync = add("segment_sync")

    def segment_synced(t0, t1, args, result):
        segment_sync(t0, t1, args, result)
        if sends and not current.get("in_store"):  # (write_owed's, after the last send's CONFIRM)
            sends[-1]["owed_sync"] = sends[-1].get("owed_sync", 0.0) + t1 - t0

    wrap(Segments, "sync", segment_synced)

    def early(t0, t1, args, result):
        if sends and not current.get("in_store"):  # (after the last send's CONFIRM)
            sends[-1]["early"] = sends[-1].get("early", 0.0) + t1 - t0

    wrap(Segments, "write_early", early)

    def early_synced(t0, t1, args, result):
        if sends:  # (in the store's thread, beside the loop: counted with the last send's record)
            sends[-1]["early_sync"] = t1 - t0

    wrap(EarlySync, "run", early_synced)

    def sent(t0, t1, args, result):
        if current.pop("lone", False):
            current["send"] = t1 - t0
            current["relay"] = t1 - polled[0]
            sends.append(dict(current))
        current.clear()

    wrap(Relay, "_send", sent)
    code = relay_main(["--log-level", "WARNING", "--bind", endpoint, "--data-dir", data_dir])
    for s in sends:
        timed = sum(s.get(k, 0.0) for k in ("begin", "commit", "body", "body_wait", "record", "journal",
                                             "wal_sync", "body_after", "segment_sync"))
        s["store_rest"] = s.get("store", 0.0) - timed
    with open(out_path, "w") as f:
        json.dump(sends, f)
    return code


class FloorStore:
    """The floor relay's statements (bench/floor_relay.py serve), one lone
    send's worth at a time, on a database of this process."""

    def __init__(self, path: str, size: int):
        self.db = floor_relay.open_db(path)
        self.body = b"x" * (size - 16)

    def send(self) -> dict:
        clock = time.perf_counter
        t0 = clock()
        self.db.execute("BEGIN")
        t1 = clock()
        self.db.executemany(floor_relay.INSERT, [(os.urandom(16), self.body)])
        t2 = clock()
        self.db.execute("COMMIT")
        t3 = clock()
        return {"floor_begin": t1 - t0, "floor_insert": t2 - t1, "floor_commit": t3 - t2}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        return serve(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lone_arguments(parser)
    args = parser.parse_args()
    check_lone_arguments(parser, args)
    trips: dict[str, list[float]] = {"relay": [], "floor": []}
    floor_steps: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        floor_endpoint, relay_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
        stages_path = os.path.join(tmp, "stages.json")
        os.mkdir(os.path.join(tmp, "relay"))
        floor = subprocess.Popen([sys.executable, os.path.join(HERE, "floor_relay.py"), "serve", floor_endpoint,
                                  os.path.join(tmp, "floor.db")], stdout=subprocess.PIPE)
        relay = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", relay_endpoint,
                                  os.path.join(tmp, "relay"), stages_path])
        try:
            if floor.stdout.readline().strip() != b"ready":
                raise SystemExit("the floor relay did not start")
            if not relay_answers(relay_endpoint, 15.0):
                raise SystemExit("the relay did not start")
            floor_sock = zmq.Context.instance().socket(zmq.DEALER)
            floor_sock.connect(floor_endpoint)
            client = Client(relay_endpoint, args.size)
            store = FloorStore(os.path.join(tmp, "floor-store.db"), args.size)
            floor_body = b"x" * (args.size - 16)

            def send_relay() -> None:
                client.send("lone.stages", 1)
                client.confirmed()

            def send_floor() -> None:
                floor_sock.send(os.urandom(16) + floor_body)
                floor_sock.recv()

            def block(send, out: list | None, count: int) -> None:
                for _ in range(count):
                    t0 = time.perf_counter()
                    send()
                    if out is not None:
                        out.append(time.perf_counter() - t0)

            block(send_relay, None, WARM_UP)  # (the first send makes the mailbox)
            block(send_floor, None, WARM_UP)
            for _ in range(WARM_UP):
                store.send()
            for _ in range(args.rounds):
                block(send_relay, trips["relay"], args.block)
                block(send_floor, trips["floor"], args.block)
                floor_steps += [store.send() for _ in range(args.block)]
            floor_sock.send(b"stop")
            floor_sock.close(linger=1000)
            client.sock.close(linger=1000)
            store.db.close()
        finally:
            relay.terminate()
            try:
                relay.wait(30)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
            floor.kill()
            floor.wait()
        if relay.returncode != 0 or not os.path.exists(stages_path):
            raise SystemExit(f"the relay exited with {relay.returncode} and wrote no stages")
        with open(stages_path) as f:
            relay_steps = json.load(f)[WARM_UP - 1:]  # (the warm-up's: all but the first took the lone path)
    result = {"round_trip": {"relay": pct(trips["relay"], 50) * 1e6, "floor": pct(trips["floor"], 50) * 1e6},
              "round_trip_tail": {k: {"p90_us": pct(v, 90) * 1e6, "p99_us": pct(v, 99) * 1e6}
                                  for k, v in trips.items()},
              "stages": {}}
    for key, _ in RELAY_STAGES:
        if key in ("owed", "owed_sync", "early", "early_sync"):  # (a median over the writes, not over every send)
            values = [s[key] for s in relay_steps if key in s]
        else:
            values = [s.get(key, 0.0) for s in relay_steps]
        if any(values):
            result["stages"][key] = {"p50_us": pct(values, 50) * 1e6, "p90_us": pct(values, 90) * 1e6}
    for key, _ in FLOOR_STAGES:
        values = [s[key] for s in floor_steps]
        result["stages"][key] = {"p50_us": pct(values, 50) * 1e6, "p90_us": pct(values, 90) * 1e6}
    result["outside_relay_us"] = result["round_trip"]["relay"] - result["stages"]["relay"]["p50_us"]
    result["lone_sends_timed"] = len(relay_steps)
    if args.json:
        print(json.dumps({"rounds": args.rounds, "block": args.block, "size": args.size, **result}))
        return 0
    print(f"{args.rounds} rounds of {args.block} lone sends of {args.size:,} B to each relay; "
          f"{len(relay_steps):,} took the relay's lone path")
    print("| stage | p50 | p90 |")
    print("| --- | --- | --- |")
    for key, name in (("relay", "this relay"), ("floor", "floor relay")):
        tail = result["round_trip_tail"][key]
        print(f"| round trip, {name} | {result['round_trip'][key]:,.1f} µs "
              f"| {tail['p90_us']:,.1f} µs (p99 {tail['p99_us']:,.1f}) |")
    for key, label in RELAY_STAGES + FLOOR_STAGES:
        if key in result["stages"]:
            s = result["stages"][key]
            print(f"| {label} | {s['p50_us']:,.1f} µs "
                  f"| {s['p90_us']:,.1f} µs |")
    print(f"| outside the relay (round trip less the relay's time) | {result['outside_relay_us']:,.1f} µs | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
