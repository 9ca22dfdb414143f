"""Intake: the records of a SEND, checked and stored.

Each record is judged alone.  Ids are unique per relay: one already stored
is this message again (confirmed, not stored twice) or, in another mailbox,
a sender's mistake (refused with 406).  The store answers for every SEND
record at once, its own unwritten writes included, and looks up only the
ids it may hold (store/ids.py).

The hot path: a record in the usual shape (a known mailbox, no headers) is
checked inline and becomes its stored row with no
object in between; the rows of a SEND go to the store in one call.
Anything else takes parse_send_record() and the general path.  A SEND whose
records are all usual, to one mailbox without limits, on an open relay,
none of them stored before (a pipelining sender's), takes one pass over its
records instead of three (store_usual).
"""

from __future__ import annotations

import logging

from ..protocol.constants import ID_SIZE
from ..protocol.errors import (
    MailboxFull,
    Malformed,
    MessageTooLarge,
    PermissionDenied,
    PreconditionFailed,
    RemoteProtocolError,
    StorageFull,
)
from ..protocol.message import parse_send_record
from ..store.base import Store, StoredMessage, field_msg_id, new_row
from .deadletters import DeadLetters
from .delivery import Delivery
from .mailboxes import Mailboxes
from .sessions import Ctx, Sessions

log = logging.getLogger("murano_zmq.relay")


class Intake:
    def __init__(self, store: Store, mailboxes: Mailboxes, dead: DeadLetters, delivery: Delivery,
                 sessions: Sessions, counters: dict, max_message_size: int):
        self.store = store
        self.mailboxes = mailboxes
        self.dead = dead
        self.delivery = delivery
        self.sessions = sessions
        self.counters = counters
        self.max_message_size = max_message_size
        self.storage_full: bool | str = False  # why nothing new is stored (RelayEngine.storage_full)
        self.shared = getattr(store, "shared", None)  # several relays share the store

    def store_records(self, ctx: Ctx, records: list) -> list[list]:
        """Store what may be stored; the CONFIRM's errors for the rest."""
        if self.store_usual(records, ctx.now):
            self.counters["received"] += len(records)
            return []
        errors: list[list] = []
        # (index, id, mailbox, headers, body, created, ttl, retry) of the records that passed
        accepted = []
        by_name = self.mailboxes.by_name
        limit = self.max_message_size
        sessions = self.sessions
        open_relay = sessions.permissions is None
        for i, record in enumerate(records):
            if usual_record(record, by_name):
                msg_id, mailbox, _, body, created, ttl, retry = record
                if not open_relay and not sessions.allowed(ctx.user, "send", mailbox):
                    errors.append(_denied(i, ctx.user, mailbox))
                elif len(body) > limit:
                    errors.append(_too_large(i, len(body), limit))
                else:
                    accepted.append((i, msg_id, mailbox, b"", body, created, ttl, retry))
                continue
            try:
                msg = parse_send_record(record)
            except RemoteProtocolError as exc:
                errors.append([i, Malformed.code, str(exc)])
                continue
            if not open_relay and not sessions.allowed(ctx.user, "send", msg.mailbox):
                errors.append(_denied(i, ctx.user, msg.mailbox))
                continue
            if msg.size > limit:
                errors.append(_too_large(i, msg.size, limit))
                continue
            accepted.append((i, msg.msg_id, msg.mailbox, msg.headers, msg.body, msg.created, msg.ttl,
                             msg.retry))
        if accepted:
            self._store(ctx, accepted, errors)
        self.counters["received"] += len(records)
        return errors

    def _store(self, ctx: Ctx, accepted: list, errors: list) -> None:
        now = ctx.now
        stored_in = self.store.mailboxes_of([a[1] for a in accepted])
        if self.shared is not None:  # a resend may have been stored through another relay
            retried = [a[1] for a in accepted if a[7] and a[1] not in stored_in]
            if retried:
                stored_in.update(self.store.mailboxes_of(retried, every=True))
        rows = []  # (mailbox, id, headers, body, created, expires, deliveries): stored in one call
        boxes = self.mailboxes
        for i, msg_id, name, headers, body, created, ttl, retry in accepted:
            if stored_in:
                where = stored_in.get(msg_id)
                if where is not None:
                    home = boxes.by_id.get(where)
                    if not retry and (home is None or home.name != name):
                        errors.append([i, PreconditionFailed.code,
                                       f"message id {msg_id.hex()} is already stored in another "
                                       "mailbox (ids are unique per relay)"])
                        log.warning("duplicate message id %s for %s refused", msg_id.hex(), name)
                    continue  # (else: this message again, stored already: confirm it again)
            if self.storage_full:
                errors.append([i, StorageFull.code, f"{self.storage_full}: not stored; send it again later"])
                continue
            mb = boxes.by_name.get(name) or boxes.get_or_create(name, now)
            if ttl is None:
                ttl = mb.options.message_ttl
            expires = None if ttl is None else now + ttl
            # A retried record may have been delivered before the relay
            # lost it uncommitted: count that possible delivery.
            deliveries = 1 if retry else 0
            opts = mb.options
            if opts.max_length is None and opts.max_bytes is None:  # no limit to check
                rows.append((mb, msg_id, headers, body, created, expires, deliveries))
            else:
                if rows:  # a drop-head reads the queue: earlier rows first
                    self.dead.enqueue_many(rows, now)
                    rows = []
                try:
                    self.dead.enqueue(mb, msg_id, headers, body, created, expires, deliveries, now,
                                      self.delivery.unacked)
                except MailboxFull as exc:
                    self.counters["rejected"] += 1
                    errors.append([i, exc.code, exc.text])
                    continue
            stored_in[msg_id] = mb.id
        if rows:
            self.dead.enqueue_many(rows, now)

    def store_usual(self, records: list, now: float) -> bool:
        """store_records() in one pass, for a SEND whose records all pass
        usual_record() to one mailbox with no length or byte limit, each
        within the size limit, on a relay that checks no permissions and
        shares no store, with ids neither repeated nor stored before: what
        the general path would store for it, with no error.  False (nothing
        changed) for anything else, which then takes the general path."""
        if self.sessions.permissions is not None or self.storage_full or self.shared is not None \
                or type(records) is not list or not records:
            return False
        first = records[0]
        if type(first) is not list or len(first) != 7:
            return False
        name = first[1]
        mb = self.mailboxes.by_name.get(name) if type(name) is str else None
        if mb is None:
            return False
        opts = mb.options
        if opts.max_length is not None or opts.max_bytes is not None:
            return False
        default_ttl, limit, mb_id = opts.message_ttl, self.max_message_size, mb.id
        dead = self.dead
        seq = dead._seq
        next_expiry = dead.next_expiry
        rows = []
        append = rows.append
        for record in records:
            # usual_record()'s checks, and one mailbox
            if type(record) is not list or len(record) != 7:
                return False
            msg_id, mailbox, headers, body, created, ttl, retry = record
            if not (mailbox == name and type(msg_id) is bytes and len(msg_id) == ID_SIZE and headers == b""
                    and type(body) is bytes and len(body) <= limit
                    and type(created) is float and created - created == 0.0 and type(retry) is bool):
                return False
            if ttl is None:
                ttl = default_ttl
            elif not ((type(ttl) is float or type(ttl) is int) and ttl > 0 and ttl - ttl == 0):
                return False
            if ttl is None:
                expires = None
            else:
                expires = now + ttl
                if next_expiry is None or expires < next_expiry:
                    next_expiry = expires
            seq += 1
            append(new_row(StoredMessage, (seq, mb_id, msg_id, b"", body, created, expires, 1 if retry else 0)))
        ids = list(map(field_msg_id, rows))
        if len(set(ids)) != len(ids) or self.store.mailboxes_of(ids):
            return False  # (a resend, or an id repeated: the general path says what each is)
        dead._seq = seq
        dead.next_expiry = next_expiry
        self.mailboxes.append_run(mb, rows, now)
        return True

    def store_alone(self, record, user: str | None, now: float) -> bool:
        """RelayEngine.send_alone's record: stored and committed here if it
        is in the usual shape, to a mailbox with no limits and no consumer,
        allowed, within the size limit, with an id the store surely does not
        hold; False (nothing changed) for anything else.  A failed commit
        raises StoreError, as commit() does."""
        if not usual_record(record, self.mailboxes.by_name):
            return False
        msg_id, name, _, body, created, ttl, retry = record
        mb = self.mailboxes.by_name[name]
        opts = mb.options
        permissions = self.sessions.permissions
        if (mb.consumers or opts.max_length is not None or opts.max_bytes is not None
                or len(body) > self.max_message_size
                or (permissions is not None and not permissions.allows(user, "send", name))
                or self.store.mailboxes_of([msg_id])):
            return False
        if ttl is None:
            ttl = opts.message_ttl
        row = self.dead.new_row(mb, msg_id, b"", body, created, None if ttl is None else now + ttl,
                                1 if retry else 0)  # (a retried record may have been out)
        mb.append_tail(row)
        mb.last_used = now
        self.counters["received"] += 1
        self.counters["confirmed"] += 1
        self.store.commit_insert([row])
        return True


def usual_record(record, by_name: dict) -> bool:
    """Is this SEND record in the usual shape: to a known mailbox, with no
    headers?  parse_send_record()'s rules, checked inline."""
    if type(record) is not list or len(record) != 7:
        return False
    msg_id, mailbox, headers, body, created, ttl, retry = record
    return (type(msg_id) is bytes and len(msg_id) == ID_SIZE and type(mailbox) is str
            and mailbox in by_name and headers == b"" and type(body) is bytes
            and type(created) is float and created - created == 0.0  # finite
            and (ttl is None or ((type(ttl) is float or type(ttl) is int)
                                 and ttl > 0 and ttl - ttl == 0))  # positive, finite
            and type(retry) is bool)


def _too_large(i: int, size: int, limit: int) -> list:
    return [i, MessageTooLarge.code, f"message of {size} bytes is over the relay's limit of {limit}"]


def _denied(i: int, user: str | None, mailbox: str) -> list:
    return [i, PermissionDenied.code, f"{user or 'this peer'} may not send to {mailbox!r}"]
