"""The relay process's start-up checks and its log of store failures."""

from __future__ import annotations

import errno
import logging
import os
import resource
import time

from ..protocol.errors import StartupError
from ..store.segments import PRIVATE_DIR

log = logging.getLogger("murano_zmq.relay")

# A store failure is logged in full once; more of them within this many
# seconds are counted and summed up in one line.
STORE_FAILURE_LOG_EVERY = 30.0
# A store failure within this many seconds of the last one is one that a
# reload does not mend (a segment directory the relay may not write, a
# failing disk): the relay refuses sends until a probe write succeeds,
# rather than fail, reload and ask every node to resend, again and again.
STORE_FAILURE_AGAIN = 10.0
# What refused senders are told: the disk is full, or writes keep failing.
DISK_FULL = "the relay's disk is full"
WRITES_FAILING = "the relay cannot write its store (its writes keep failing)"


# How often the relay counts its open descriptors (seconds), how full the
# table may get before it says so (a fraction of the limit), and how often
# it says so at most.
DESCRIPTORS_CHECK_EVERY = 1.0
DESCRIPTORS_WARN_AT = 0.9
DESCRIPTORS_LOG_EVERY = 60.0


class DescriptorWatch:
    """The relay's descriptors against its limit.  At the limit libzmq
    cannot accept a connection: it tells only a socket monitor (a million
    events a second), and tries again at once, a core's worth of CPU, while
    new nodes time out.  The relay counts its descriptors now and then
    instead, and logs when the table is nearly or wholly full."""

    def __init__(self) -> None:
        self.due = 0.0  # when to count next (time.monotonic())
        self._logged = float("-inf")

    def check(self, now: float) -> None:
        self.due = now + DESCRIPTORS_CHECK_EVERY
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            held = len(os.listdir("/proc/self/fd")) - 1  # (less listdir's own)
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                return  # (no /proc here: nothing to tell)
            held = limit
        if held < limit * DESCRIPTORS_WARN_AT or now - self._logged < DESCRIPTORS_LOG_EVERY:
            return
        self._logged = now
        log.warning("the relay holds %d of its %d file descriptors%s; raise its limit (systemd LimitNOFILE=, "
                    "ulimit -n)", held, limit,
                    ": new nodes cannot connect, and libzmq tries their connections again at once, at a cost "
                    "in CPU" if held >= limit else "")


class FailureLog:
    """Store failures, logged with their real cause once, then summed up
    at most every STORE_FAILURE_LOG_EVERY seconds (a full disk can fail
    every commit), each kind (full disk, failed again, failed) apart."""

    def __init__(self) -> None:
        self._logged: dict[str, float] = {}  # kind -> when last logged
        self._unlogged: dict[str, int] = {}
        self._last_failed = float("-inf")  # the last failure but for a full disk

    def note(self, exc: Exception, full: bool) -> bool:
        """Log a store failure; True if it came again, within
        STORE_FAILURE_AGAIN of the last one (a full disk is not counted)."""
        now = time.monotonic()
        again = not full and now - self._last_failed < STORE_FAILURE_AGAIN
        if not full:
            self._last_failed = now
        kind = "full" if full else "again" if again else "failed"
        if now - self._logged.get(kind, float("-inf")) < STORE_FAILURE_LOG_EVERY:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return again
        unlogged = self._unlogged.pop(kind, 0)
        more = f" ({unlogged} more such store failures since the last report)" if unlogged else ""
        self._logged[kind] = now
        if full:
            log.error("store write failed: %s%s. The relay refuses sends (StorageFull) until space "
                      "returns, goes on delivering and taking acks, and has asked every node to "
                      "resync", exc, more)
        elif again:
            log.error("store write failed again: %s%s. The relay reloaded its state from the store, asked "
                      "every node to resync, and refuses sends (StorageFull) until a probe write in its "
                      "data directory succeeds (every second); it goes on delivering and taking acks",
                      exc, more)
        else:
            log.error("store write failed: %s%s. The relay reloaded its state from the store and "
                      "asked every node to resync", exc, more)
        return again


def prepare_data_dir(data_dir: str, create_parents: bool) -> None:
    """Create the data directory; StartupError if it cannot be used."""
    if os.path.isdir(data_dir):
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise StartupError(f"data directory {data_dir} is not writable by this user")
        return
    parent = os.path.dirname(os.path.abspath(data_dir))
    if not create_parents and not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise StartupError(f"data directory {data_dir}: its parent {parent} {what} "
                           "(create it, or fix --data-dir)")
    try:
        os.makedirs(data_dir, mode=PRIVATE_DIR, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
