"""Node's I/O thread: its loop and how it sleeps.

It runs the jobs other threads queued, routes their sends, and turns the
sockets; between turns it sleeps (node/sleeps.py): in zmq_poll on the
sockets, keeping `_owner`, while no blocking send has asked for them in the
last CALLERS_RECENT seconds; on their FDs with `_owner` released otherwise,
so that a caller can send on its own thread (node/owned.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

from ..protocol.errors import NodeClosed
from .sleeps import EpollSleep, PollerSleep

__all__ = ["CALLERS_RECENT", "IOThread"]

log = logging.getLogger("murano_zmq.node")

# How long after a caller last asked for the sockets the I/O thread keeps
# sleeping on their FDs (so that callers can own them) rather than in
# zmq_poll, s.  A loop of blocking sends asks far more often than this.
CALLERS_RECENT = 0.2


class IOThread:
    """Node's I/O thread (a mixin: it uses Node's core, sockets, locks and
    queues); Node starts it on `_run`."""

    def _run(self) -> None:
        io, owner = self._io, self._owner
        owner.acquire()  # held for good once the loop ends: no caller takes closed sockets
        self._io_ident = threading.get_ident()
        self._io_turn = True
        try:
            io.bind_router()
        except BaseException as exc:
            self._start_error = exc
            self._close_wake()  # (no loop will; the caller raises the error)
            self._started.set()
            return
        self._started.set()
        keep = PollerSleep(self._poller_factory(), self._wake_r)
        if self._inline:
            self._sleep = EpollSleep(self._wake_r)
        try:
            io.connect(time.time())
            while not self._closed.is_set():
                if self._sleep is not None and time.monotonic() - self._owner_wanted < CALLERS_RECENT:
                    woken, readable = self._sleep_unowned()
                else:
                    woken, readable = self._sleep_owned(keep)
                if woken:
                    os.read(self._wake_r, 4096)  # drain, then re-arm: re-arming first could
                    self._woken = False  # swallow the byte of a wake that sets the flag in between
                if readable is None:
                    continue  # a caller took what woke us
                self._run_jobs()
                io.turn(readable, time.time(), self._take_outgoing())
            self._run_jobs()  # last acks and BYE go out with a short linger
            io.close()
        except Exception:
            log.exception("node %s I/O thread failed", self.name)
            self._closed.set()
            io.abort()
        finally:
            self._io_turn = False  # _owner stays held: callers go to the (closed) queue at once
            closed = NodeClosed(f"node {self.name} is closed")
            with self._lock:
                orphans, self._outgoing = self._outgoing, deque()
                left, self._jobs = self._jobs, deque()  # after a failed job: the ones behind it
            self._core.abandon(closed)
            # Every pending send and call learns the node is gone.
            for waiter in [w for _, w in orphans] + [w for _, w in left if w is not None]:
                if not waiter.done():
                    waiter.set_exception(closed)
            self._close_wake()

    def _sleep_owned(self, keep: PollerSleep) -> tuple[bool, list]:
        """Sleep in zmq_poll on the sockets, keeping _owner: no caller has
        asked for the sockets lately (a caller that asks now goes through
        the queue, and the sleeps after leave the sockets to callers)."""
        version = self._io.version
        if version != self._keep_version:
            keep.watch(self._io.sockets())
            self._keep_version = version
        wait = max(0.0, min(1.0, self._core.next_deadline() - time.time()))
        self._armed = time.time() + wait
        self._io_version = -1  # a later sleep on FDs asks every socket first (see _arm)
        self._io_turn = False
        self._keeping = True  # a caller that wants the sockets wakes this sleep
        try:
            if time.monotonic() - self._owner_wanted < CALLERS_RECENT:
                return False, []  # a caller asked meanwhile: it may have missed _keeping
            return keep.wait(int(wait * 1000) + 1)
        finally:
            self._keeping = False
            self._io_turn = True

    def _sleep_unowned(self) -> tuple[bool, list | None]:
        """Sleep on the sockets' FDs with _owner released, so that a caller
        can send on its own thread meanwhile (node/owned.py).  None for the
        sockets when a caller took what woke this thread."""
        owner, sleep = self._owner, self._sleep
        timeout = self._arm(sleep)
        self._io_turn = False
        owner.release()
        try:
            woken, fired = sleep.wait(timeout)  # FDs only: no socket touched unowned
        finally:
            owner.acquire()  # waits while a caller owns the sockets
            self._io_turn = True
        # Before the sleep no socket held input (see _arm), so only those
        # whose FD fired can hold some now; after a wake by the pipe, all
        # may (a caller handing back with input left).  A caller that owned
        # the sockets meanwhile may have replaced some (a new relay socket,
        # a link closed): the FDs that fired are then of the old set.
        changed = self._io.version != self._io_version
        readable = self._io.readable(None if woken or changed or timeout == 0 else fired)
        if not woken and not readable and time.time() < self._core.next_deadline():
            return False, None
        return woken, readable

    def _arm(self, sleep) -> int:
        """Watch the sockets' FDs again if they changed; the sleep's timeout,
        ms (0 when input is already queued: its FD edge is gone)."""
        version = self._io.version
        changed = version != self._io_version
        if changed:
            sleep.watch(self._io.fds())
            self._io_version = version
        wait = max(0.0, min(1.0, self._core.next_deadline() - time.time()))
        self._armed = time.time() + wait
        if self._io.input_waiting(touched_only=not changed):
            return 0  # and then every socket is asked (its FD will not fire)
        return int(wait * 1000) + 1

    def _take_outgoing(self) -> deque:
        with self._lock:
            routing, self._outgoing = self._outgoing, deque()
        return routing

    def _run_jobs(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, deque()
        try:
            self._run_each(jobs)
        except BaseException:
            with self._lock:  # the ones behind the failed job: _run's end fails their waiters
                self._jobs.extendleft(reversed(jobs))
            raise

    def _run_each(self, jobs: deque) -> None:
        """Run queued (job, waiter) pairs, taking each off `jobs` first.  A
        call's job that fails gives its error to its caller (the node goes
        on); a failure of the node's own work (acks, cancels, topics; no
        waiter) is raised, and closes the node."""
        while jobs:
            job, waiter = jobs.popleft()
            if waiter is None:
                job()
                continue
            try:
                job()
            except Exception as exc:
                log.warning("node %s: a call failed in the I/O thread: %r", self.name, exc)
                if not waiter.done():
                    waiter.set_exception(exc)
