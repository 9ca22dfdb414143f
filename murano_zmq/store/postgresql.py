"""The PostgreSQL store: the same Store interface, one transaction per commit().

`murano-zmq relay --store postgresql://...` (psycopg 3, the `postgresql`
extra).  It works as store/sqlite.py does: writes wait in sealed batches
(store/batch.py), commit() runs them in one transaction on the writer
connection (which the relay calls from its committer thread), and reads go
to a second, autocommit connection and see through the batches.  A confirm
goes out after the commit returns: with synchronous_commit=on that is the
WAL flushed on the primary, and on a synchronous standby too when
synchronous_standby_names names one (docs/scale-out.md).

One relay per database (per schema), held by an advisory lock; or, with
shared=True (`relay --shared`), any number of relays at once, each with
`store.shared` (store/shared.py): then acks delete only the messages this
relay holds, releases give messages back, and a commit that stores or gives
back messages notifies the other relays (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid

import msgpack

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the PostgreSQL store needs psycopg 3: pip install 'murano-zmq[postgresql]'") from exc

from . import pgconn
from .base import MailboxRow, StoredMessage
from .batched import BatchedStore
from .ids import CLOCK_BOUND, IdCeiling
from .batch import WriteBatch, replay, visible
from .faults import LockLost, StoreError
from .open import StandbyStopped, StoreUnavailable
from .claims import CHANNEL, notify

log = logging.getLogger("murano_zmq.relay")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS mailboxes (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    options BYTEA NOT NULL,
    declared BOOLEAN NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq BIGINT PRIMARY KEY,
    mailbox BIGINT NOT NULL,
    msg_id BYTEA NOT NULL UNIQUE,
    headers BYTEA NOT NULL,
    body BYTEA NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_mailbox ON messages (mailbox, seq);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (expires, seq) WHERE expires IS NOT NULL;
"""

# Serializes schema creation between relays starting at once (an advisory
# lock key: any fixed number).
_SCHEMA_LOCK = 0x6D7A7131

_COLUMNS = "seq, mailbox, msg_id, headers, body, created, expires, deliveries"


def _row(r: tuple) -> StoredMessage:
    seq, mailbox, msg_id, headers, body, created, expires, deliveries = r
    return StoredMessage(seq, mailbox, bytes(msg_id), bytes(headers), bytes(body), created, expires, deliveries)


class PostgresStore(BatchedStore):
    """exclusive=False: no relay lock (a second reader, for tests and tools)."""

    _EXPIRED_SQL = ("SELECT expires, seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires<=%s "
                    "AND (expires, seq) > (%s, %s) AND mailbox {not_dropped} ORDER BY expires, seq LIMIT %s")
    _NEXT_EXPIRY_SQL = ("SELECT expires, seq, mailbox FROM messages WHERE expires IS NOT NULL AND expires>%s "
                        "AND mailbox {not_dropped} ORDER BY expires LIMIT %s")

    shared = None  # store/shared.py's SharedDatabase with shared=True

    def __init__(self, conninfo: str, exclusive: bool = True, standby: threading.Event | None = None,
                 shared: bool = False):
        """standby: wait for the relay lock as long as it takes (a standby
        relay, taking over when the running one dies), until this event is
        set (then StandbyStopped).  shared: one of several relays on the
        database (`relay --shared`)."""
        super().__init__()
        self._shared = shared
        # Who holds claims: unique per relay start (a restarted relay's old
        # claims are not its own: they pass on at lease expiry).
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.path = pgconn.redact(conninfo)  # what the relay logs
        self._conninfo = conninfo
        self._exclusive = exclusive
        self._standby = standby
        self._lock_lost: LockLost | None = None
        self._alive_at = time.time()  # the writer's session last seen alive (check_held)
        self._check_logged = False  # a failing check_held() said so
        retried = False
        while True:
            try:
                self._connect_and_lock(retried)
                break
            except StoreUnavailable as exc:
                # A standby outlives the server's restarts and outages once
                # it has stood by: it is there for when the running relay
                # dies, and a database blip must not leave none.  (A first
                # connect that fails is a configuration to fix: exit 1.)
                if standby is None or isinstance(exc, StandbyStopped) or not exc.transient:
                    raise
                log.warning("%s; standing by again in %.0f s", exc, pgconn.STANDBY_RETRY)
                if standby.wait(pgconn.STANDBY_RETRY):
                    raise StandbyStopped("stopped while standing by") from None
                retried = True
        try:
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self._db.execute(_SCHEMA)
                self._check_schema(self._db.execute, "%s", SCHEMA_VERSION, StoreUnavailable)
            # Which new ids need no lookup (store/ids.py).  One relay per
            # database keeps it true: no one else inserts (shared: below).
            top = self._query("SELECT msg_id FROM messages WHERE msg_id < %s ORDER BY msg_id DESC LIMIT 1",
                              (CLOCK_BOUND,))
        except (psycopg.Error, StoreUnavailable) as exc:
            self._db.close()
            self._reader.close()
            if isinstance(exc, StoreUnavailable):  # (a schema of another version)
                raise
            raise self._cannot_hold(exc) from None
        self._ids = IdCeiling(bytes(top[0][0]) if top else None)
        if shared:
            from .shared import SharedDatabase

            try:
                self.shared = SharedDatabase(self, conninfo, self.path, self._owner)
            except psycopg.Error as exc:
                self.close()
                raise StoreUnavailable(f"PostgreSQL ({self.path}): {exc}".strip()) from None
            # Other relays store ids too, but only a resend (retry) can
            # be stored elsewhere: intake looks those up past the ceiling
            # (mailboxes_of(..., every=True)).

    def _connect_and_lock(self, retried: bool) -> None:
        """The writer and the reader; the relay lock on the writer's session
        (exclusive).  StoreUnavailable, `transient` for a server that went
        away after a first connect (`retried`: this is a standby's try after
        such a loss), with nothing left open."""
        self._db = self._connect(retried)  # the writer
        try:
            self._reader = self._connect(retried)
        except StoreUnavailable:
            self._db.close()
            raise
        self._session = None
        if not self._exclusive:
            return
        try:
            took_over = pgconn.take_relay_lock(self._db, self.path, self._standby, self._shared)
            # (after a lost server the lock may be free because the running
            # relay has not connected again yet: it lives, and waits too)
            if self._standby is not None and (took_over or retried):
                self._wait_out_the_old_relay()
            self._session = pgconn.session_of(self._db)
        except psycopg.Error as exc:
            away = isinstance(exc, psycopg.OperationalError) and self._db.broken
            self._db.close()
            self._reader.close()
            if not away:  # (a statement_timeout too short...)
                raise self._cannot_hold(exc) from None
            raise StoreUnavailable(f"lost PostgreSQL ({self.path}) while waiting for the relay lock: "
                                   f"{pgconn.one_line(exc)}", transient=True) from None
        except StoreUnavailable:
            self._db.close()
            self._reader.close()
            raise

    def _connect(self, retried: bool) -> psycopg.Connection:
        try:
            return pgconn.connect(self._conninfo)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL ({self.path}): {pgconn.one_line(exc)}",
                                   transient=retried and pgconn.server_away(exc)) from None

    def _cannot_hold(self, exc: psycopg.Error) -> StoreUnavailable:
        """A server that connects but cannot hold the store: a read-only one
        (a replica), a statement_timeout too short, a search_path of
        pg_temp (the reader cannot see the writer's tables)..."""
        first_line = (str(exc).strip().splitlines() or [""])[0]  # (not the query's LINE and caret)
        return StoreUnavailable(f"PostgreSQL ({self.path}) cannot hold the relay's store: "
                                f"{type(exc).__name__}: {first_line}")

    def _wait_out_the_old_relay(self) -> None:
        """(a standby that just took the lock) Wait TAKEOVER_GRACE before
        serving: the relay that held the lock may live on, its session ended
        under it, until its next commit finds the lock gone and stops it
        (pgconn.TAKEOVER_GRACE)."""
        log.warning("took the relay lock of %s; serving in %.0f s, once the relay that held it has "
                    "stopped", self.path, pgconn.TAKEOVER_GRACE)
        if self._standby.wait(pgconn.TAKEOVER_GRACE):
            raise StandbyStopped("stopped while taking over")

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except psycopg.OperationalError:
                if not (self._reader.broken or self._reader.closed):
                    raise
                self._reader = self._reconnect(self._reader, "reader")
                return self._reader.execute(sql, args).fetchall()

    def _reconnect(self, old: psycopg.Connection, which: str) -> psycopg.Connection:
        return pgconn.reconnect(old, self._conninfo, self.path, which)

    # --- at start-up ------------------------------------------------------------

    def load_mailboxes(self) -> list[MailboxRow]:
        return [MailboxRow(i, name, msgpack.unpackb(bytes(opts)), bool(declared))
                for i, name, opts, declared in self._query(
                    "SELECT id, name, options, declared FROM mailboxes ORDER BY id")]

    def mailbox_stats(self) -> dict[int, tuple[int, int]]:
        return {mb: (n, int(b or 0)) for mb, n, b in self._query(
            "SELECT mailbox, count(*), sum(octet_length(body)) FROM messages GROUP BY mailbox")}

    def reserve_seq(self, seq: int) -> None:
        with self._commit_lock:
            self._save_seq_mark(seq)

    def _save_seq_mark(self, seq: int) -> None:
        if seq > self._seq_saved:
            self._db.execute("INSERT INTO meta VALUES ('seq', %s) ON CONFLICT (key) DO UPDATE "
                             "SET value = greatest(meta.value, excluded.value)", (seq,))
            self._seq_saved = seq

    # --- reads (the dialect of store/batched.py) ------------------------------------

    def _rows_at(self, seqs: list[int]) -> dict[int, StoredMessage]:
        if not seqs:
            return {}
        return {r[0]: _row(r) for r in self._query(
            f"SELECT {_COLUMNS} FROM messages WHERE seq = ANY(%s::bigint[])", (list(seqs),))}

    def _ids_at(self, msg_ids: list[bytes]) -> list[tuple[int, int, bytes]]:
        return [(seq, mailbox, bytes(msg_id)) for seq, mailbox, msg_id in self._query(
            "SELECT seq, mailbox, msg_id FROM messages WHERE msg_id = ANY(%s::bytea[])", (msg_ids,))]

    def open_deletes(self) -> None:
        """Deletes here are never held for a later commit (relay/turn.py):
        a window read fetches every row its LIMIT allows, and held deletes
        widen it (hidden_count)."""
        return None

    held_deletes = open_deletes

    def _ready_rows(self, mailbox_id: int, after_seq: int, limit: int, max_bytes: int | None,
                    wanted: int, batches: list[WriteBatch]) -> tuple[list[StoredMessage], int | None]:
        rows: list[StoredMessage] = []
        stopped_at = None
        if max_bytes is None:
            found = self._query(f"SELECT {_COLUMNS} FROM messages WHERE mailbox=%s AND seq>%s "
                                "ORDER BY seq LIMIT %s", (mailbox_id, after_seq, wanted))
        else:  # sizes first, so bodies past max_bytes are never read
            take, size = [], 0
            for seq, length in self._query(
                    "SELECT seq, octet_length(body) FROM messages WHERE mailbox=%s AND seq>%s "
                    "ORDER BY seq LIMIT %s", (mailbox_id, after_seq, wanted)):
                if not visible(seq, mailbox_id, batches):
                    continue
                take.append(seq)
                size += length
                if len(take) >= limit or size >= max_bytes:
                    stopped_at = seq
                    break
            found = self._query(f"SELECT {_COLUMNS} FROM messages WHERE seq = ANY(%s::bigint[]) ORDER BY seq",
                                (take,)) if take else []
        for r in found:
            row = replay(_row(r), batches)
            if row is not None:
                rows.append(row)
        if max_bytes is None and len(rows) >= limit:
            stopped_at = rows[limit - 1].seq
        return rows, stopped_at

    def _not_dropped(self, dropped: list[int]) -> tuple[str, tuple]:
        return "<> ALL(%s::bigint[])", (dropped,)

    # --- commit -------------------------------------------------------------------

    def _commit_sealed(self, sealed: list[WriteBatch]) -> None:
        """One transaction for every sealed batch; returns after PostgreSQL
        acknowledged the COMMIT.  A lost connection is reconnected (within
        pgconn.RECONNECT_WINDOW) and the transaction run again; any other
        failure is a StoreError, the batches kept, for the relay's
        store-failure path (relay/server.py)."""
        if self._lock_lost is not None:  # (nothing more: the standby serves the database)
            raise StoreError(self._lock_lost)
        while True:
            try:
                self._db.execute("BEGIN")
                for batch in sealed:
                    self._write(batch)
                self._db.execute("COMMIT")
                break
            except psycopg.OperationalError as exc:
                # The server went away (a failover).  Whether this
                # transaction got in or not, running it again is safe:
                # inserts skip stored ids, deletes and updates repeat.
                if not (self._db.broken or self._db.closed):
                    self._abort()
                    raise StoreError(exc) from exc
                self._writer_back()
            except psycopg.Error as exc:  # the relay's store-failure path takes it
                self._abort()  # the batches stay, for a later commit()
                raise StoreError(exc) from exc
            except BaseException:
                self._abort()
                raise
        self._alive_at = time.time()
        if not self._shared:
            self._seq_saved = max(self._seq_saved, *(b.top_seq for b in sealed))

    def check_held(self, now: float) -> float:
        """(the relay loop, between commits) A relay with nothing to commit
        would learn only at its next commit that its session ended and a
        standby took the lock: meanwhile both would deliver.  So, every
        LOCK_CHECK_EVERY without a commit, the writer's session is asked,
        and a lost one connected again and the lock taken back (LockLost as
        in a commit: the relay stops within the standby's TAKEOVER_GRACE).
        A server that cannot be reached is asked again (_check_failed)."""
        due = self._alive_at + pgconn.LOCK_CHECK_EVERY
        if not self._exclusive or self._lock_lost is not None:
            return math.inf
        if now < due:
            return due
        if not self._commit_lock.acquire(blocking=False):
            return now + pgconn.LOCK_CHECK_EVERY  # a commit runs: it finds out
        started = time.monotonic()
        try:
            try:
                self._db.execute("SELECT 1")
            except psycopg.OperationalError:
                if not (self._db.broken or self._db.closed):
                    raise
                self._writer_back(once=True)
        except StoreError as exc:
            if exc.lock_lost:
                raise
            return self._check_failed(exc, now, time.monotonic() - started)
        except psycopg.Error as exc:
            return self._check_failed(exc, now, time.monotonic() - started)
        finally:
            self._commit_lock.release()
        self._alive_at = now
        self._check_logged = False
        return now + pgconn.LOCK_CHECK_EVERY

    def _check_failed(self, exc: Exception, now: float, took: float) -> float:
        """(check_held could not reach the server) Said once per outage;
        when to try again: soon, unless the try itself was slow."""
        if not self._check_logged:
            self._check_logged = True
            log.warning("PostgreSQL (%s): the writer's session cannot be checked (%s); trying again",
                        self.path, pgconn.one_line(exc))
        return now + (pgconn.LOCK_CHECK_RETRY if took >= pgconn.SLOW_CHECK else pgconn.LOCK_CHECK_EVERY)

    def _writer_back(self, once: bool = False) -> None:
        """(holding the commit lock, the writer's connection lost) A new one,
        the relay lock on it again (exclusive).  once: a single connect try,
        not the RECONNECT_WINDOW (the relay loop's idle check)."""
        if once:
            self._db.close()
            try:
                self._db = pgconn.connect(self._conninfo)
            except psycopg.Error as exc:
                raise StoreError(exc) from None
            log.warning("PostgreSQL writer connection lost and back (%s)", self.path)
        else:
            self._db = self._reconnect(self._db, "writer")
        self._check_logged = False
        if self._exclusive:
            self._take_lock_back()

    def _take_lock_back(self) -> None:
        """(a new writer session, the old one lost) The relay lock again,
        first ending the old session if the server still keeps it (a blip
        on the relay's side only: it holds the lock).  Refused within
        RETAKE_WAIT: a standby took it, and this relay stops for good
        (LockLost; relay/server.py Relay._halt).  The server failing again
        meanwhile: a StoreError like any other (the next commit reconnects)."""
        try:
            new = pgconn.session_of(self._db)
            pgconn.end_session(self._db, self._session)
            pgconn.take_relay_lock(self._db, self.path, None, self._shared, pgconn.RETAKE_WAIT)
        except StoreUnavailable as exc:
            self._lock_lost = LockLost(f"the relay lock was lost with the session that held it, and {exc}")
            self._db.close()  # (a session without the lock writes nothing more)
            raise StoreError(self._lock_lost) from None
        except psycopg.Error as exc:
            self._db.close()  # (the next commit connects again and asks again: never on a session without it)
            raise StoreError(exc) from exc
        self._session = new

    def _abort(self) -> None:
        if not self._db.closed and self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._db.execute("ROLLBACK")

    # Disk space is the database server's business, not the relay's: the
    # relay's full-disk handling (store/space.py) does not apply.

    def space_available(self) -> bool:
        return True

    def hold_reserve(self) -> bool:
        return True

    def drop_reserve(self) -> None:
        pass

    def close(self) -> None:
        if self._lock_lost is not None:  # (commit nothing: the standby serves the database)
            try:
                self._reader.close()
            finally:
                if self.shared is not None:
                    self.shared.close()
            return
        try:
            super().close()
        finally:
            if self.shared is not None:
                self.shared.close()

    def _write(self, batch: WriteBatch) -> None:
        if self._shared:
            return self._write_shared(batch)
        cur = self._db.cursor()
        for kind, items in batch.statements():
            if kind == "insert":
                cur.executemany(f"INSERT INTO messages ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                                "ON CONFLICT DO NOTHING", items)
            elif kind == "delete":
                cur.execute("DELETE FROM messages WHERE seq = ANY(%s::bigint[])", (list(items),))
            elif kind == "deliveries":
                cur.executemany("UPDATE messages SET deliveries=%s WHERE seq=%s", items)
            elif kind == "mailbox":
                # As SQLite's INSERT OR REPLACE: a row holding the name under another id goes.
                cur.execute("DELETE FROM mailboxes WHERE name=%s AND id<>%s", (items.name, items.id))
                cur.execute("INSERT INTO mailboxes (id, name, options, declared) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (id) DO UPDATE SET name=excluded.name, options=excluded.options, "
                            "declared=excluded.declared",
                            (items.id, items.name, msgpack.packb(items.options), items.declared))
            elif kind == "drop_mailbox":
                cur.execute("DELETE FROM messages WHERE mailbox=%s", (items,))
                cur.execute("DELETE FROM mailboxes WHERE id=%s", (items,))
        if batch.top_seq > self._seq_saved:
            cur.execute("INSERT INTO meta VALUES ('seq', %s) ON CONFLICT (key) DO UPDATE "
                        "SET value = greatest(meta.value, excluded.value)", (batch.top_seq,))
        # (_seq_saved moves in commit(), once the transaction is in.)

    def _write_shared(self, batch: WriteBatch) -> None:
        """_write() for one of several relays: deletes and delivery counts
        touch only rows that are free or this relay's (an ack that comes
        after the lease passed and another relay took the message deletes
        nothing); stored or released messages wake the relays up."""
        cur = self._db.cursor()
        mine = self._owner
        woken: dict[int, int] = {}  # mailbox id -> the lowest seq stored or given back
        for kind, items in batch.statements():
            if kind == "insert":
                cur.executemany(f"INSERT INTO messages ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                                "ON CONFLICT DO NOTHING", items)
                for r in items:
                    if woken.get(r.mailbox_id, r.seq) >= r.seq:
                        woken[r.mailbox_id] = r.seq
            elif kind == "delete":
                cur.execute("DELETE FROM messages WHERE seq = ANY(%s::bigint[]) AND (owner IS NULL OR owner=%s)",
                            (list(items), mine))
            elif kind == "deliveries":
                cur.executemany("UPDATE messages SET deliveries=%s WHERE seq=%s AND (owner IS NULL OR owner=%s)",
                                [(c, s, mine) for c, s in items])
            elif kind == "release":
                cur.execute("UPDATE messages SET owner=NULL, lease_until=NULL WHERE owner=%s "
                            "AND seq = ANY(%s::bigint[])", (mine, [s for _, s in items]))
                for m, seq in items:
                    if woken.get(m, seq) >= seq:
                        woken[m] = seq
            elif kind == "mailbox":  # ids come from the database: the row is there (or deleted since)
                cur.execute("UPDATE mailboxes SET options=%s, declared=%s, idle_ttl=%s WHERE id=%s",
                            (msgpack.packb(items.options), items.declared, items.options.get("ttl"), items.id))
            elif kind == "drop_mailbox":
                cur.execute("DELETE FROM messages WHERE mailbox=%s", (items,))
                cur.execute("DELETE FROM mailboxes WHERE id=%s", (items,))
                woken[-items] = 0  # the others forget it
            elif kind == "drop_idle":  # only if no relay touched it since the sweeper looked
                mailbox_id, grace = items
                cur.execute("WITH d AS (DELETE FROM mailboxes WHERE id=%s AND idle_until IS NOT NULL "
                            "AND idle_until < extract(epoch FROM now()) - %s RETURNING id), "
                            "m AS (DELETE FROM messages WHERE mailbox IN (SELECT id FROM d)) "
                            "SELECT pg_notify(%s, (-id)::text || ':0') FROM d", (mailbox_id, grace, CHANNEL))
        notify(self._db, woken)  # sent at COMMIT, with what it wakes them for
