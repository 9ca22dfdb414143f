"""Expiry and dead letters: messages that leave a mailbox unconsumed.

A message leaves by expiry (its ttl), by drop-head (a full mailbox with
overflow="drop-head"), by a consumer's reject (NACK, requeue=False), or by
coming back after its mailbox's delivery_limit of deliveries.  It
goes to the mailbox's dead-letter mailbox, made on first use, or away.  The
delete and the copy's insert go into the same store batch, so one commit
holds both: a crash keeps the message in one place or the other.
"""

from __future__ import annotations

import logging

import msgpack

from ..protocol.constants import EXPIRY_BATCH, OVERFLOW_REJECT
from ..protocol.errors import MailboxFull
from ..store.base import Store, StoredMessage, new_row
from .mailboxes import Mailboxes
from .state import Mailbox

log = logging.getLogger("murano_zmq.relay")


class DeadLetters:
    def __init__(self, store: Store, mailboxes: Mailboxes, counters: dict):
        self.store = store
        self.mailboxes = mailboxes
        self.counters = counters
        self.next_expiry: float | None = None
        self._seq = 0  # the last seq handed out

    def start(self, seq: int) -> None:
        self._seq = seq
        self.next_expiry = self.store.next_expiry(float("-inf"))

    def note_expiry(self, expires: float | None) -> None:
        if expires is not None and (self.next_expiry is None or expires < self.next_expiry):
            self.next_expiry = expires

    # --- storing, with the mailbox's limits ---

    def enqueue(self, mb: Mailbox, msg_id: bytes, headers: bytes, body: bytes, created: float,
                expires: float | None, deliveries: int, now: float, unacked,
                make_room: bool = True) -> StoredMessage:
        """Store a message in `mb`, making room by drop-head if its options
        say so and `make_room`.  A dead-lettered or moved message never makes
        its target drop heads (dead-lettered, the heads could come back to
        where it came from, and round again): a full target refuses it."""
        size = len(body)
        opts = mb.options
        too_big = opts.max_bytes is not None and size > opts.max_bytes
        while too_big or (opts.max_length is not None and mb.ready_count + 1 > opts.max_length) or (
            opts.max_bytes is not None and mb.ready_bytes + size > opts.max_bytes
        ):
            if opts.overflow == OVERFLOW_REJECT or not make_room or too_big or not mb.ready_count:
                raise MailboxFull(
                    f"mailbox {mb.name!r} is full ({mb.ready_count} messages, {mb.ready_bytes} bytes; "
                    f"max_length={opts.max_length}, max_bytes={opts.max_bytes})"
                )
            row = self.mailboxes.pop_head(mb, unacked)
            if row is None:
                break
            mb.removed(len(row.body))
            self.move(mb, row, "maxlen", now, unacked)
        self._seq += 1
        row = StoredMessage(self._seq, mb.id, msg_id, headers, body, created, expires, deliveries)
        self.mailboxes.append(mb, row, now)
        self.note_expiry(expires)
        return row

    def enqueue_many(self, items: list, now: float) -> None:
        """Store messages in mailboxes with no length or byte limit, in
        order, in one store call.  items: (mailbox, id, headers, body,
        created, expires, deliveries)."""
        seq = self._seq
        placed = []
        next_expiry = self.next_expiry
        for mb, msg_id, headers, body, created, expires, deliveries in items:
            seq += 1
            placed.append((mb, new_row(StoredMessage, (seq, mb.id, msg_id, headers, body, created, expires,
                                                       deliveries))))
            if expires is not None and (next_expiry is None or expires < next_expiry):
                next_expiry = expires
        self._seq = seq
        self.next_expiry = next_expiry
        self.mailboxes.append_many(placed, now)

    def new_row(self, mb: Mailbox, msg_id: bytes, headers: bytes, body: bytes, created: float,
                expires: float | None, deliveries: int) -> StoredMessage:
        """The next seq's row for a message to `mb`, which has no limits,
        not stored yet (the caller stores it: a lone send's path)."""
        self._seq += 1
        self.note_expiry(expires)
        return new_row(StoredMessage, (self._seq, mb.id, msg_id, headers, body, created, expires, deliveries))

    # --- leaving ---

    def move(self, mb: Mailbox, row: StoredMessage, reason: str, now: float, unacked) -> None:
        """`row` has left `mb` (deleted, counted): copy it to the mailbox's
        dead-letter mailbox, if it has one, in the same batch."""
        target = mb.options.dead_letter
        if target is None or target == mb.name:
            # (metrics: RabbitMQ counts these too, as dead_letter_strategy="disabled")
            self.counters["dropped_" + reason] = self.counters.get("dropped_" + reason, 0) + 1
            return
        dlx = self.mailboxes.get_or_create(target, now)
        headers = msgpack.unpackb(row.headers) if row.headers else {}
        headers["x-death"] = {"reason": reason, "mailbox": mb.name, "time": now,
                              "count": row.deliveries}
        ttl = dlx.options.message_ttl
        try:
            self.enqueue(dlx, row.msg_id, msgpack.packb(headers), row.body, row.created,
                         None if ttl is None else now + ttl, 0, now, unacked, make_room=False)
            self.counters["dead_lettered"] += 1
            self.counters["dead_lettered_" + reason] = self.counters.get("dead_lettered_" + reason, 0) + 1
        except MailboxFull:
            log.warning("dead-letter mailbox %s is full: dropped a message from %s", target, mb.name)
            self.counters["dropped_" + reason] = self.counters.get("dropped_" + reason, 0) + 1

    def reject(self, mb: Mailbox, seq: int, size: int, deliveries: int, now: float, unacked,
               reason: str = "rejected") -> None:
        """A consumer rejected the unacked message `seq` (or it came back
        past its delivery limit, `reason` "delivery_limit"): it leaves."""
        mb.settled(size)
        row = self.store.get(seq) if mb.options.dead_letter is not None else None
        self.store.delete([seq])
        if row is not None:
            self.move(mb, row._replace(deliveries=deliveries), reason, now, unacked)
        else:
            self.counters["dropped_" + reason] = self.counters.get("dropped_" + reason, 0) + 1

    def spent(self, mb: Mailbox, entries: list, now: float, unacked) -> list:
        """Of unacked messages (state.Unacked) coming back to `mb`, those
        delivered as often as its delivery_limit allows leave (reason
        "delivery_limit"); the others are returned, to be requeued."""
        limit = mb.options.delivery_limit
        if limit is None:
            return entries
        back = []
        for entry in entries:
            if entry.deliveries >= limit:
                self.reject(mb, entry.seq, entry.size, entry.deliveries, now, unacked, "delivery_limit")
            else:
                back.append(entry)
        return back

    def expire(self, mb: Mailbox, row: StoredMessage, now: float, unacked) -> None:
        """`row`, taken off the queue (deleted), has expired."""
        mb.removed(len(row.body))
        self.move(mb, row, "expired", now, unacked)
        self.counters["expired"] += 1

    def expire_due(self, now: float, unacked) -> None:
        """Expire every message due by `now` that is not out with a consumer
        (one that is comes back by requeue and is checked then)."""
        after = None
        while True:
            batch = self.store.expired(now, EXPIRY_BATCH, after)
            for expires, seq, mailbox_id in batch:
                after = (expires, seq)
                if seq in unacked:
                    continue
                mb = self.mailboxes.by_id.get(mailbox_id)
                if mb is None:  # a row no mailbox owns: nothing can deliver it
                    log.warning("expired message %d is in unknown mailbox %d: deleted", seq, mailbox_id)
                    self.store.delete([seq])
                    continue
                row = self.mailboxes.take_ready(mb, seq)
                if row is not None:  # (else not where the mailbox looks: paged past, never spun on)
                    self.expire(mb, row, now, unacked)
            if len(batch) < EXPIRY_BATCH:
                break
        self.next_expiry = self.store.next_expiry(now)

    def expire_claimed(self, now: float, unacked, shared, mailbox_of) -> None:
        """Shared, the sweeper only: claim the messages due by `now` that no
        other relay holds, and expire them as their owner (exactly once
        across relays: another relay's claimed ones are its to expire, when
        they come back to its window).  mailbox_of(id): the Mailbox, read
        from the database if this relay does not know it (None: gone)."""
        while True:
            batch = shared.claim_expired(now, EXPIRY_BATCH)
            skipped = False
            for row in batch:
                if row.seq in unacked:
                    skipped = True  # (claimed again: the next batch would hold it again)
                    continue  # out with a consumer here: checked when it comes back
                mb = mailbox_of(row.mailbox_id)
                if mb is None:
                    log.warning("expired message %d is in unknown mailbox %d: deleted", row.seq, row.mailbox_id)
                    self.store.delete([row.seq])
                    continue
                for held in mb.ready:
                    if held.seq == row.seq:
                        mb.window_remove(held)
                        break
                self.store.delete([row.seq])
                self.expire(mb, row, now, unacked)
            if len(batch) < EXPIRY_BATCH or skipped:
                break
        self.next_expiry = self.store.next_expiry(now)
