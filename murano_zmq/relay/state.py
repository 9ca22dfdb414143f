"""The relay's in-memory state: peers, consumers, mailboxes.

A mailbox keeps its counters and a bounded window of its ready messages in
memory; the rest of its queue stays in the store (`disk_after` marks where
the on-disk part starts).  A message out with a consumer is remembered by
its seq, size and delivery count only: its body stays on disk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..protocol.constants import READY_WINDOW, READY_WINDOW_BYTES
from ..protocol.options import MailboxOptions
from ..store.base import field_body, field_headers


class Unacked(NamedTuple):
    seq: int
    size: int  # body bytes (what mailbox limits and byte credit count)
    deliveries: int  # times handed out, this one included
    expires: float | None


@dataclass(eq=False, slots=True)
class Peer:
    identity: bytes  # ROUTER routing id
    name: str
    instance: bytes
    heartbeat: float
    last_heard: float
    last_sent: float
    consumers: dict[int, "Consumer"] = field(default_factory=dict)
    key: str | None = None  # the CURVE public key (z85) the session authenticated with
    user: str | None = None  # the identity (key name) that said HELLO


@dataclass(eq=False, slots=True)
class Consumer:
    peer: Peer
    cid: int  # chosen by the node, unique per peer
    mailbox: "Mailbox"
    prefetch: int
    endpoint: str | None = None  # where the node takes direct deliveries
    prefetch_bytes: int | None = None  # byte credit (None: count credit only)
    unacked: dict[int, Unacked] = field(default_factory=dict)
    unacked_bytes: int = 0

    def can_take(self, size: int) -> bool:
        """May a message of `size` bytes go out now?  Within `prefetch`
        messages and, with byte credit, below `prefetch_bytes` and within it
        with this one; with nothing out, any message may (else one larger
        than the byte credit would never go)."""
        n = len(self.unacked)
        if n >= self.prefetch:
            return False
        limit = self.prefetch_bytes
        return limit is None or (self.unacked_bytes < limit and (not n or self.unacked_bytes + size <= limit))

    def hand_out(self, entry: Unacked) -> None:
        """(Delivery._deliver does this inline.)"""
        self.unacked[entry.seq] = entry
        self.unacked_bytes += entry.size

    def take_back(self, seq: int) -> Unacked:
        entry = self.unacked.pop(seq)
        self.unacked_bytes -= entry.size
        return entry


@dataclass(eq=False, slots=True)
class Mailbox:
    id: int
    name: str
    options: MailboxOptions
    declared: bool
    last_used: float
    count: int = 0  # stored messages, ready and unacked
    nbytes: int = 0
    unacked_count: int = 0
    unacked_bytes: int = 0
    ready: deque = field(default_factory=deque)  # head of the ready queue
    ready_window_bytes: int = 0  # bytes of the rows in `ready`
    disk_after: int | None = None  # ready messages with seq > this are only on disk
    consumers: list[Consumer] = field(default_factory=list)
    rr: int = 0  # round-robin position among consumers
    idle_entry: float | None = None  # the deadline of its entry in Mailboxes' idle heap, if any

    # --- the counts: every change goes through these, but for the
    # per-message paths of Delivery._deliver and Delivery.ack, which count
    # a delivery and an ack inline ---

    def added(self, size: int) -> None:
        """A message was stored here (ready)."""
        self.count += 1
        self.nbytes += size

    def removed(self, size: int) -> None:
        """A ready message left (expired, dropped, dead-lettered)."""
        self.count -= 1
        self.nbytes -= size

    def returned(self, size: int) -> None:
        """An unacked message is ready again."""
        self.unacked_count -= 1
        self.unacked_bytes -= size

    def settled(self, size: int) -> None:
        """An unacked message left (acked, or rejected)."""
        self.returned(size)
        self.removed(size)

    def append_tail(self, row) -> None:
        """A new message was stored at the tail of the queue: count it, and
        keep it in the window while the window reaches the tail."""
        size = len(row.body)
        self.count += 1
        self.nbytes += size
        if self.disk_after is None:
            if self.window_full():
                self.disk_after = row.seq - 1
            else:
                self.ready.append(row)
                self.ready_window_bytes += size + len(row.headers)

    def append_tails(self, rows: list) -> None:
        """append_tail() of each of `rows`, in seq order (a SEND's run of
        rows to this mailbox): the sums and the extend in C when the window
        takes them all."""
        size = sum(map(len, map(field_body, rows)))
        if self.disk_after is None:
            window_bytes = self.ready_window_bytes + size + sum(map(len, map(field_headers, rows)))
            if len(self.ready) + len(rows) > READY_WINDOW or window_bytes >= READY_WINDOW_BYTES:
                for row in rows:  # the window fills up on the way
                    self.append_tail(row)
                return
            self.ready.extend(rows)  # (not full before any of them: append_tail would keep each)
            self.ready_window_bytes = window_bytes
        self.count += len(rows)
        self.nbytes += size

    # --- the in-memory window ---

    def window_push(self, row) -> None:
        self.ready.append(row)
        self.ready_window_bytes += len(row.body) + len(row.headers)

    def window_extend(self, rows: list) -> None:
        """window_push() of each of `rows`, the sums and the extend in C."""
        self.ready.extend(rows)
        self.ready_window_bytes += sum(map(len, map(field_body, rows))) + sum(map(len, map(field_headers, rows)))

    def window_push_front(self, row) -> None:
        self.ready.appendleft(row)
        self.ready_window_bytes += len(row.body) + len(row.headers)

    def window_pop(self):
        row = self.ready.popleft()
        self.ready_window_bytes -= len(row.body) + len(row.headers)
        return row

    def window_remove(self, row) -> None:
        self.ready.remove(row)
        self.ready_window_bytes -= len(row.body) + len(row.headers)

    def window_clear(self) -> None:
        self.ready.clear()
        self.ready_window_bytes = 0

    def window_full(self) -> bool:
        return len(self.ready) >= READY_WINDOW or self.ready_window_bytes >= READY_WINDOW_BYTES

    @property
    def ready_count(self) -> int:
        return self.count - self.unacked_count

    @property
    def ready_bytes(self) -> int:
        return self.nbytes - self.unacked_bytes

    def idle_deadline(self) -> float | None:
        """When the mailbox expires if nothing happens, or None."""
        if self.options.ttl is None or self.consumers:
            return None
        return self.last_used + self.options.ttl

    def status(self, now: float) -> dict:
        deadline = self.idle_deadline()
        return {
            "name": self.name,
            "depth": self.count,
            "ready": self.ready_count,
            "unacked": self.unacked_count,
            "bytes": self.nbytes,
            "consumers": len(self.consumers),
            "idle": round(now - self.last_used, 3),
            "ttl": self.options.ttl,
            "expires_in": None if deadline is None else round(max(0.0, deadline - now), 3),
            "declared": self.declared,
            "options": self.options.to_map(),
        }


def row_size(row) -> int:
    """What a stored message counts against mailbox limits: its body."""
    return len(row.body)
