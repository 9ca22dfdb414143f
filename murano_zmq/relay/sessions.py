"""Sessions and permissions: who is connected, and who may do what.

A session starts at HELLO and ends at BYE, silence, a new HELLO from the
same node, or a key removed from the authorized keys.  When it ends, its
consumers go (the delivery room requeues what they held).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..protocol.constants import HEARTBEAT_LIVENESS, MAX_HEARTBEAT, MIN_HEARTBEAT
from ..protocol.errors import Malformed, PermissionDenied
from ..protocol.message import is_number, shown_peer_name
from .state import Consumer, Peer

log = logging.getLogger("murano_zmq.relay")


@dataclass(frozen=True, slots=True)
class Ctx:
    """The command being handled: who sent it, as whom, and when."""

    identity: bytes
    peer: Peer | None  # None before HELLO
    user: str | None  # the authenticated identity (key name) of the connection
    key: str | None  # its CURVE public key (z85), if the relay has CURVE
    now: float


class Sessions:
    def __init__(self, drop_consumer: Callable[[Consumer, float], None]):
        self.peers: dict[bytes, Peer] = {}
        # Who may do what (security.relay.PermissionsFile, or any object with
        # allows(identity, op, mailbox) and may_any(identity, op)); None:
        # every peer may do everything (an open relay, or --allow-all).
        self.permissions = None
        self._drop_consumer = drop_consumer
        # No peer is due (silent, or owed a heartbeat) before this: tick()
        # scans the peers only then, not every turn.  A peer's deadlines only
        # move later (it speaks, the relay sends to it), so the bound stays
        # true until the scan; a new session lowers it.
        self._due = float("-inf")

    # --- permissions ---

    def allowed(self, user: str | None, op: str, mailbox: str) -> bool:
        if self.permissions is None or self.permissions.allows(user, op, mailbox):
            return True
        log.warning("denied: %s may not %s %s", user or "an unidentified peer", op, mailbox)
        return False

    def check(self, user: str | None, op: str, mailbox: str) -> None:
        if not self.allowed(user, op, mailbox):
            raise PermissionDenied(f"{user or 'this peer'} may not {op} {mailbox!r}")

    def check_owner(self, ctx: Ctx) -> None:
        """A session's commands must come from the identity that opened it."""
        if ctx.peer is not None and ctx.peer.user != ctx.user:
            raise PermissionDenied("this session belongs to another identity")

    # --- the session's life ---

    def hello(self, ctx: Ctx, name: str, instance: bytes, heartbeat: float) -> Peer:
        if ctx.peer is not None:
            self.drop(ctx.peer, "HELLO again", ctx.now)
        for other in list(self.peers.values()):
            # Only the same identity may take over a session (a hostile peer
            # that learnt an instance id must not kick its owner off).
            if other.instance == instance and other.user == ctx.user:
                self.drop(other, "reconnected as a new session", ctx.now)
        if not is_number(heartbeat):
            raise Malformed("heartbeat must be a finite number of seconds")
        heartbeat = min(max(float(heartbeat), MIN_HEARTBEAT), MAX_HEARTBEAT)
        peer = Peer(ctx.identity, shown_peer_name(name), instance, heartbeat, ctx.now, ctx.now, key=ctx.key,
                    user=ctx.user)
        self.peers[ctx.identity] = peer
        self._due = min(self._due, _deadline(peer))
        log.info("node %s connected", peer.name)
        return peer

    def drop(self, peer: Peer, why: str, now: float) -> None:
        for consumer in list(peer.consumers.values()):
            self._drop_consumer(consumer, now)
        self.peers.pop(peer.identity, None)
        log.info("node %s gone: %s", peer.name, why)

    def drop_unwanted(self, keep: Callable[[str | None], bool], why: str, now: float) -> list[bytes]:
        """Drop every session whose identity `keep` rejects; their ids."""
        dropped = []
        for peer in list(self.peers.values()):
            if not keep(peer.user):
                self.drop(peer, f"{peer.user}: {why}", now)
                dropped.append(peer.identity)
        return dropped

    # --- time ---

    def tick(self, now: float) -> list[bytes]:
        """Drop silent peers; return those owed a heartbeat (which the relay
        sends this turn)."""
        if now < self._due:
            return []
        owed = []
        due = float("inf")
        for peer in list(self.peers.values()):
            if now - peer.last_heard > peer.heartbeat * HEARTBEAT_LIVENESS:
                self.drop(peer, f"silent for {now - peer.last_heard:.1f}s", now)
                continue
            if now - peer.last_sent >= peer.heartbeat:
                owed.append(peer.identity)
                due = min(due, now + peer.heartbeat, peer.last_heard + peer.heartbeat * HEARTBEAT_LIVENESS)
            else:
                due = min(due, _deadline(peer))
        self._due = due
        return owed

    def next_deadline(self) -> float:
        return self._due


def _deadline(peer: Peer) -> float:
    """When `peer` is next owed a heartbeat or declared silent, if nothing happens."""
    return min(peer.last_sent + peer.heartbeat, peer.last_heard + peer.heartbeat * HEARTBEAT_LIVENESS)
