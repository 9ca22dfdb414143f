"""store.shared: what a store offers when several relays share its database.

`relay --store postgresql://... --shared` (docs/scale-out.md).  SQLite and
a PostgreSQL store of one relay leave `store.shared` None, and the relay
engine keeps its single-relay path; with it the engine asks the database
where it would have asked its memory:

- seq_start(): the first seq of a block of its own (unique across relays);
- mailbox(), find_mailbox(), mailbox_by_id(): mailbox ids by name, from the
  database, so every relay numbers a mailbox alike;
- claim(): fill a READY window with messages this relay now holds (a lease
  with a deadline); renew() keeps them; release() gives them back (in the
  turn's transaction); acks delete only what this relay holds
  (store/postgresql.py);
- fileno()/take(): LISTEN/NOTIFY wake-ups, for the relay loop's poller;
- sweeper(): the lease that lets one relay at a time sweep (message TTL,
  dead letters, idle mailboxes); claim_expired(), idle_mailboxes(), touch().

Calls run on a connection of their own, from the relay loop's thread,
each its own transaction.  A lost connection is reconnected (the store's
reconnect window); any other database error is a StoreError, which the
relay's store-failure path takes.
"""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import psycopg

from . import pgconn
from .base import MailboxRow, StoredMessage
from .batch import inserted_rows, replay
from .claims import Claims, SweepLease, Wakeups, ensure_schema, notify, seq_block
from .faults import StoreError

log = logging.getLogger(__name__)

# Seconds a claim holds without renewal.  A relay renews every LEASE / 3;
# a relay killed with -9 has its claims taken by others within LEASE (plus
# their retry, RETRY_CLAIMS).  Short enough for the 2 s failover goal's
# spirit, long enough that a busy relay's turn never lets its claims lapse.
LEASE = 2.0
RETRY_CLAIMS = LEASE / 2  # expired leases send no wake-up: consumed mailboxes claim again this often
# The lease keeper renews only while the relay loop showed life this recently:
# a hung relay's claims still pass on, a loop in a long commit keeps its own.
LOOP_STALL = 30.0


def _unflushed(conn: psycopg.Connection) -> psycopg.Connection:
    """`conn` for claims, renewals and the sweeper lease, which need no
    flush: one lost with the server only makes a message free again
    (delivered again at worst, as at-least-once allows).  Confirms never
    wait on them."""
    conn.execute("SET synchronous_commit = off")
    return conn


def _mailbox_row(r) -> MailboxRow:
    mailbox_id, name, options, declared = r
    return MailboxRow(mailbox_id, name, msgpack.unpackb(bytes(options)), bool(declared))


class SharedDatabase:
    def __init__(self, store, conninfo: str, path: str, owner: str, lease: float = LEASE):
        self._store = store  # its pending batches are replayed over claimed rows
        self._conninfo, self._path = conninfo, path
        self.owner = owner
        self.lease = lease
        self.retry_claims = RETRY_CLAIMS
        self.conn = self._connect()
        ensure_schema(self.conn)
        self._claims = Claims(self.conn, owner, lease)
        self._sweep = SweepLease(self.conn, owner, lease=lease)
        self._wakeups = Wakeups(pgconn.with_defaults(conninfo))
        self._keeper = LeaseKeeper(conninfo, owner, lease)
        self._keeper.start()

    def _connect(self, old=None):
        return _unflushed(pgconn.connect(self._conninfo) if old is None else
                          pgconn.reconnect(old, self._conninfo, self._path, "claims"))

    def _run(self, fn, *args):
        """fn(*args) on the connection; reconnected once if it was lost."""
        try:
            return fn(*args)
        except psycopg.OperationalError as exc:
            if not (self.conn.broken or self.conn.closed):
                raise StoreError(exc) from exc
            self.conn = self._connect(self.conn)
            self._claims.conn = self._sweep.conn = self.conn
            try:
                return fn(*args)
            except psycopg.Error as again:
                raise StoreError(again) from again
        except psycopg.Error as exc:
            raise StoreError(exc) from exc

    def _rows(self, sql: str, args: tuple) -> list:
        return self._run(lambda: self.conn.execute(sql, args).fetchall())

    # --- numbering ---

    def seq_start(self) -> int:
        return self._run(lambda: seq_block(self.conn))  # (self.conn: the new one after a reconnect)

    def find_mailbox(self, name: str) -> MailboxRow | None:
        rows = self._rows("SELECT id, name, options, declared FROM mailboxes WHERE name=%s", (name,))
        return _mailbox_row(rows[0]) if rows else None

    def mailbox_by_id(self, mailbox_id: int) -> MailboxRow | None:
        rows = self._rows("SELECT id, name, options, declared FROM mailboxes WHERE id=%s", (mailbox_id,))
        return _mailbox_row(rows[0]) if rows else None

    def mailbox(self, name: str, options: dict, declared: bool) -> MailboxRow:
        """The mailbox `name`, made now (committed at once) unless another
        relay made it first: then the stored row, whose options win."""
        while True:
            made = self._rows(
                "INSERT INTO mailboxes (id, name, options, declared, idle_ttl, idle_until) "
                "VALUES (nextval('mailbox_ids'), %s, %s, %s, %s, extract(epoch FROM now()) + %s) "
                "ON CONFLICT (name) DO NOTHING RETURNING id",
                (name, msgpack.packb(options), declared, options.get("ttl"), options.get("ttl")))
            if made:
                return MailboxRow(made[0][0], name, options, declared)
            found = self.find_mailbox(name)
            if found is not None:  # (else deleted in between: make it again)
                return found

    # --- claims ---

    def claim(self, mailbox_id: int, limit: int, after: int = 0) -> tuple[list[StoredMessage], int]:
        """Claim up to `limit` of the mailbox's oldest free messages with seq
        > `after`: (the rows as this relay's pending writes leave them, the
        highest seq claimed or 0)."""
        batches = self._store._pending()
        rows = self._run(self._claims.claim, mailbox_id, limit, after)
        top = rows[-1].seq if rows else 0
        return [r for r in (replay(row, batches) for row in rows) if r is not None], top

    def claim_expired(self, now: float, limit: int) -> list[StoredMessage]:
        batches = self._store._pending()
        rows = self._run(self._claims.claim_expired, now, limit)
        return [r for r in (replay(row, batches) for row in rows) if r is not None]

    def pending_head(self, mailbox_id: int) -> StoredMessage | None:
        """The oldest message of the mailbox this relay stored and has not
        committed yet (no other relay can claim it yet), or None."""
        return next(inserted_rows(self._store._pending(), mailbox_id), None)

    def renew(self) -> None:
        """(the relay loop, every third of a lease) The loop is alive: the
        lease keeper goes on renewing this relay's claims."""
        self._keeper.loop_alive()

    def release(self, mailbox_id: int, seqs: list[int]) -> None:
        """Give messages back, in the turn's transaction (after the writes
        before it, e.g. their delivery counts); a wake-up goes with it."""
        if seqs:
            self._store._batches[-1]._op("release", [(mailbox_id, s) for s in seqs])

    def release_all(self) -> None:
        """At an engine's start: give back whatever this store's owner
        holds (an engine reloaded after a store failure forgot its windows
        and unacked messages); any of them may have been delivered."""
        def give_back() -> None:
            with self.conn.transaction():
                lowest: dict[int, int] = {}
                for mailbox, seq in self.conn.execute(
                        "UPDATE messages SET owner=NULL, lease_until=NULL, deliveries=greatest(deliveries, 1) "
                        "WHERE owner=%s RETURNING mailbox, seq", (self.owner,)):
                    lowest[mailbox] = min(lowest.get(mailbox, seq), seq)
                notify(self.conn, lowest)  # the others claim them at once

        self._run(give_back)

    # --- the sweeper ---

    def sweeper(self) -> bool:
        """Take or keep the sweeper lease; True while this relay holds it."""
        return self._run(self._sweep.acquire)

    def touch(self, ttls: list[tuple[int, float]]) -> set[int]:
        """Mailboxes (id, ttl) in use here: their idle clock starts again
        (the database's clock).  Returns the ids that no longer exist."""
        if not ttls:
            return set()
        ids = [i for i, _ in ttls]
        found = self._rows(
            "UPDATE mailboxes m SET idle_ttl=t.ttl, idle_until=extract(epoch FROM now()) + t.ttl "
            "FROM unnest(%s::bigint[], %s::float8[]) AS t(id, ttl) WHERE m.id=t.id RETURNING m.id",
            (ids, [t for _, t in ttls]))
        return set(ids) - {r[0] for r in found}

    def idle_mailboxes(self, grace: float, limit: int) -> list[MailboxRow]:
        """Mailboxes idle past their ttl (and `grace`: relays touch the
        mailboxes they use every third of a lease)."""
        return [_mailbox_row(r) for r in self._rows(
            "SELECT id, name, options, declared FROM mailboxes WHERE idle_until IS NOT NULL "
            "AND idle_until < extract(epoch FROM now()) - %s ORDER BY idle_until LIMIT %s", (grace, limit))]

    def drop_idle(self, mailbox_id: int, grace: float) -> None:
        """Delete an idle mailbox with its messages, in the turn's
        transaction, if it is still idle then (a relay may touch it meanwhile)."""
        self._store._batches[-1].ops.append(("drop_idle", (mailbox_id, grace)))

    # --- wake-ups ---

    def fileno(self) -> int:
        return self._wakeups.fileno()

    def take(self) -> dict[int, int]:
        """Mailbox id -> the lowest seq stored or given back in it, notified
        since (a negative id: that mailbox was deleted; id 0: claim again
        everywhere)."""
        try:
            return self._wakeups.take_seqs()
        except psycopg.Error:  # (the server went away: a failover)
            # Within the reconnect window, as the other connections: one
            # try met the standby not yet promoted ("session is read-only")
            # and sent the relay down its store-failure path (BYE to every node).
            conn = pgconn.reconnect(self._wakeups.conn, self._conninfo, self._path, "wake-ups")  # or StoreError
            try:
                self._wakeups = Wakeups(conn)
            except psycopg.Error as exc:
                conn.close()
                raise StoreError(exc) from exc  # the relay's store-failure path
            return {0: 0}  # wake-ups may have been lost

    def close(self) -> None:
        """A relay that stops hands over at once: its claims and the
        sweeper lease go back (a killed one's pass at lease expiry)."""
        try:
            if not self.conn.closed and not self.conn.broken:
                self.release_all()
                self._sweep.give_up()
        except (psycopg.Error, StoreError):
            pass
        self._keeper.stop()
        self._wakeups.close()
        self.conn.close()


class LeaseKeeper(threading.Thread):
    """Renews this relay's claims every third of a lease, on a connection
    and a thread of its own: the relay loop waits in its commits (a slow
    synchronous standby, a checkpoint), and claims renewed only from the loop
    would lapse there and let another relay deliver a message this relay's
    consumer still holds.  It renews while the loop called loop_alive()
    within LOOP_STALL, so a hung relay's claims still pass on."""

    def __init__(self, conninfo: str, owner: str, lease: float):
        super().__init__(name="lease-keeper", daemon=True)
        self._conninfo, self._owner, self._lease = conninfo, owner, lease
        self._alive_at = time.monotonic()
        self._stopping = threading.Event()

    def loop_alive(self) -> None:
        self._alive_at = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        claims = None
        while not self._stopping.wait(self._lease / 3):
            if time.monotonic() - self._alive_at > LOOP_STALL:
                continue  # the loop is hung: let the claims lapse
            try:
                if claims is None:
                    claims = Claims(_unflushed(pgconn.connect(self._conninfo)), self._owner, self._lease)
                claims.renew()
            except psycopg.Error as exc:  # (a failover): a new connection next time
                log.warning("renewing claims failed: %s", exc)
                if claims is not None:
                    claims.conn.close()
                claims = None
        if claims is not None:
            claims.conn.close()
