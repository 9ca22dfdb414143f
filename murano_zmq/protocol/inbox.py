"""Direct delivery, the receiving end, with no I/O: DirectInbox, every peer
session on a consuming node's ROUTER (protocol/direct.py has the sending
end and the dialog both share).

A peer CONFIRMs a SEND only when application code has acked every message
in it.  A record this node cannot take (no consumer of its mailbox, over the
size limit) comes back in CONFIRM as 404, and the sender gives it to the
relay.  With CURVE, a command from a key no longer authorized gets ERROR
403, and a record the key may not `send` to its mailbox comes back as 403.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .constants import (
    DEFAULT_WINDOW,
    DIRECT_WINDOW_BYTES,
    HEARTBEAT_LIVENESS,
    MAX_HEARTBEAT,
    MIN_HEARTBEAT,
)
from .errors import MailboxNotFound, Malformed, NotReady, PermissionDenied, RemoteProtocolError
from .frames import Cmd, decode, encode
from .message import Message, is_number, parse_send_record, shown_peer_name


def _send_size(records: list) -> int:
    """Body and header bytes of a SEND's records, as a sender counts them
    (message.records_size), of those well formed enough to have them."""
    return sum([len(r[3]) + len(r[2]) for r in records
                if type(r) is list and len(r) == 7 and type(r[2]) is bytes and type(r[3]) is bytes])


@dataclass(eq=False, slots=True)
class _Session:
    identity: bytes
    name: str
    heartbeat: float
    last_heard: float
    last_sent: float
    # req -> [records left unsettled, refused entries, bytes of those records]
    pending: dict[int, list] = field(default_factory=dict)
    held: int = 0  # records of `pending` left unsettled
    held_bytes: int = 0  # their bytes (each SEND's, until it is confirmed)
    # CONFIRMs the ROUTER could not pass on (the peer's connection was
    # down): sent again when the peer is heard from next
    unsent: list = field(default_factory=list)


@dataclass(slots=True)
class DirectOrigin:
    """Where a directly delivered message came from (to confirm it)."""

    session: _Session
    req: int


class DirectInbox:
    """The receiving end: every peer session on this node's ROUTER.

    `consumers` maps a mailbox to this node's consumer id for it; the node's
    DedupWindow is shared with the relay path, so a message that comes both
    ways reaches application code once.
    """

    def __init__(self, node_name: str, max_message_size: int, dedup):
        self.node_name = node_name
        self.max_message_size = max_message_size
        self.dedup = dedup
        # Who may send to which mailbox (anything with allows(identity, op,
        # mailbox), e.g. the relay's permissions file); None: any peer that
        # got through the handshake may send to every mailbox consumed here.
        self.permissions = None
        self.refused = 0  # records refused with 403 so far
        self._sessions: dict[bytes, _Session] = {}
        # (mailbox, id) -> direct copies (session, req) waiting for the copy
        # the application holds to be settled
        self._waiting: dict[tuple, list] = {}
        self._outbox: list[tuple[bytes, list[bytes]]] = []

    def drain(self) -> list[tuple[bytes, list[bytes]]]:
        out, self._outbox = self._outbox, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._outbox)

    def receive(self, identity: bytes, frames: list[bytes], now: float,
                consumers: dict[str, int], user: str | None = None) -> list:
        """Delivered events for one command from a peer; bad input gets ERROR.
        `user`: the sending key's name (CURVE), checked against `permissions`."""
        from .client import Delivered  # the same event the relay path produces

        try:
            command = decode(frames)
        except RemoteProtocolError as exc:
            self._outbox.append((identity, encode(Cmd.ERROR, None, exc.code, str(exc))))
            return []
        session = self._sessions.get(identity)
        if command.cmd == Cmd.HELLO:
            name, _instance, heartbeat = command.fields
            if not is_number(heartbeat):
                self._error(identity, Malformed("heartbeat must be a finite number"))
                return []
            heartbeat = min(max(float(heartbeat), MIN_HEARTBEAT), MAX_HEARTBEAT)
            self._sessions[identity] = _Session(identity, shown_peer_name(name), heartbeat, now, now)
            self._put(identity, Cmd.WELCOME, self.node_name, heartbeat, self.max_message_size)
            return []
        if session is None:
            self._outbox.append((identity, encode(Cmd.ERROR, None, NotReady.code, "say HELLO first")))
            return []
        session.last_heard = now
        if session.unsent:  # its connection is back: what it missed first
            self._outbox.extend((identity, frames) for frames in session.unsent)
            session.unsent.clear()
        if command.cmd == Cmd.HEARTBEAT:
            return []
        if command.cmd == Cmd.BYE:
            del self._sessions[identity]
            return []
        if command.cmd != Cmd.SEND:
            self._error(identity, Malformed(f"a direct link carries no {command.cmd.name}"))
            return []
        req, records = command.fields
        if req in session.pending:
            return []  # sent again by a sender that missed nothing: its CONFIRM comes when settled
        nbytes = _send_size(records)  # (kept until the SEND is confirmed, as its sender keeps it)
        if self._past_window(session, len(records), nbytes):
            return []
        by_consumer: dict[int, list[Message]] = {}
        refused: list[list] = []
        unsettled = 0
        for i, record in enumerate(records):
            try:
                msg = parse_send_record(record)
            except RemoteProtocolError as exc:
                refused.append([i, exc.code, str(exc)])
                continue
            if self.permissions is not None and not self.permissions.allows(user, "send", msg.mailbox):
                self.refused += 1
                refused.append([i, PermissionDenied.code,
                                f"{user or 'this peer'} may not send to {msg.mailbox!r} (direct)"])
                continue
            consumer = consumers.get(msg.mailbox)
            size = msg.size
            if consumer is None or size > self.max_message_size:
                refused.append([i, MailboxNotFound.code, f"no consumer of {msg.mailbox} here"])
                continue
            m = Message(msg.msg_id, msg.mailbox, msg.header_map or {}, msg.body, msg.created,
                        None if msg.ttl is None else now + msg.ttl, 1)
            m.origin = DirectOrigin(session, req)
            seen = self.dedup.offer((m.mailbox, m.id), consumer)
            if seen == "fresh":
                by_consumer.setdefault(consumer, []).append(m)
                unsettled += 1
            elif seen == "in-app":
                # Another copy is with the application: confirm this one only
                # when that one is settled (if it came direct, its sender may
                # be gone, and this copy is the only one left).
                self._waiting.setdefault((m.mailbox, m.id), []).append((session, req))
                unsettled += 1
            # (seen and settled: nothing to wait for)
        if unsettled:
            session.pending[req] = [unsettled, refused, nbytes]
            session.held += unsettled
            session.held_bytes += nbytes
        else:
            self._put(identity, Cmd.CONFIRM, req, refused)
        return [Delivered(c, ms) for c, ms in by_consumer.items()]

    def refuse(self, identity: bytes, why: str) -> None:
        """A command from a connection that may no longer talk to this node
        (its key left the authorized keys): ERROR 403, and its session ends
        (the sender gives what is unconfirmed to the relay)."""
        self._sessions.pop(identity, None)
        self._error(identity, PermissionDenied(why))

    def settle(self, message: Message, how: str, requeue: bool) -> list:
        """The application settled a direct message.  Returns messages to hand
        to the application again (a nack with requeue)."""
        origin: DirectOrigin = message.origin
        key = (message.mailbox, message.id)
        if how == "nack" and requeue:
            again = Message(message.id, message.mailbox, message.headers, message.packed_body,
                            message.created_at, message.expires_at, message.delivery_count + 1)
            again.origin = origin
            return [again]
        # Acked, or rejected: a direct reject is dropped, and a relay copy
        # that comes later is rejected there (dead-lettered, if its mailbox says so).
        self.dedup.settle(key, True, how != "ack")
        self._count_down(origin.session, origin.req)
        self.settled_elsewhere(key)
        return []

    def settled_elsewhere(self, key: tuple) -> None:
        """The application settled the copy of `key` it had (from either
        path): direct copies that waited for it are done too."""
        for session, req in self._waiting.pop(key, ()):
            self._count_down(session, req)

    def settled_elsewhere_many(self, keys: list[tuple]) -> None:
        """settled_elsewhere() of each key (a run of acks)."""
        waiting = self._waiting
        if waiting:  # (else no direct copy waits for any of them)
            for key in keys:
                for session, req in waiting.pop(key, ()):
                    self._count_down(session, req)

    def _count_down(self, session: _Session, req: int) -> None:
        entry = session.pending.get(req)
        if entry is None:
            return
        entry[0] -= 1
        session.held -= 1
        if entry[0] == 0:
            del session.pending[req]
            session.held_bytes -= entry[2]
            if self._sessions.get(session.identity) is session:
                self._put(session.identity, Cmd.CONFIRM, req, entry[1])

    def send_failed(self, identity: bytes, frames: list[bytes]) -> None:
        """The driver could not pass `frames` to the peer (no connection
        under its routing id now, e.g. while its DEALER reconnects).  A
        CONFIRM is kept and sent again when the peer is heard from: lost,
        it would make the sender time out and give acked messages to the
        relay, and so maybe to a second consumer."""
        session = self._sessions.get(identity)
        if session is not None and decode(frames).cmd == Cmd.CONFIRM:
            session.unsent.append(frames)

    def next_deadline(self) -> float:
        if not self._sessions:
            return float("inf")
        return min(min(s.last_sent + s.heartbeat, s.last_heard + s.heartbeat * HEARTBEAT_LIVENESS)
                   for s in self._sessions.values())

    def tick(self, now: float) -> None:
        for identity, s in list(self._sessions.items()):
            if now - s.last_heard > s.heartbeat * HEARTBEAT_LIVENESS:
                del self._sessions[identity]  # its sender gives what is unacked to the relay
            elif now - s.last_sent >= s.heartbeat:
                self._put(identity, Cmd.HEARTBEAT)

    def close(self) -> None:
        """Say BYE to every sender: they give what is unconfirmed to the relay."""
        for identity in self._sessions:
            self._put(identity, Cmd.BYE, "node closing")
        self._sessions.clear()

    def sent(self, identity: bytes, now: float) -> None:
        session = self._sessions.get(identity)
        if session is not None:
            session.last_sent = now

    def _put(self, identity: bytes, cmd: Cmd, *fields: Any) -> None:
        self._outbox.append((identity, encode(cmd, *fields)))

    def _past_window(self, session: _Session, count: int, nbytes: int) -> bool:
        """Would a SEND of `count` records and `nbytes` put more out from
        `session` than an honest sender's window lets it (DEFAULT_WINDOW
        records, DIRECT_WINDOW_BYTES and one record more)?  Then the session
        ends with ERROR, and the sender gives what is unconfirmed to the relay."""
        if (session.held + count <= DEFAULT_WINDOW
                and session.held_bytes + nbytes <= DIRECT_WINDOW_BYTES + self.max_message_size):
            return False
        del self._sessions[session.identity]
        self._error(session.identity, Malformed(
            f"more unconfirmed than a sender's window ({DEFAULT_WINDOW} messages, {DIRECT_WINDOW_BYTES} bytes "
            "and one message): the session ends"))
        return True

    def _error(self, identity: bytes, exc) -> None:
        self._outbox.append((identity, encode(Cmd.ERROR, None, exc.code, exc.text)))
