"""Helpers for tests: free ports and bounded waits (never a bare sleep)."""

from __future__ import annotations

import time

from murano_zmq.testing import free_tcp_endpoint

__all__ = ["free_tcp_endpoint", "wait_for"]


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
