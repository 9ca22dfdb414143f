"""Log lines a hostile peer cannot turn into a flood.

A peer that sends garbage, reconnects with an unknown key a thousand times a
second or asks for what it may not have makes the relay log a warning each
time.  LogRateLimit lets through LOG_BURST records of one kind (same logger,
same message template) per LOG_WINDOW seconds and counts the rest; the next
record of that kind let through says how many were suppressed.
"""

from __future__ import annotations

import logging
import threading
import time

LOG_WINDOW = 10.0  # seconds
LOG_BURST = 20  # records of one kind per window
_KINDS_LIMIT = 1000  # kinds remembered; more (unlikely: templates are few) resets the table


class LogRateLimit(logging.Filter):
    """A logging.Filter: at most `burst` records per (logger, template) per `window`
    seconds, at `level` and above; lower levels pass untouched."""

    def __init__(self, window: float = LOG_WINDOW, burst: int = LOG_BURST, level: int = logging.WARNING,
                 clock=time.monotonic):
        super().__init__()
        self.window = window
        self.burst = burst
        self.level = level
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, str], list] = {}  # kind -> [window start, let through, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        kind = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) >= _KINDS_LIMIT:
                    self._kinds.clear()
                state = self._kinds[kind] = [now, 0, 0]
            if now - state[0] >= self.window:
                state[0], state[1] = now, 0
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
            suppressed, state[2] = state[2], 0
        if suppressed:
            record.msg = f"{record.msg} [{suppressed} similar message(s) suppressed]"
        return True


_installed: dict[str, LogRateLimit] = {}


def limit_log_floods(*logger_names: str) -> None:
    """Put one LogRateLimit on each named logger (idempotent)."""
    for name in logger_names or ("murano_zmq.relay", "murano_zmq.security"):
        if name not in _installed:
            _installed[name] = LogRateLimit()
            logging.getLogger(name).addFilter(_installed[name])
