"""The relay process's start-up checks and its log of store failures."""

from __future__ import annotations

import logging
import os
import time

from ..protocol.errors import StartupError
from ..store.segments import PRIVATE_DIR

log = logging.getLogger("murano_zmq.relay")

# A store failure is logged in full once; more of them within this many
# seconds are counted and summed up in one line.
STORE_FAILURE_LOG_EVERY = 30.0


class FailureLog:
    """Store failures, logged with their real cause once, then summed up
    at most every STORE_FAILURE_LOG_EVERY seconds (a full disk can fail
    every commit)."""

    def __init__(self) -> None:
        self._last_logged = float("-inf")
        self._unlogged = 0

    def note(self, exc: Exception, full: bool) -> None:
        now = time.monotonic()
        if now - self._last_logged < STORE_FAILURE_LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more store failures since the last report)" if self._unlogged else ""
        self._last_logged, self._unlogged = now, 0
        if full:
            log.error("store write failed: %s%s. The relay refuses sends (StorageFull) until space "
                      "returns, goes on delivering and taking acks, and has asked every node to "
                      "resync", exc, more)
        else:
            log.error("store write failed: %s%s. The relay reloaded its state from the store and "
                      "asked every node to resync", exc, more)


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
