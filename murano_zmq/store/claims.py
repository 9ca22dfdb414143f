"""Building blocks for several relays over one PostgreSQL database.

The database side of `relay --shared` (store/shared.py wires them into the
store's `shared` capability; docs/scale-out.md), also tested on their own
(tests/postgresql/test_claims.py):

- Claims: a message is held by one relay at a time (`owner`, `lease_until`),
  taken with FOR UPDATE SKIP LOCKED so competing relays never wait on each
  other or take the same row; a relay that stops renewing loses its claims
  when the lease passes.  Lease times are the database's clock (now()), so
  relays' clocks need not agree.
- SweepLease: one relay at a time sweeps (message TTL, dead letters,
  mailbox TTL): a row with an owner and a deadline.
- seq_block(): each relay start numbers inside a block of its own, so seqs
  (delivery tags) are unique across relays and increase per relay (per
  sender FIFO holds while a sender stays on one relay).
- Wakeups: LISTEN/NOTIFY; a relay's commit that stores messages nobody
  claimed notifies, and every relay's loop polls the listening socket.
"""

from __future__ import annotations

import psycopg

from .base import StoredMessage

CHANNEL = "murano_mailbox"
SEQ_BLOCK_BITS = 40  # 2^40 seqs per relay start; 2^23 starts fit a BIGINT

_SCHEMA = """
ALTER TABLE messages ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS messages_by_owner ON messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, until TIMESTAMPTZ NOT NULL);
CREATE SEQUENCE IF NOT EXISTS relay_seq_blocks;
CREATE SEQUENCE IF NOT EXISTS mailbox_ids;
ALTER TABLE mailboxes ADD COLUMN IF NOT EXISTS idle_ttl DOUBLE PRECISION;
ALTER TABLE mailboxes ADD COLUMN IF NOT EXISTS idle_until DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS mailboxes_by_idle ON mailboxes (idle_until) WHERE idle_until IS NOT NULL;
"""

# Mailbox ids from the sequence stay above those a relay without --shared
# numbered in memory (max(id) + 1) before.
_BUMP_MAILBOX_IDS = ("SELECT setval('mailbox_ids', m) FROM (SELECT coalesce(max(id), 0) AS m FROM mailboxes) x "
                     "WHERE m > 0 AND m >= (SELECT last_value FROM mailbox_ids)")
# Likewise seq blocks start above every seq a relay without --shared used.
_BUMP_SEQ_BLOCKS = (f"SELECT setval('relay_seq_blocks', b) FROM (SELECT greatest("
                    f"(SELECT coalesce(max(seq), 0) FROM messages), "
                    f"(SELECT coalesce(max(value), 0) FROM meta WHERE key='seq')) >> {SEQ_BLOCK_BITS} AS b) x "
                    f"WHERE b > 0 AND b >= (SELECT last_value FROM relay_seq_blocks)")

_COLUMNS = "seq, mailbox, msg_id, headers, body, created, expires, deliveries"


def ensure_schema(conn: psycopg.Connection) -> None:
    """Add the claim columns and tables (idempotent; after the store's schema)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x6D7A7131,))
        conn.execute(_SCHEMA)
        conn.execute(_BUMP_MAILBOX_IDS)
        conn.execute(_BUMP_SEQ_BLOCKS)


def seq_block(conn: psycopg.Connection) -> int:
    """The first seq of a block no other relay start numbers in."""
    return conn.execute("SELECT nextval('relay_seq_blocks')").fetchone()[0] << SEQ_BLOCK_BITS


class Claims:
    """One relay's claims on messages.  `conn`: autocommit; each call is
    its own transaction, so a claim is visible to other relays at once."""

    def __init__(self, conn: psycopg.Connection, owner: str, lease: float):
        self.conn, self.owner, self.lease = conn, owner, lease

    def claim(self, mailbox_id: int, limit: int, after: int = 0) -> list[StoredMessage]:
        """Up to `limit` of the mailbox's oldest unclaimed (or lease-expired)
        messages with seq > `after`, now held by this relay; by seq.  A
        message taken from an owner whose lease passed may have been
        delivered: it counts one delivery at least (the consumer sees it
        `redelivered`).  (`after` lets a claim start past the acked rows
        the table has not vacuumed yet, instead of stepping over them.)"""
        return self._take("mailbox=%s AND seq > %s AND (owner IS NULL OR lease_until < now()) ORDER BY seq",
                          (mailbox_id, after), limit)

    def claim_expired(self, now: float, limit: int) -> list[StoredMessage]:
        """Up to `limit` messages whose expiry is <= `now` and that no other
        relay holds (the sweeper's: it then expires them as their owner)."""
        return self._take("expires IS NOT NULL AND expires <= %s AND (owner IS NULL OR owner = %s "
                          "OR lease_until < now()) ORDER BY expires, seq", (now, self.owner), limit)

    def _take(self, where: str, args: tuple, limit: int) -> list[StoredMessage]:
        rows = self.conn.execute(
            f"UPDATE messages SET owner=%s, lease_until=now() + make_interval(secs => %s), "
            f"deliveries = CASE WHEN owner IS NULL OR owner = %s THEN deliveries ELSE greatest(deliveries, 1) END "
            f"WHERE seq IN (SELECT seq FROM messages WHERE {where} LIMIT %s FOR UPDATE SKIP LOCKED) "
            f"RETURNING {_COLUMNS}", (self.owner, self.lease, self.owner, *args, limit)).fetchall()
        return sorted((StoredMessage(s, m, bytes(i), bytes(h), bytes(b), c, e, d)
                       for s, m, i, h, b, c, e, d in rows), key=lambda r: r.seq)

    def renew(self) -> int:
        """Push the lease of everything this relay holds; how many rows.
        Rows locked by a commit in flight (this relay's own, settling them)
        are skipped, not waited for: no lock cycle with the committer; the
        next renew (a third of a lease later) takes them."""
        return self.conn.execute(
            "UPDATE messages SET lease_until=now() + make_interval(secs => %s) WHERE seq IN "
            "(SELECT seq FROM messages WHERE owner=%s FOR UPDATE SKIP LOCKED)",
            (self.lease, self.owner)).rowcount

    def release(self, seqs: list[int]) -> int:
        """Give messages back (a consumer left): other relays may take them."""
        return self.conn.execute(
            "UPDATE messages SET owner=NULL, lease_until=NULL WHERE owner=%s AND seq = ANY(%s::bigint[])",
            (self.owner, list(seqs))).rowcount

    def settle(self, seqs: list[int]) -> int:
        """Delete acked messages this relay still holds; a message whose
        lease passed and that another relay took is not deleted (returns
        fewer than asked: those acks came too late)."""
        return self.conn.execute(
            "DELETE FROM messages WHERE owner=%s AND seq = ANY(%s::bigint[])",
            (self.owner, list(seqs))).rowcount


class SweepLease:
    """Who sweeps: at most one owner holds the lease `name` until it passes."""

    def __init__(self, conn: psycopg.Connection, owner: str, name: str = "sweeper", lease: float = 5.0):
        self.conn, self.owner, self.name, self.lease = conn, owner, name, lease

    def acquire(self) -> bool:
        """Take or renew the lease; True while this owner holds it."""
        row = self.conn.execute(
            "INSERT INTO leases (name, owner, until) VALUES (%s, %s, now() + make_interval(secs => %s)) "
            "ON CONFLICT (name) DO UPDATE SET owner=excluded.owner, until=excluded.until "
            "WHERE leases.owner=excluded.owner OR leases.until < now() RETURNING owner",
            (self.name, self.owner, self.lease)).fetchone()
        return row is not None

    def give_up(self) -> None:
        self.conn.execute("DELETE FROM leases WHERE name=%s AND owner=%s", (self.name, self.owner))


class Wakeups:
    """LISTEN on a connection of its own; fileno() goes into the relay
    loop's poller, take() returns the mailbox ids notified since."""

    def __init__(self, conninfo: str | psycopg.Connection):
        """conninfo, or an autocommit connection to listen on."""
        self.conn = conninfo if isinstance(conninfo, psycopg.Connection) else \
            psycopg.connect(conninfo, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")

    def fileno(self) -> int:
        return self.conn.fileno()

    def take(self) -> set[int]:
        return set(self.take_seqs())

    def take_seqs(self) -> dict[int, int]:
        """Mailbox id -> the lowest seq notified for it (0: not said)."""
        found: dict[int, int] = {}
        for n in self.conn.notifies(timeout=0):
            mailbox, _, seq = n.payload.partition(":")
            try:
                mailbox_id, low = int(mailbox), int(seq or 0)
            except ValueError:
                continue  # not ours
            found[mailbox_id] = min(found.get(mailbox_id, low), low)
        return found

    def close(self) -> None:
        self.conn.close()


def notify(conn: psycopg.Connection, mailbox_ids) -> None:
    """Queue a wake-up per mailbox; inside a transaction, sent at its commit
    (PostgreSQL folds duplicates within one transaction).  mailbox_ids: ids,
    or {id: the lowest seq stored or given back} (the payload "id:seq")."""
    if isinstance(mailbox_ids, dict):
        payloads = [f"{m}:{s}" for m, s in sorted(mailbox_ids.items())]
    else:
        payloads = [str(m) for m in sorted(set(mailbox_ids))]
    for payload in payloads:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
