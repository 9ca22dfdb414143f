"""How Node's I/O thread sleeps, and the waiter of a blocking send.

Two sleeps (see node/sync.py): while callers send on their own threads the
I/O thread must not touch a socket during its sleep, so it waits on the
sockets' ZMQ_FDs (EpollSleep, which a caller can pause); otherwise it keeps
the sockets and waits in zmq_poll on them (PollerSleep), which costs less
Python per wake-up.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import zmq
from zmq import zmq_poll

__all__ = ["EpollSleep", "PollerSleep", "SendSlot", "spin_paid", "spin_poll"]

# A sleeping thread's wake-up here (~0.1 ms), and some: a wait that did not
# spin and took no longer than the spin and this would have paid for one.
WAKE_ALLOWANCE = 0.0002


class EpollSleep:
    """The I/O thread's sleep with the default poller: an epoll on the wake
    pipe and on an inner epoll of the sockets' FDs.  A caller that owns the
    sockets switches the inner one off (epoll_ctl takes effect in a wait
    already under way), so the input it waits for does not wake this thread
    too: no second wake-up, no fight for the GIL."""

    def __init__(self, pipe: int):
        self._pipe = pipe
        self._outer = select.epoll()
        self._outer.register(pipe, select.EPOLLIN)
        self._inner: select.epoll | None = None

    def watch(self, fds) -> None:
        """A new set of socket FDs (a fresh inner epoll: closed FDs may be reused)."""
        if self._inner is not None:
            self._outer.unregister(self._inner.fileno())
            self._inner.close()
        self._inner = select.epoll()
        for fd in fds:
            self._inner.register(fd, select.EPOLLIN)
        self._outer.register(self._inner.fileno(), select.EPOLLIN)

    def pause(self) -> None:
        self._outer.modify(self._inner.fileno(), 0)

    def resume(self) -> None:
        self._outer.modify(self._inner.fileno(), select.EPOLLIN)

    def wait(self, timeout_ms: int) -> tuple[bool, list]:
        """Sleep; (woken by the pipe?, the socket FDs that fired)."""
        woken, fired = False, []
        for fd, _ in self._outer.poll(timeout_ms / 1000):
            if fd == self._pipe:
                woken = True
            else:
                fired = [f for f, _ in self._inner.poll(0)]
        return woken, fired


class PollerSleep:
    """The I/O thread's sleep while it keeps the sockets: a Poller (zmq's,
    or Node(poller=...)'s, e.g. eventlet's) on the wake pipe and the sockets
    themselves.  zmq_poll asks each socket's ZMQ_EVENTS in C and is level-
    triggered: no input check from Python before or after.  No caller owns
    the sockets meanwhile, so there is nothing to pause."""

    def __init__(self, poller, pipe: int):
        self._poller = poller
        self._pipe = pipe
        self._socks: list = []
        poller.register(pipe, zmq.POLLIN)

    def watch(self, sockets) -> None:
        for sock in self._socks:
            self._poller.unregister(sock)
        self._socks = list(sockets)
        for sock in self._socks:
            self._poller.register(sock, zmq.POLLIN)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def wait(self, timeout_ms: int) -> tuple[bool, list]:
        """Sleep; (woken by the pipe?, the sockets with input)."""
        ready = dict(self._poller.poll(timeout_ms))
        return ready.pop(self._pipe, None) is not None, list(ready)


class SendSlot:
    """The waiter of one blocking send (or send_many): lighter than a Future
    (no Condition).  A lock taken at birth is released by whoever settles
    it, which wakes a caller blocked in wait()."""

    __slots__ = ("_gate", "_done", "result", "error")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()
        self._done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        if not self._done:
            self.result = result
            self._done = True
            self._gate.release()

    def set_exception(self, error: BaseException) -> None:
        if not self._done:
            self.error = error
            self._done = True
            self._gate.release()

    def wait(self, timeout: float) -> bool:
        return self._done or self._gate.acquire(timeout=max(0.0, timeout))


def spin_poll(items: list, until: float) -> list:
    """zmq_poll without sleeping, until there is input or time.perf_counter()
    reaches `until`, giving the CPU to any other runnable thread between
    looks (this process's and libzmq's I/O threads, the relay's on a small
    machine): what is ready, or [] then.  A thread asleep in poll() took
    ~0.1 ms to wake here, as long as the relay's own work on a lone send
    (docs/performance.md, "Session 29")."""
    while True:
        ready = zmq_poll(items, 0)
        if ready or time.perf_counter() >= until:
            return ready
        os.sched_yield()


def spin_paid(elapsed: float, spin: float) -> bool:
    """Should the next wait spin, the last answer having taken `elapsed`
    seconds?  Not after one slower than the spin (a slow or far relay):
    then the waits sleep at once, until one is answered within the spin
    and a wake-up again."""
    return elapsed <= spin + WAKE_ALLOWANCE
