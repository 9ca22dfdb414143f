"""A blocking send or request on the caller's own thread (Node's fast path).

When Node's I/O thread sleeps on the sockets' FDs, a thread calling send(),
send_many() or a blocking request (declare, consume, status...) takes
`_owner`, writes its command, and polls the sockets until its reply comes,
handing everything it reads to the NodeCore as the I/O thread would; then
it hands back.  See node/sync.py for the ownership rules.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import zmq
from zmq import zmq_poll

from .sleeps import SendSlot, spin_paid, spin_poll

__all__ = ["OwnedSends"]


class OwnedSends:
    """Node's methods for sending on the caller's thread (a mixin: they use
    Node's core, sockets, locks and queues)."""

    def _take_sockets(self) -> bool:
        """Own the core and the sockets, if the I/O thread is asleep or just
        finishing a turn; not if another caller has them (then the send
        joins the I/O thread's queue and is batched with others).  An I/O
        thread asleep in zmq_poll is woken to let go of them: once, then it
        sleeps on the FDs while callers keep asking."""
        if not self._inline:
            return False
        # Asked for: the I/O thread's next sleeps leave the sockets to callers.
        self._owner_wanted = time.monotonic()
        if not self._owner.acquire(False):
            if threading.get_ident() == self._io_ident:
                return False
            if self._keeping:
                self._wake()  # out of its zmq_poll, into a sleep that lets go of them
            elif not self._io_turn:
                return False  # another caller has them
            if not self._owner.acquire(timeout=0.005):
                return False
        self._sleep.pause()  # the I/O thread sleeps on: the sockets' input is ours now
        return True

    def _send_owned(self, records: list, waiters: list, slot: SendSlot, deadline: float,
                    job: Callable[[], None] | None = None) -> None:
        """(holding _owner) write the records (or run `job`, a request that
        settles `slot`), then do the I/O thread's work until `slot` is
        settled, the deadline passes, or the wake pipe says someone else
        needs the I/O thread."""
        io, core = self._io, self._core
        clean = False  # no input can be left behind a lost FD edge (see relay_turn)
        due = None  # the core's next deadline before the last read
        try:
            with self._lock:
                if self._closed.is_set():  # (the process was checked before the locks: _send_and_wait)
                    self._check_open()
                self._check_room(records)
                if self._outgoing or self._jobs or job is not None:
                    incoming, self._outgoing = self._outgoing, deque()  # queued earlier: they go first
                    jobs, self._jobs = self._jobs, deque()
                else:  # (the usual send: nothing queued, no deques to make)
                    incoming = jobs = None
            if jobs is not None:
                if job is not None:
                    jobs.append((job, slot))  # after the others: acks before a later CANCEL
                try:
                    if jobs:
                        self._run_each(jobs)
                except BaseException:
                    # A job of another thread failed here: what others queued goes
                    # back to the I/O thread (which fails it as it would have), not lost.
                    with self._lock:
                        self._jobs.extendleft(reversed(jobs))
                        self._outgoing.extendleft(reversed(incoming))
                    self._wake()
                    raise
                incoming.extend(zip(records, waiters))
            else:
                incoming = list(zip(records, waiters))
            io.flush(time.time(), incoming)
            written = time.perf_counter()
            # Looked for without sleeping first (sleeps.spin_poll), if the
            # last answer came within the spin.
            spin_until = written + self.spin if self.spin and self._spin_pays else 0.0
            while not slot.done():
                clean = False
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                version, poller = self._caller_poll or (None, None)
                if version != io.version:
                    version, poller = self._caller_poll = (io.version, self._new_caller_poller())
                due = core.next_deadline()
                wait = min(left, due - time.time())
                # (zmq_poll itself: Poller.poll's checks and conversions cost more than they guard here)
                ready = spin_poll(poller.sockets, min(spin_until, time.perf_counter() + max(0.0, wait))) \
                    if spin_until else None
                if not ready:
                    spin_until = 0.0
                    ready = zmq_poll(poller.sockets, int(wait * 1000) + 1 if wait > 0 else 0)
                if len(ready) == 1 and ready[0][0] is io.relay_sock:
                    clean = io.relay_turn(time.time(), due)  # the usual: our CONFIRM
                    continue
                ready = dict(ready)
                if self._wake_r in ready or self._closed.is_set():
                    return  # jobs, other sends, close: the I/O thread's work
                io.turn(ready, time.time())
            self._spin_pays = spin_paid(time.perf_counter() - written, self.spin)
        finally:
            self._hand_back(clean, due if clean else None)

    def _new_caller_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in self._io.sockets():
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)  # not read here: the I/O thread drains it
        return poller

    def _hand_back(self, clean: bool = False, due: float | None = None) -> None:
        """Release the sockets; wake the I/O thread if its poll would now
        miss something: input this thread's reads took the FD edge of (not
        `clean`), a socket it does not poll yet, or an earlier deadline.
        `due`: the core's next deadline before a read that wrote nothing
        (reading only moves deadlines later), to spare asking again."""
        io = self._io
        wake = (io.version != self._io_version
                or ((due is None or due < self._armed) and self._core.next_deadline() < self._armed)
                or (not clean and io.input_waiting()))
        self._sleep.resume()
        self._owner.release()
        if wake:
            self._wake()
