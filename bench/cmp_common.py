"""Shared bits of bench/compare.py's workers: CPU accounting, percentiles,
the result line.  A worker runs one workload against one system and prints
one JSON line: {"metrics": {...}, "messages": N, "client_cpu_s": ...,
"server_cpu_s": ...}, CPU counted over the measured phase only."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> tuple[str, float]:
    """A /proc .../stat file's name field and its user+system CPU seconds."""
    with open(path) as f:
        head, rest = f.read().rsplit(")", 1)
    fields = rest.split()
    return head, (int(fields[11]) + int(fields[12])) / TICK


def process_cpu(pid: int | None) -> float:
    """user+system CPU seconds of process `pid` (all its threads), 0 if gone."""
    if not pid:
        return 0.0
    try:
        return _stat_cpu(f"/proc/{pid}/stat")[1]
    except (OSError, IndexError, ValueError):
        return 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid` by kind of thread: "loop" (its main
    thread), "libzmq" (ZMQbg/* threads), "other" (the rest: a relay's
    committer and checkpoint threads).  Empty if the process is gone."""
    out = {"loop": 0.0, "libzmq": 0.0, "other": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            name, seconds = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue  # a thread that ended meanwhile
        out["loop" if tid == str(pid) else "libzmq" if "ZMQbg" in name else "other"] += seconds
    return out


def own_cpu() -> float:
    """This process's CPU plus its waited-for children's (helper processes)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def lone_arguments(parser) -> None:
    """The options of the side-by-side lone-send tools (lone_paths.py,
    lone_stages.py): blocks of sends that take turns."""
    parser.add_argument("--rounds", type=int, default=10, help="rounds of one block per path (10)")
    parser.add_argument("--block", type=int, default=200, help="sends per block (200)")
    parser.add_argument("--size", type=int, default=1024, help="body bytes, at least 16 (1024)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def check_lone_arguments(parser, args) -> None:
    if args.rounds < 1 or args.block < 1 or args.size < 16:
        parser.error("--rounds and --block must be at least 1, --size at least 16")


class Meter:
    """CPU of this process (and its children) and of the server, over a phase."""

    def __init__(self, server_pid: int | None, helper_pids: tuple[int, ...] = ()):
        self.server_pid = server_pid
        self.helper_pids = helper_pids
        self.t0 = self.c0 = self.s0 = 0.0
        self.h0 = 0.0

    def start(self, helper_pids: tuple[int, ...] | None = None) -> "Meter":
        if helper_pids is not None:
            self.helper_pids = helper_pids
        self.c0, self.s0 = own_cpu(), process_cpu(self.server_pid)
        self.h0 = sum(process_cpu(p) for p in self.helper_pids)
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> dict:
        dt = time.perf_counter() - self.t0
        helpers = sum(process_cpu(p) for p in self.helper_pids) - self.h0
        return {"seconds": dt, "client_cpu_s": own_cpu() - self.c0 + max(0.0, helpers),
                "server_cpu_s": process_cpu(self.server_pid) - self.s0}


def emit(metrics: dict, messages: int, cpu: dict, **extra) -> None:
    print(json.dumps({"metrics": metrics, "messages": messages, **cpu, **extra}), flush=True)


def emit_with_server_rss(workload: str, metrics: dict, messages: int, cpu: dict, server_pid: int) -> None:
    """emit(), with the server's RSS (MB) now; the expiry workload's result is that RSS."""
    rss = 0.0
    try:
        with open(f"/proc/{server_pid}/status") as f:
            rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        pass
    if workload == "expiry":
        metrics["server_rss_mb"] = rss
    emit(metrics, messages, cpu, server_rss_mb=rss)


# send_many calls of the pipelined and backlog workloads: 10,000 messages, or
# fewer so that one call holds at most this many body bytes (10,000 bodies of
# 64 KiB would hold 656 MB at once: more than any kept heap, so every call
# would fault its memory in again).
CHUNK_MESSAGES = 10_000
CHUNK_BYTES = 32 << 20


def chunk_of(size: int) -> int:
    return max(1, min(CHUNK_MESSAGES, CHUNK_BYTES // size))


def tune_client_heap() -> None:
    """Every client process, murano-zmq's and pika's alike, keeps its freed
    heap as the relay does (murano_zmq/heap.py): without it a 64 KiB body
    costs its sender ~30 page faults, for either system."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from murano_zmq import keep_freed_memory

    keep_freed_memory()


def body_of(size: int) -> bytes:
    return os.urandom(16) + b"x" * (size - 16)


def fail(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    sys.exit(1)
