"""Fabric: this relay's part when several relays serve from one database
(store.shared, `relay --shared`; docs/scale-out.md).

The engine's tick runs its clocks:
- every third of a lease: say the loop is alive (the store's lease keeper
  thread renews every claim this relay holds, windows and unacked
  messages, on its own connection, also while the loop waits in a
  commit), take or keep the sweeper lease, give back windows no consumer
  here needs any more, restart the idle clock of the ttl
  mailboxes used here;
- every RETRY_CLAIMS: the mailboxes consumed here claim again (a lease that
  passed, a dead relay's, sends no wake-up);
- every COUNT_EVERY: the mailboxes' counts are read again from the
  database (between two reads they move with this relay's own traffic
  only: they are approximate);
- the sweeper (one relay at a time) expires due messages that no other
  relay holds and deletes idle mailboxes.
A wake-up (a commit on any relay stored or gave back messages of a mailbox)
makes a mailbox consumed here claim at once.
"""

from __future__ import annotations

import logging

from .state import Mailbox

log = logging.getLogger("murano_zmq.relay")

COUNT_EVERY = 5.0  # seconds between two reads of the counts
IDLE_BATCH = 100  # idle mailboxes one sweep deletes at most


class Fabric:
    def __init__(self, shared, mailboxes, delivery, dead):
        self.shared = shared
        self.mailboxes = mailboxes
        self.delivery = delivery
        self.dead = dead
        self.sweeping = False  # this relay holds the sweeper lease
        self._every = shared.lease / 3
        self._next_renew = float("-inf")
        self._next_retry = float("-inf")
        self._next_count = float("-inf")
        self._touched: dict[int, float] = {}  # ttl mailbox id -> when its idle clock was last restarted
        mailboxes.keep_alive = self.keep_alive

    def next_deadline(self) -> float:
        return min(self._next_renew, self._next_retry)

    def tick(self, now: float) -> None:
        if now >= self._next_renew:
            self._next_renew = now + self._every
            self.shared.renew()
            was = self.sweeping
            self.sweeping = self.shared.sweeper()
            if self.sweeping and not was:
                log.info("this relay sweeps now (expired messages, idle mailboxes)")
            self._release_unconsumed()
            self._touch(now)
            if self.sweeping:
                self._sweep_idle(now)
                # Messages other relays stored expire too: look at least this often.
                self.dead.note_expiry(now + self.shared.retry_claims)
        if now >= self._next_retry:
            self._next_retry = now + self.shared.retry_claims
            for mb in self.mailboxes.by_id.values():
                if mb.consumers:
                    self._claim_soon(mb)
        if now >= self._next_count:
            self._next_count = now + COUNT_EVERY
            self._recount()

    def wake(self) -> None:
        """The wake-up socket is readable: claim for the mailboxes notified."""
        by_id = self.mailboxes.by_id
        for mailbox_id, low in self.shared.take().items():
            if mailbox_id == 0:  # wake-ups may have been lost (reconnected)
                self._next_retry = float("-inf")
            elif mailbox_id < 0:  # deleted on another relay
                mb = by_id.get(-mailbox_id)
                if mb is not None and not mb.consumers and not mb.ready and not mb.unacked_count:
                    self.mailboxes.forget(mb)
            else:
                mb = by_id.get(mailbox_id)
                if mb is not None and mb.consumers:
                    self._claim_soon(mb, low - 1 if low else 0)

    def _claim_soon(self, mb: Mailbox, after: int = 0) -> None:
        """Claim (from seq `after` on) at the next pump."""
        if mb.disk_after is None or after < mb.disk_after:
            mb.disk_after = after
        self.mailboxes.dirty.add(mb)

    # --- expiry ---

    def expire_due(self, now: float) -> None:
        """Due messages: the sweeper's alone."""
        if self.sweeping:
            self.dead.expire_claimed(now, self.delivery.unacked, self.shared, self._mailbox_of)
        else:
            self.dead.next_expiry = None  # (the sweeper's business; a new sweeper looks at once)

    def _mailbox_of(self, mailbox_id: int) -> Mailbox | None:
        mb = self.mailboxes.by_id.get(mailbox_id)
        if mb is None:
            row = self.shared.mailbox_by_id(mailbox_id)
            if row is not None:
                mb = self.mailboxes.adopt(row, 0.0)
        return mb

    def _sweep_idle(self, now: float) -> None:
        for row in self.shared.idle_mailboxes(self.shared.lease, IDLE_BATCH):
            mb = self.mailboxes.by_id.get(row.id)
            if mb is not None and mb.consumers:
                continue  # (its touch is on its way)
            self.shared.drop_idle(row.id, self.shared.lease)
            if mb is not None:
                self.mailboxes.forget(mb)
            self._touched.pop(row.id, None)
            log.info("mailbox %s deleted: idle for %ss", row.name, row.options.get("ttl"))

    # --- idle clocks ---

    def _touch(self, now: float) -> None:
        """Restart the idle clock of the ttl mailboxes consumed or used here
        since their last touch."""
        touched = self._touched
        due = [mb for mb in self.mailboxes.by_id.values() if mb.options.ttl is not None
               and (mb.consumers or mb.last_used > touched.get(mb.id, float("-inf")))]
        self._restart_idle(due, now)

    def _restart_idle(self, due: list[Mailbox], now: float) -> set[int]:
        if not due:
            return set()
        gone = self.shared.touch([(mb.id, mb.options.ttl) for mb in due])
        for mb in due:
            if mb.id in gone:
                self._touched.pop(mb.id, None)
            else:
                self._touched[mb.id] = now
        return gone

    def keep_alive(self, placed: list, now: float) -> list:
        """Before new messages are stored: a ttl mailbox not touched for a
        third of a lease is touched now, so the sweeper cannot delete it
        under them; one it deleted already is made again (a new id) and the
        messages go there."""
        touched, every = self._touched, self._every
        stale = {mb for mb, _ in placed if mb.options.ttl is not None
                 and now - touched.get(mb.id, float("-inf")) > every}
        if not stale:
            return placed
        gone = self._restart_idle(list(stale), now)
        if not gone:
            return placed
        again: dict[int, Mailbox] = {}
        for mb in stale:
            if mb.id in gone:  # (its consumers here follow the name: Mailboxes.adopt)
                again[mb.id] = self.mailboxes.create(mb.name, mb.options, mb.declared, now)
                log.info("mailbox %s was deleted as idle meanwhile: made again", mb.name)
        return [(again[mb.id], row._replace(mailbox_id=again[mb.id].id)) if mb.id in again else (mb, row)
                for mb, row in placed]

    # --- windows and counts ---

    def _release_unconsumed(self) -> None:
        """Windows filled without a consumer here (PEEK, PURGE, MOVE) go back."""
        for mb in self.mailboxes.by_id.values():
            if mb.ready and not mb.consumers:
                self.mailboxes.release_window(mb)

    def _recount(self) -> None:
        stats = self.mailboxes.store.mailbox_stats()
        for mb in self.mailboxes.by_id.values():
            count, nbytes = stats.get(mb.id, (0, 0))
            mb.count = max(count, mb.unacked_count)
            mb.nbytes = max(nbytes, mb.unacked_bytes)
