"""Intake: the records of a SEND, checked and stored.

Each record is judged alone.  Ids are unique per relay: one already stored
is this message again (confirmed, not stored twice) or, in another mailbox,
a sender's mistake (refused with 406).  The store answers for every SEND
record at once, its own unwritten writes included.
"""

from __future__ import annotations

import logging

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
from ..store.base import Store
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
        self.storage_full = False  # the disk is full: store nothing new

    def store_records(self, ctx: Ctx, records: list) -> list[list]:
        """Store what may be stored; the CONFIRM's errors for the rest."""
        errors: list[list] = []
        parsed = []
        for i, record in enumerate(records):
            try:
                msg = parse_send_record(record)
            except RemoteProtocolError as exc:
                errors.append([i, Malformed.code, str(exc)])
                continue
            if not self.sessions.allowed(ctx.user, "send", msg.mailbox):
                errors.append([i, PermissionDenied.code,
                               f"{ctx.user or 'this peer'} may not send to {msg.mailbox!r}"])
                continue
            if msg.size > self.max_message_size:
                errors.append([i, MessageTooLarge.code,
                               f"message of {msg.size} bytes is over the relay's limit of "
                               f"{self.max_message_size}"])
                continue
            parsed.append((i, msg))
        stored_in = self.store.mailboxes_of([m.msg_id for _, m in parsed]) if parsed else {}
        for i, msg in parsed:
            where = stored_in.get(msg.msg_id)
            if where is not None:
                home = self.mailboxes.by_id.get(where)
                if not msg.retry and (home is None or home.name != msg.mailbox):
                    errors.append([i, PreconditionFailed.code,
                                   f"message id {msg.msg_id.hex()} is already stored in another "
                                   "mailbox (ids are unique per relay)"])
                    log.warning("duplicate message id %s for %s refused", msg.msg_id.hex(), msg.mailbox)
                continue  # (else: this message again, stored already: confirm it again)
            if self.storage_full:
                errors.append([i, StorageFull.code, "the relay's disk is full: not stored; send it again later"])
                continue
            mb = self.mailboxes.get_or_create(msg.mailbox, ctx.now)
            ttl = msg.ttl if msg.ttl is not None else mb.options.message_ttl
            try:
                # A retried record may have been delivered before the relay
                # lost it uncommitted: count that possible delivery.
                self.dead.enqueue(mb, msg.msg_id, msg.headers, msg.body, msg.created,
                                  None if ttl is None else ctx.now + ttl, int(msg.retry), ctx.now,
                                  self.delivery.unacked)
                stored_in[msg.msg_id] = mb.id
            except MailboxFull as exc:
                self.counters["rejected"] += 1
                errors.append([i, exc.code, exc.text])
        self.counters["received"] += len(records)
        return errors
