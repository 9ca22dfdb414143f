"""Let murano_zmq's Node live in a process that eventlet has monkey-patched.

Once eventlet has patched ``thread``, a Node's I/O "thread" is a green
thread in the one OS thread of the process, and its wait in ``zmq_poll`` (a
C call eventlet cannot see) blocks every green thread: nothing moves again.
oslo.messaging's own functional suite patches everything when it is
imported (oslo_messaging/tests/__init__.py), and so do eventlet services.

`cooperate_if_patched()` makes CooperativePoller the Poller Nodes wait with
(`Node.default_poller`; one Node can also take `poller=`), which waits the
eventlet way: it asks libzmq without blocking, and when nothing is ready
waits on the sockets' file descriptors (ZMQ_FD, which becomes readable
when a socket's state may have changed) through eventlet's hub, so other
green threads run meanwhile.  Everything else of the Node (locks, futures,
queues) is green already under the patch, and all of it runs in one OS
thread, so it stays consistent.

Without eventlet's patch this does nothing: Nodes keep their OS threads.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import zmq

log = logging.getLogger("murano_zmq.oslo")

# Longest single wait on the descriptors before asking libzmq again, s: a
# bound on the delay should a readiness change ever go unsignalled.
_MAX_NAP = 1.0

_lock = threading.Lock()


def eventlet_patched() -> bool:
    """True when eventlet has monkey-patched threads in this process."""
    if "eventlet" not in sys.modules:
        return False
    try:
        from eventlet import patcher
    except ImportError:
        return False
    return bool(patcher.is_monkey_patched("thread"))


class CooperativePoller:
    """zmq.Poller's register / unregister / poll, waiting through eventlet."""

    def __init__(self) -> None:
        self._poller = zmq.Poller()
        self._items: list = []

    def register(self, item, flags: int = zmq.POLLIN | zmq.POLLOUT) -> None:
        self._poller.register(item, flags)
        if not any(i is item for i in self._items):
            self._items.append(item)

    def unregister(self, item) -> None:
        self._poller.unregister(item)
        self._items = [i for i in self._items if i is not item]

    def poll(self, timeout: float | None = None) -> list:
        from eventlet import sleep
        from eventlet.green import select

        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout / 1000
        while True:
            ready = self._poller.poll(0)
            if ready:
                sleep(0)  # a busy node still lets the others run
                return ready
            left = _MAX_NAP if deadline is None else min(_MAX_NAP, deadline - time.monotonic())
            if left <= 0:
                return []
            select.select([self._fileno(i) for i in self._items], [], [], left)

    @staticmethod
    def _fileno(item) -> int:
        if isinstance(item, zmq.Socket):
            return item.getsockopt(zmq.FD)
        return item if isinstance(item, int) else item.fileno()


def cooperate_if_patched() -> bool:
    """Make Nodes created from now on eventlet-cooperative, if eventlet has
    patched this process.  Returns whether it did (or had done so)."""
    if not eventlet_patched():
        return False
    from ..node.sync import Node

    with _lock:
        if Node.default_poller is CooperativePoller:
            return True
        Node.default_poller = CooperativePoller  # Node's hook: the Poller its I/O thread waits with
    log.info("eventlet has patched this process: murano-zmq nodes wait cooperatively")
    return True
