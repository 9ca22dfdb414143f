"""Helpers for tests: free ports and bounded waits (never a bare sleep)."""

from __future__ import annotations

import os
import signal
import threading
import time

from murano_zmq.testing import free_tcp_endpoint

__all__ = ["free_tcp_endpoint", "confirms_reached", "kill_mid_stream", "segment_files", "send_raw_body",
           "SpinSpy", "stopped_for", "wait_confirmed", "wait_for"]


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_confirmed(futures: list, at_least: int, timeout: float = 30) -> None:
    """Return as soon as `at_least` of `futures` are done."""
    assert confirms_reached(futures, at_least).wait(timeout), f"fewer than {at_least} confirms within {timeout}s"


def confirms_reached(futures: list, at_least: int) -> threading.Event:
    """An event set once `at_least` of `futures` are done (counted by their
    callbacks: polling thousands of futures in a loop lags far behind)."""
    reached = threading.Event()
    lock = threading.Lock()
    done = [0]

    def count(_future) -> None:
        with lock:
            done[0] += 1
            if done[0] >= at_least:
                reached.set()

    for f in list(futures):
        f.add_done_callback(count)
    return reached


def kill_mid_stream(relay, send, first: list, rest: int, at_least: int, timeout: float = 30) -> set:
    """Kill -9 `relay` while a pipelined stream to it is part confirmed.

    `first`: futures of sends already queued; once `at_least` of them are
    confirmed the relay is frozen (SIGSTOP), `rest` more sends are queued
    with `send(i)` (appended to `first`), and the relay is killed.  Frozen,
    it confirms none of those, so sends are unconfirmed at the kill however
    late this thread runs (scanning thousands of futures in a loop under
    load saw 4,500 of 5,000 confirmed by the time it saw 500).  Returns the
    ids confirmed before the kill."""
    wait_confirmed(first, at_least, timeout)
    os.kill(relay.pid, signal.SIGSTOP)
    first.extend(send(i) for i in range(rest))
    # Taken before the kill: once the relay is dead the node may be served
    # by another one at once, whose confirms are not "before the kill".
    # (Confirms the relay wrote before it froze and the node reads later
    # are left out: a subset, which is what the callers assert on.)
    confirmed = {f.result() for f in first if f.done()}
    relay.kill()
    assert at_least <= len(confirmed) < len(first)
    return confirmed


def drain(consumer, expect: int, timeout: float = 60, quiet: float = 0.5) -> list:
    """Take and ack messages until `expect` came (bounded by `timeout`),
    then until `quiet` s pass with none more (to see extras).  Not "until a
    gap": under load a relay may pause for seconds between windows."""
    seen = []
    deadline = time.monotonic() + timeout
    while len(seen) < expect and time.monotonic() < deadline:
        m = consumer.get(timeout=max(0.01, deadline - time.monotonic()))
        if m is None:
            break
        seen.append(m)
        m.ack()
    while (m := consumer.get(timeout=quiet)) is not None:
        seen.append(m)
        m.ack()
    return seen


def segment_files(data_dir) -> list[str]:
    """A SQLite store's segment files, by name (not the spare: store/segments.py)."""
    from murano_zmq.store.segments import SEGMENT_DIR

    return sorted(f for f in os.listdir(os.path.join(str(data_dir), SEGMENT_DIR)) if f.endswith(".seg"))


def send_raw_body(endpoint: str, mailbox: str, body: bytes) -> None:
    """Store `body` in `mailbox` as it is, through a raw DEALER speaking the
    wire protocol: bytes no Node would send (a node packs every body)."""
    import zmq

    from murano_zmq.protocol.frames import Cmd, decode, encode
    from murano_zmq.protocol.message import new_message_id

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    try:
        sock.send_multipart(encode(Cmd.HELLO, "raw", os.urandom(16), 60.0))
        assert sock.poll(10_000) and decode(sock.recv_multipart()).cmd == Cmd.WELCOME
        sock.send_multipart(encode(Cmd.SEND, 1, [[new_message_id(time.time()), mailbox, b"", body, time.time(),
                                                  None, False]]))
        assert sock.poll(10_000) and decode(sock.recv_multipart()).cmd == Cmd.CONFIRM
    finally:
        sock.close()


def without_journal(store):
    """`store` (an SQLiteStore) with lone sends committed through SQLite, as
    where the lone-send journal had no room at start: the lone path's own
    segment writes (store/writeback.py, zeros ahead) are then what runs."""
    store._journal.close()
    store._journal = None
    return store


class SpinSpy:
    """with SpinSpy(module) as spy: the module's spin_poll (node/sleeps.py)
    counted: each spin's end (`spins`), and whether it found input before
    it (`found`)."""

    def __init__(self, module):
        self.module, self.real = module, module.spin_poll
        self.spins: list[float] = []
        self.found: list[bool] = []

    def __call__(self, items, until):
        self.spins.append(until)
        ready = self.real(items, until)
        self.found.append(bool(ready))
        return ready

    def clear(self) -> None:
        self.spins.clear()
        self.found.clear()

    def __enter__(self) -> "SpinSpy":
        self.module.spin_poll = self
        return self

    def __exit__(self, *exc) -> None:
        self.module.spin_poll = self.real


class stopped_for:
    """with stopped_for(pid, seconds): the process stopped (SIGSTOP) now and
    continued after `seconds` by a timer (or at the block's end, at the
    latest), whatever the block does meanwhile."""

    def __init__(self, pid: int, seconds: float):
        self.pid = pid
        self.timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.timer.start()

    def __exit__(self, *exc) -> None:
        self.timer.join()
        os.kill(self.pid, signal.SIGCONT)
