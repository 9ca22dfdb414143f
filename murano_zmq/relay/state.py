"""The relay's in-memory state: peers, consumers, mailboxes.

A mailbox keeps its counters and a bounded window of its ready messages in
memory; the rest of its queue stays in the store (`disk_after` marks where
the on-disk part starts).  Unacked messages stay in memory until settled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..protocol.options import MailboxOptions
from ..store.base import StoredMessage

# Ready messages per mailbox kept in memory; more wait on disk.
READY_WINDOW = 1000


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


@dataclass(eq=False, slots=True)
class Consumer:
    peer: Peer
    cid: int  # chosen by the node, unique per peer
    mailbox: "Mailbox"
    prefetch: int
    endpoint: str | None = None  # where the node takes direct deliveries
    unacked: dict[int, StoredMessage] = field(default_factory=dict)

    @property
    def credit(self) -> int:
        return self.prefetch - len(self.unacked)


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
    disk_after: int | None = None  # ready messages with seq > this are only on disk
    consumers: list[Consumer] = field(default_factory=list)
    rr: int = 0  # round-robin position among consumers

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
