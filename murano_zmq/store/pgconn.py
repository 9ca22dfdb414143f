"""PostgreSQL connections for the store: defaults, the relay lock, reconnecting.

Kept apart from store/postgresql.py (the Store itself) so each stays short.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from .faults import StoreError
from .open import StandbyStopped, StoreUnavailable

log = logging.getLogger("murano_zmq.relay")

# A relay must not hang on a dead server forever.
CONNECT_TIMEOUT = 10  # seconds, per host tried

# Held by the running relay's writer session for as long as it lives: the
# engine owns its database (seqs, windows, sweeps are in its memory), so a
# second relay on the same database (schema) is refused until the first
# one's session ends.  PostgreSQL ends it when the relay dies (its socket
# closes; on a dead machine, when TCP keepalives give up).
RELAY_LOCK_SQL = "SELECT pg_try_advisory_lock(%s, hashtext(current_schema()))"
# Relays started with --shared hold the same lock shared: any number of
# them at once, none while a relay without --shared runs, and the reverse.
SHARED_LOCK_SQL = "SELECT pg_try_advisory_lock_shared(%s, hashtext(current_schema()))"
RELAY_LOCK = 0x6D7A7132
LOCK_WAIT = 3.0  # seconds: a session that just closed may hold the lock a moment longer
STANDBY_POLL = 0.05  # a standby relay asks for the lock this often (seconds)
# The lock goes with the running relay's session, and that relay may live
# on: a session ended under it (pg_terminate_backend, a network blip, a
# server restart) it learns of at its next commit (any ack or send makes
# one) or check, and when it cannot take the lock back within RETAKE_WAIT
# it stops (Relay._halt).  A standby that took the lock from a running
# relay waits TAKEOVER_GRACE before it serves: serving before that, two
# relays would deliver the same messages.
RETAKE_WAIT = 1.0
TAKEOVER_GRACE = RETAKE_WAIT + 1.0
STANDBY_RETRY = 1.0  # a standby that lost the server (or never reached it) tries again this often
# A relay with no commits to make asks its session every LOCK_CHECK_EVERY
# (PostgresStore.check_held): an idle relay, too, stops within the grace.
LOCK_CHECK_EVERY = 0.5
# After a check whose connect took this long and failed (a server out of
# reach: a standby cannot reach it either), the next is LOCK_CHECK_RETRY
# later, since each may take CONNECT_TIMEOUT of the relay loop's time.  A
# connect refused at once (a server restarting) is tried again as often as
# the check runs: the standby may get the lock as soon as it is back.
SLOW_CHECK = 1.0
LOCK_CHECK_RETRY = 5.0

# After a lost connection (the primary died, a failover), how long to keep
# trying to reach a read-write server before the store gives up (StoreError).
RECONNECT_WINDOW = 30.0
RECONNECT_PAUSE = 0.2


def with_defaults(conninfo: str) -> str:
    """The conninfo with the relay's defaults, which it may override:
    keepalives and a TCP user timeout turn a server machine that vanished
    (no RST) into an error within seconds instead of a commit that hangs."""
    params = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "murano-zmq relay",
              "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
              "tcp_user_timeout": 15_000, **psycopg.conninfo.conninfo_to_dict(conninfo)}
    return psycopg.conninfo.make_conninfo(**params)


def connect(conninfo: str) -> psycopg.Connection:
    """An autocommit connection, with_defaults()."""
    return psycopg.connect(with_defaults(conninfo), autocommit=True)


def one_line(exc: BaseException) -> str:
    """An error of libpq's on one line: its hints ("Is the server running
    ...?") follow on lines of their own."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def redact(conninfo: str) -> str:
    """The conninfo without its password, for logs and errors."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparsable conninfo)"
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo(**params)


def take_relay_lock(conn: psycopg.Connection, path: str, standby: threading.Event | None,
                    shared: bool = False, wait: float = LOCK_WAIT) -> bool:
    """Take the relay lock on `conn`'s session (shared: the shared lock of
    --shared relays).  Without `standby`: within `wait` seconds, else
    StoreUnavailable.  With it: as long as it takes, until the event is set
    (StandbyStopped).  True if another relay held it first."""
    if conn.execute("SELECT current_schema()").fetchone()[0] is None:
        # (the lock's key would be NULL, and NULL reads as "taken")
        raise StoreUnavailable(f"no schema of the search_path exists on this database ({path}): "
                               "create it, or fix search_path in the URL")
    deadline = time.monotonic() + wait
    standing_by = waited = False
    while not conn.execute(SHARED_LOCK_SQL if shared else RELAY_LOCK_SQL, (RELAY_LOCK,)).fetchone()[0]:
        waited = True
        now = time.monotonic()
        if standby is None:
            if now >= deadline:
                if shared:
                    raise StoreUnavailable(f"a relay without --shared is running on this database ({path}); "
                                           "relays share a database only when all run with --shared")
                raise StoreUnavailable(f"another relay is running on this database ({path}); one relay "
                                       "per database (schema), or run every relay with --shared "
                                       "(docs/scale-out.md)")
        elif standby.is_set():
            raise StandbyStopped("stopped while standing by")
        elif not standing_by and now >= deadline:
            standing_by = True
            log.info("standing by: another relay holds %s; taking over when it ends", path)
        time.sleep(STANDBY_POLL)
    return waited


def session_of(conn: psycopg.Connection) -> tuple[int, object]:
    """(backend pid, backend start) of `conn`'s session: what end_session
    needs to find it again, and no other session that got its pid since.
    (The start is None where pg_stat_activity hides it: a role set by
    `options=-c role=...`.)"""
    row = conn.execute("SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
    return conn.info.backend_pid, row[0] if row else None


def end_session(conn: psycopg.Connection, session: tuple[int, object] | None) -> None:
    """End the relay's own earlier session if the server still keeps it
    (a connection lost on the relay's side only, a network blip, which the
    server may keep alive for hours): it holds the relay lock, and the
    relay, refused its own lock, would stop for nothing.  Without its start
    time: only while that pid holds a relay lock (pg_locks shows it all)."""
    if session is None:
        return
    pid, started = session
    if started is not None:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND backend_start = %s",
                     (pid, started))
    else:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' "
                     "AND classid = %s AND objsubid = 2 AND granted", (pid, RELAY_LOCK))


# Connection failures that a wait does not mend: a password, a role, a database to fix.
_NOT_AWAY = {"28P01", "28000", "3D000", "42501"}


def server_away(exc: psycopg.Error) -> bool:
    """Did `exc` come of a server that is down or going away (worth trying
    again), rather than a configuration (a password, a database name)?"""
    return isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) not in _NOT_AWAY


def reconnect(old: psycopg.Connection, conninfo: str, path: str, which: str) -> psycopg.Connection:
    """A new connection to a read-write server (libpq tries each host of a
    multi-host conninfo), within RECONNECT_WINDOW; then StoreError, and the
    relay's store-failure path (relay/server.py) takes it from there."""
    old.close()
    log.warning("PostgreSQL %s connection lost; reconnecting (%s)", which, path)
    deadline = time.monotonic() + RECONNECT_WINDOW
    while True:
        try:
            conn = connect(conninfo)
            log.warning("PostgreSQL %s connection back", which)
            return conn
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise StoreError(exc) from None
            time.sleep(RECONNECT_PAUSE)
