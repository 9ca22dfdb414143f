"""Mailboxes: their life (create, declare, delete, idle expiry) and their
ready queues (a window in memory, the rest on disk).

Every change to a mailbox's counts goes through the Mailbox methods in
state.py; this room keeps the window and the store in step.

With several relays on one database (store.shared, `relay --shared`) a
mailbox's id comes from the database by name, a new message is stored
unclaimed (the commit wakes the relays that consume it), and the window
holds only messages this relay claimed for its consumers (fill()).
"""

from __future__ import annotations

import heapq
import logging
from itertools import groupby
from operator import itemgetter

from ..protocol.constants import READY_WINDOW, READY_WINDOW_BYTES
from ..protocol.errors import Malformed, MailboxNotFound, PreconditionFailed, StorageFull
from ..protocol.options import MailboxOptions
from ..store.base import MailboxRow, Store, StoredMessage, field_body, field_seq
from .state import Mailbox

log = logging.getLogger("murano_zmq.relay")

# Requeued messages loaded back into the window at once; more, and the
# window is rebuilt from disk instead (their bodies are not in memory).
REQUEUE_LOAD = 100

# A delivery that leaves a window below TOP_UP_BELOW rows, with more of the
# queue on disk, marks it low; the loop reads it ahead (top_up(), up to
# TOP_UP_ROWS rows) once the turn's output has gone and no input waits, so
# the read overlaps the consumer's work on what it got.  Otherwise a
# delivery that finds the window empty reads a whole one (READY_WINDOW
# rows, ~3 ms for 1 KiB bodies) while that consumer waits.
TOP_UP_BELOW = READY_WINDOW // 2
TOP_UP_ROWS = 250

_MAILBOX, _ROW = itemgetter(0), itemgetter(1)  # of append_many's (mailbox, row) pairs


def _stored_options(row: MailboxRow) -> MailboxOptions:
    """A stored mailbox's options, never refused (at start, or adopted from
    a shared database): those an older release stored under looser checks
    are kept as stored, and an option of a newer release is left out, with
    a warning either way."""
    options, problem = MailboxOptions.from_stored(row.options)
    if problem is not None:
        log.warning("mailbox %r: its stored options fail this relay's checks (%s); they are kept as stored",
                    row.name, problem)
    return options


class Mailboxes:
    def __init__(self, store: Store):
        self.store = store
        self.shared = getattr(store, "shared", None)
        self.by_name: dict[str, Mailbox] = {}
        self.by_id: dict[int, Mailbox] = {}
        self.dirty: set[Mailbox] = set()  # mailboxes that may deliver now
        self.low: set[Mailbox] = set()  # windows to read ahead (top_up())
        self._idle_heap: list[tuple[float, int, str]] = []  # (deadline, mailbox id, name)
        self._next_id = 1
        self.storage_full: bool | str = False  # why DECLARE makes no new mailbox (RelayEngine.storage_full)

    def recover(self, now: float) -> None:
        stats = self.store.mailbox_stats()
        for row in self.store.load_mailboxes():
            count, nbytes = stats.get(row.id, (0, 0))
            mb = Mailbox(row.id, row.name, _stored_options(row), row.declared, now,
                         count=count, nbytes=nbytes, disk_after=0 if count else None)
            self._add(mb)
            self._next_id = max(self._next_id, row.id + 1)

    def get(self, name: str) -> Mailbox | None:
        return self.by_name.get(name)

    def get_or_create(self, name: str, now: float) -> Mailbox:
        """A mailbox a send, a consume or a dead letter names: made on first use."""
        return self.by_name.get(name) or self.create(name, MailboxOptions(), False, now)

    def create(self, name: str, options: MailboxOptions, declared: bool, now: float) -> Mailbox:
        if self.shared is not None:  # the database numbers it; another relay may have made it
            return self.adopt(self.shared.mailbox(name, options.to_map(), declared), now)
        mb = Mailbox(self._next_id, name, options, declared, now)
        self._next_id += 1
        self._add(mb)
        self._save(mb)
        log.info("mailbox %s created (%s)", name, "declared" if declared else "on first use")
        return mb

    def adopt(self, row: MailboxRow, now: float) -> Mailbox:
        """A mailbox as the database stores it (shared: made here or by
        another relay; its stored options win, as after a restart)."""
        old = self.by_name.get(row.name)
        if old is not None and old.id == row.id:
            return old
        mb = Mailbox(row.id, row.name, _stored_options(row), row.declared, now, disk_after=0)
        if old is not None:  # deleted elsewhere and made again: the consumers here follow the name
            self.forget(old)
            mb.consumers, mb.rr = old.consumers, old.rr
            for consumer in mb.consumers:
                consumer.mailbox = mb
            if mb.consumers:
                self.dirty.add(mb)
        self._add(mb)
        return mb

    def forget(self, mb: Mailbox) -> None:
        """Drop a mailbox another relay deleted from memory (nothing stored changes)."""
        if self.by_name.get(mb.name) is mb:
            del self.by_name[mb.name]
        if self.by_id.get(mb.id) is mb:
            del self.by_id[mb.id]
        self.dirty.discard(mb)

    def declare(self, name: str, options: dict, now: float) -> Mailbox:
        """DECLARE: create, adopt (a send made it) or check a mailbox."""
        options = dict(options)
        passive = bool(options.pop("passive", False))
        try:
            opts = MailboxOptions.from_map(options)
        except (ValueError, TypeError) as exc:
            raise Malformed(str(exc)) from None
        mb = self.by_name.get(name)
        if mb is None and self.shared is not None:  # another relay may have made it
            row = self.shared.find_mailbox(name)
            if row is not None:
                mb = self.adopt(row, now)
        if passive:
            if mb is None:
                raise MailboxNotFound(f"mailbox {name!r} does not exist")
        elif mb is None or not mb.declared:
            # (Checked as options are set: a mailbox an older release stored
            # with such options takes the same again.)
            try:
                opts.check_for(name)
            except ValueError as exc:
                raise Malformed(str(exc)) from None
            if mb is None:
                if self.storage_full:
                    raise StorageFull(f"{self.storage_full}: no new mailbox until the relay can store again")
                mb = self.create(name, opts, True, now)
            else:
                mb.options, mb.declared = opts, True
                self._save(mb)
                self.schedule_idle(mb)
        elif mb.options != opts:
            raise PreconditionFailed(
                f"mailbox {name!r} exists with options {mb.options.to_map()}, not {opts.to_map()}")
        mb.last_used = now
        return mb

    def delete(self, mb: Mailbox, why: str) -> None:
        del self.by_name[mb.name]
        del self.by_id[mb.id]
        self.dirty.discard(mb)
        self.store.delete_mailbox(mb.id)
        log.info("mailbox %s deleted with %d messages: %s", mb.name, mb.count, why)

    def _add(self, mb: Mailbox) -> None:
        self.by_name[mb.name] = mb
        self.by_id[mb.id] = mb
        self.schedule_idle(mb)

    def _save(self, mb: Mailbox) -> None:
        self.store.save_mailbox(MailboxRow(mb.id, mb.name, mb.options.to_map(), mb.declared))

    # --- idle expiry ---

    def schedule_idle(self, mb: Mailbox) -> None:
        """One live entry per mailbox: an entry due earlier stays (when it
        comes, expire_idle() looks again).  Each consumer's leaving pushed
        one, and each came back at every ttl: a mailbox polled by a
        consumer that comes and goes kept thousands, and their pass stalled
        the loop for longer every ttl."""
        if self.shared is not None:
            return  # idle mailboxes are the sweeper's, from the database (relay/fabric.py)
        deadline = mb.idle_deadline()
        if deadline is not None and (mb.idle_entry is None or deadline < mb.idle_entry):
            mb.idle_entry = deadline  # (an entry due later is left in the heap, stale)
            heapq.heappush(self._idle_heap, (deadline, mb.id, mb.name))

    def next_idle_deadline(self) -> float:
        return self._idle_heap[0][0] if self._idle_heap else float("inf")

    def expire_idle(self, now: float) -> None:
        while self._idle_heap and self._idle_heap[0][0] <= now:
            due, mailbox_id, name = heapq.heappop(self._idle_heap)
            mb = self.by_name.get(name)
            if mb is None or mb.id != mailbox_id or mb.idle_entry != due:
                continue  # (gone, or an entry superseded by one due earlier)
            mb.idle_entry = None
            deadline = mb.idle_deadline()
            if deadline is None:
                continue  # a consumer came; its leaving schedules again
            if deadline > now:
                mb.idle_entry = deadline
                heapq.heappush(self._idle_heap, (deadline, mb.id, mb.name))
            else:
                self.delete(mb, f"idle for {mb.options.ttl}s")

    # --- the ready queue ---

    def append(self, mb: Mailbox, row: StoredMessage, now: float) -> None:
        """Store `row`, a new message of `mb`, at the tail of its queue."""
        self.append_many([(mb, row)], now)

    def append_many(self, placed: list[tuple[Mailbox, StoredMessage]], now: float) -> None:
        """Store new messages, (mailbox, row) in seq order, each at the tail
        of its mailbox's queue, in one store call."""
        if self.shared is not None:
            self._append_unclaimed(placed, now)
            return
        self.store.insert(list(map(_ROW, placed)))
        for mb, run in groupby(placed, _MAILBOX):  # (a SEND's rows mostly go to one mailbox)
            self._queue_tails(mb, list(map(_ROW, run)), now)

    def append_run(self, mb: Mailbox, rows: list[StoredMessage], now: float) -> None:
        """append_many() of rows all for `mb` (not shared)."""
        self.store.insert(rows)
        self._queue_tails(mb, rows, now)

    def _queue_tails(self, mb: Mailbox, rows: list[StoredMessage], now: float) -> None:
        mb.append_tails(rows)
        mb.last_used = now
        if mb.consumers:
            self.dirty.add(mb)

    def _append_unclaimed(self, placed: list[tuple[Mailbox, StoredMessage]], now: float) -> None:
        """Shared: store new messages free for any relay to claim; they
        enter a window by a claim, after the commit's wake-up."""
        if self.keep_alive is not None:
            placed = self.keep_alive(placed, now)
        self.store.insert([row for _, row in placed])
        for mb, row in placed:
            mb.added(len(row.body))
            mb.last_used = now

    # Shared: set by relay/fabric.py; makes sure the mailboxes of new
    # messages still exist (a sweeper may have deleted an idle one).
    keep_alive = None

    def fill(self, mb: Mailbox, unacked) -> bool:
        """Load the next window of ready messages from disk; False if none.
        `unacked`: seqs out with consumers (on disk, but not ready).
        Shared: claim them, as many as the consumers here have credit for."""
        if self.shared is not None:
            return self._claim(mb, unacked)
        while mb.disk_after is not None and not mb.ready:
            self._load(mb, unacked, READY_WINDOW)
        return bool(mb.ready)

    def _load(self, mb: Mailbox, unacked, limit: int) -> None:
        """Up to `limit` of the next ready messages from disk, behind the
        window (which holds no seq above disk_after)."""
        room = max(1, READY_WINDOW_BYTES - mb.ready_window_bytes)
        rows = self.store.load_ready(mb.id, mb.disk_after, limit, room)
        if rows:
            mb.disk_after = rows[-1].seq
        if len(rows) < limit and sum(map(len, map(field_body, rows))) < room:
            mb.disk_after = None  # neither bound stopped the load: that was all
        # Rows out with a consumer are on disk but not ready (asked in C, per row).
        if unacked and any(map(unacked.__contains__, map(field_seq, rows))):
            rows = [row for row in rows if row.seq not in unacked]
        if rows:
            mb.window_extend(rows)

    def top_up(self, unacked) -> None:
        """Read ahead into windows a delivery left low (mark_if_low()),
        TOP_UP_ROWS rows in all (the rest next time)."""
        budget = TOP_UP_ROWS
        while self.low and budget > 0:
            mb = self.low.pop()
            if (mb.disk_after is None or not mb.consumers or mb.window_full()
                    or self.by_name.get(mb.name) is not mb):  # (deleted since)
                continue
            limit = min(budget, READY_WINDOW - len(mb.ready))
            self._load(mb, unacked, limit)
            budget -= limit
            self.mark_if_low(mb)  # (a row budget stopped it)

    def mark_if_low(self, mb: Mailbox) -> None:
        """Mark a window below TOP_UP_BELOW rows, with more on disk, for
        top_up().  Not shared: a claim takes no more than the consumers
        have credit for."""
        if mb.disk_after is not None and len(mb.ready) < TOP_UP_BELOW and self.shared is None:
            self.low.add(mb)

    def _claim(self, mb: Mailbox, unacked) -> bool:
        while mb.disk_after is not None and not mb.ready:
            # No more than the consumers here can take: a claimed message
            # waiting behind a full consumer is one another relay's idle
            # consumer cannot have.  (Without consumers: PEEK, PURGE, MOVE,
            # a drop-head want the head.)
            credit = sum(max(0, c.prefetch - len(c.unacked)) for c in mb.consumers) if mb.consumers else 1
            if not credit:
                return False
            limit = min(READY_WINDOW, credit)
            # disk_after: claim past it (messages freed or stored below it
            # since come with a wake-up that lowers it, or the retry)
            rows, top = self.shared.claim(mb.id, limit, mb.disk_after)
            if not top:
                # None free (fewer than asked may only mean other relays
                # took some): wait for a wake-up, or the retry.
                mb.disk_after = None
                break
            mb.disk_after = top
            for row in rows:
                if row.seq not in unacked:
                    mb.window_push(row)
        return bool(mb.ready)

    def release_window(self, mb: Mailbox) -> None:
        """Shared: no consumer here any more: give the window's claims back."""
        if mb.ready:
            self.shared.release(mb.id, [row.seq for row in mb.ready])
            mb.window_clear()
        mb.disk_after = 0  # (claim again when a consumer comes)

    def take_ready(self, mb: Mailbox, seq: int) -> StoredMessage | None:
        """Remove the ready message `seq` from the queue (memory or disk)."""
        for row in mb.ready:
            if row.seq == seq:
                mb.window_remove(row)
                self.store.delete([seq])
                return row
        if mb.disk_after is not None and seq > mb.disk_after:
            row = self.store.get(seq)
            if row is not None:
                self.store.delete([seq])
            return row
        return None

    def pop_head(self, mb: Mailbox, unacked) -> StoredMessage | None:
        """Remove and return the oldest ready message, or None.  (Shared:
        the oldest free one in the database, else the oldest this relay
        stored and has not committed yet.)"""
        if not mb.ready and not self.fill(mb, unacked):
            row = self.shared.pending_head(mb.id) if self.shared is not None else None
            if row is not None:
                self.store.delete([row.seq])
            return row
        row = mb.window_pop()
        self.store.delete([row.seq])
        return row

    def requeue(self, mb: Mailbox, entries: list) -> None:
        """Put unacked messages (state.Unacked) back at the head, oldest first."""
        self.store.set_deliveries((e.deliveries, e.seq) for e in entries)
        if len(entries) <= REQUEUE_LOAD:
            rows = self.store.get_many([e.seq for e in entries])
            counts = {e.seq: e.deliveries for e in entries}
            for row in reversed(rows):
                mb.window_push_front(row._replace(deliveries=counts[row.seq]))
        elif self.shared is not None:
            # Give them back with the window (after their counts, in the
            # same transaction) and claim again, oldest first.
            self.shared.release(mb.id, [e.seq for e in entries] + [row.seq for row in mb.ready])
            mb.window_clear()
            mb.disk_after = 0
        else:
            # Rebuild the window from disk, from the oldest of them on.
            lowest = min(e.seq for e in entries)
            for row in mb.ready:
                lowest = min(lowest, row.seq)
            if mb.disk_after is not None:
                lowest = min(lowest, mb.disk_after + 1)
            mb.window_clear()
            mb.disk_after = lowest - 1
        if mb.consumers:
            self.dirty.add(mb)
