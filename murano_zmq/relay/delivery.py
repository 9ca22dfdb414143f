"""Delivery and credit: consumers, DELIVER, ACK and NACK.

Each mailbox hands its ready messages to its consumers round-robin, as far
as each consumer's credit goes: `prefetch` messages out at once and, if the
consumer set one, `prefetch_bytes` of bodies.  A message out is remembered
by seq, size and delivery count; its body stays on disk.
"""

from __future__ import annotations

import logging

from ..protocol.constants import DELIVER_TURN_BYTES
from ..protocol.frames import Cmd
from ..protocol.message import is_whole
from ..store.base import Store, new_row
from .deadletters import DeadLetters
from .mailboxes import Mailboxes
from .state import Consumer, Mailbox, Peer, Unacked
from .turn import Turn

log = logging.getLogger("murano_zmq.relay")


class Delivery:
    def __init__(self, store: Store, mailboxes: Mailboxes, dead: DeadLetters, turn: Turn, counters: dict):
        self.store = store
        self.mailboxes = mailboxes
        self.dead = dead
        self.turn = turn
        self.counters = counters
        self.unacked: dict[int, Consumer] = {}  # seq -> consumer holding it
        self.boot_seq = 0  # messages up to this seq were stored before this start
        self.shared = getattr(store, "shared", None)  # several relays share the store

    # --- consumers ---

    def consume(self, peer: Peer, cid: int, mb: Mailbox, prefetch: int, endpoint: str | None,
                prefetch_bytes: int | None, now: float) -> Consumer:
        old = peer.consumers.get(cid)
        if old is not None:
            self.drop_consumer(old, now)
        if self.shared is not None and not mb.consumers:
            mb.disk_after = 0  # the first consumer here: claim from the oldest free message
        consumer = Consumer(peer, cid, mb, prefetch, endpoint, prefetch_bytes)
        peer.consumers[cid] = consumer
        mb.consumers.append(consumer)
        mb.last_used = now
        self.mailboxes.dirty.add(mb)
        return consumer

    def drop_consumer(self, consumer: Consumer, now: float) -> None:
        peer, mb = consumer.peer, consumer.mailbox
        # The idle clock starts when the last consumer goes, not before:
        # else a mailbox held for longer than its ttl would expire at once
        # with the messages just requeued.
        mb.last_used = now
        peer.consumers.pop(consumer.cid, None)
        if consumer in mb.consumers:
            mb.consumers.remove(consumer)
        entries = list(consumer.unacked.values())
        for entry in entries:
            del self.unacked[entry.seq]
        consumer.unacked.clear()
        consumer.unacked_bytes = 0
        if entries and mb.name in self.mailboxes.by_name:
            entries = self.dead.spent(mb, entries, now, self.unacked)
        for entry in entries:
            mb.returned(entry.size)
        if entries and mb.name in self.mailboxes.by_name:
            self.mailboxes.requeue(mb, entries)
            self.mailboxes.dirty.add(mb)
            for e in entries:  # expiry skipped them while they were out
                self.dead.note_expiry(e.expires)
            log.info("%d unacked message(s) of %s on %s requeued", len(entries), peer.name, mb.name)
        if not mb.consumers:
            if self.shared is not None and mb.name in self.mailboxes.by_name:
                self.mailboxes.release_window(mb)  # other relays' consumers may take them now
            self.mailboxes.schedule_idle(mb)

    # --- DELIVER ---

    def pump(self, now: float) -> None:
        """Hand ready messages to consumers with credit, round-robin."""
        dirty, self.mailboxes.dirty = self.mailboxes.dirty, set()
        shared = self.shared is not None
        by_name = self.mailboxes.by_name
        for mb in dirty:
            if not mb.consumers or mb.name not in by_name:
                continue
            # (shared: the counts are approximate; the window and the claim
            # flag also say whether there is anything to hand out)
            if mb.ready_count or (shared and (mb.ready or mb.disk_after is not None)):
                self._deliver(mb, now)

    @property
    def busy(self) -> bool:
        """More to deliver at once (a turn's byte budget stopped a pump)."""
        return bool(self.mailboxes.dirty)

    def _deliver(self, mb: Mailbox, now: float) -> None:
        # The per-message path: Consumer.can_take/hand_out, Mailbox.window_pop
        # and the handed-out counts are written inline here (a call each is a fifth of
        # this loop's instructions: bench/callgrind_lone.py consume).
        batches: dict[Consumer, list] = {}
        consumers = mb.consumers
        n = len(consumers)
        idle_rounds = 0
        budget = DELIVER_TURN_BYTES
        ready = mb.ready
        unacked = self.unacked
        boot_seq = self.boot_seq
        name = mb.name
        while idle_rounds < n:
            if budget <= 0:
                self.mailboxes.dirty.add(mb)  # the rest next turn: bounded output per turn
                break
            if not ready and not self.mailboxes.fill(mb, unacked):
                break
            consumer = consumers[mb.rr % n]
            mb.rr += 1
            out = consumer.unacked
            if len(out) >= consumer.prefetch or (consumer.prefetch_bytes is not None
                                                 and not consumer.can_take(len(ready[0].body))):
                idle_rounds += 1
                continue
            idle_rounds = 0
            row = ready.popleft()
            size = len(row.body)
            row_bytes = size + len(row.headers)
            mb.ready_window_bytes -= row_bytes
            expires = row.expires
            if expires is not None and expires <= now:
                self.store.delete([row.seq])
                self.dead.expire(mb, row, now, unacked)
                continue
            seq = row.seq
            deliveries = row.deliveries + 1
            if seq <= boot_seq and deliveries == 1:
                deliveries = 2  # may have been out before a restart
            if deliveries > 1:
                self.counters["redelivered"] += 1
            out[seq] = new_row(Unacked, (seq, size, deliveries, expires))
            consumer.unacked_bytes += size
            unacked[seq] = consumer
            mb.unacked_count += 1
            mb.unacked_bytes += size
            budget -= row_bytes
            records = batches.get(consumer)
            if records is None:
                records = batches[consumer] = []
            records.append([seq, row.msg_id, name, row.headers, row.body, row.created, expires, deliveries])
        for consumer, records in batches.items():
            self.counters["delivered"] += len(records)
            self.turn.reply_now(consumer.peer.identity, Cmd.DELIVER, consumer.cid, records)
        self.mailboxes.mark_if_low(mb)  # read ahead once the turn's output is out (Mailboxes.top_up)

    # --- settling ---

    def _take(self, peer: Peer, seq, now: float) -> tuple[Mailbox, Unacked] | None:
        """Take the unacked message `seq` back from `peer`'s consumer (None:
        settled already, or requeued after a reconnect).  Its mailbox is
        used now, and may deliver again."""
        consumer = self.unacked.get(seq) if is_whole(seq) else None
        if consumer is None or consumer.peer is not peer:
            return None
        del self.unacked[seq]
        mb = consumer.mailbox
        mb.last_used = now
        self.mailboxes.dirty.add(mb)
        return mb, consumer.take_back(seq)

    def ack(self, peer: Peer, tags: list, now: float) -> None:
        # _take, Consumer.take_back and Mailbox.settled inline: the
        # per-message path of every consumed message.
        done = []
        unacked = self.unacked
        dirty = self.mailboxes.dirty
        for seq in tags:
            consumer = unacked.get(seq) if type(seq) is int else None
            if consumer is None or consumer.peer is not peer:
                continue  # settled already, or requeued after a reconnect
            del unacked[seq]
            size = consumer.unacked.pop(seq).size
            consumer.unacked_bytes -= size
            mb = consumer.mailbox
            mb.last_used = now
            dirty.add(mb)
            mb.unacked_count -= 1
            mb.unacked_bytes -= size
            mb.count -= 1
            mb.nbytes -= size
            done.append(seq)
        if done:
            self.store.delete(done)
            self.counters["acked"] += len(done)

    def nack(self, peer: Peer, tags: list, requeue: bool, now: float) -> None:
        back: dict = {}  # mailbox -> its entries to requeue: in one call each, oldest first
        for seq in tags:
            taken = self._take(peer, seq, now)
            if taken is None:
                continue
            mb, entry = taken
            limit = mb.options.delivery_limit
            if requeue and (limit is None or entry.deliveries < limit):
                mb.returned(entry.size)
                back.setdefault(mb, []).append(entry)
                self.dead.note_expiry(entry.expires)
            else:
                self.dead.reject(mb, entry.seq, entry.size, entry.deliveries, now, self.unacked,
                                 "rejected" if not requeue else "delivery_limit")
        for mb, entries in back.items():
            self.mailboxes.requeue(mb, entries)
