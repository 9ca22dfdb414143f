"""The relay engine: the dispatcher over the relay's rooms.

No sockets here.  The relay process hands the engine (identity, frames)
pairs and the time; the engine reads and writes the store and queues
(identity, frames) replies.  One loop turn is:

    receive()...  tick()  pump()  take_output()  commit()  take_output()

The rooms, each its own module:
  sessions.py     sessions and permissions
  mailboxes.py    mailboxes and their ready queues (counts: state.Mailbox)
  delivery.py     consumers, credit, DELIVER, ACK and NACK
  deadletters.py  expiry, drop-head, rejects and dead-letter mailboxes
  intake.py       SEND records: checks, ids already stored, storing
  turn.py         replies now and after the commit
  recovery.py     the start: message numbering, mailboxes loaded back
  fabric.py       with several relays on one database (store.shared):
                  claims, leases, wake-ups, the sweeper
This module decodes a command, checks who sent it, and calls the rooms;
each handler gets the command's context (Ctx) as an argument.
"""

from __future__ import annotations

import logging
from typing import Callable

import msgpack

from ..protocol.constants import (
    DEFAULT_MAX_MESSAGE_SIZE,
    SIGNATURE,
    MAX_ENDPOINT,
    MAX_PREFETCH,
    MAX_PREFETCH_BYTES,
)
from ..protocol.errors import (
    LocalProtocolError,
    MailboxNotFound,
    Malformed,
    NotReady,
    PermissionDenied,
    PreconditionFailed,
    RelayError,
    RemoteProtocolError,
    error_from_code,
)
from ..protocol.direct import endpoint_problem
from ..protocol.frames import Cmd, decode
from ..protocol.message import check_name
from ..store.base import Store
from .admin import HANDLERS as ADMIN_HANDLERS
from .deadletters import DeadLetters
from .delivery import Delivery
from .fabric import Fabric
from .faults import DISK_FULL
from .intake import Intake
from .recovery import recover
from .mailboxes import Mailboxes
from .sessions import Ctx, Sessions
from .state import Mailbox
from .turn import DELETES_HELD_SECONDS, Output, Turn

log = logging.getLogger("murano_zmq.relay")

__all__ = ["RelayEngine", "Output"]


class RelayEngine:
    def __init__(self, store: Store, now: float, name: str = "relay",
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.store = store
        self.name = name
        self.max_message_size = max_message_size
        self.counters = {"received": 0, "delivered": 0, "acked": 0, "expired": 0,
                         "dead_lettered": 0, "rejected": 0,
                         # for relay/metrics.py (RabbitMQ's names)
                         "confirmed": 0, "refused": 0, "redelivered": 0, "dead_lettered_expired": 0,
                         "dead_lettered_rejected": 0, "dead_lettered_maxlen": 0,
                         "dead_lettered_delivery_limit": 0,
                         # left with no dead-letter mailbox to go to (none set, or it was full)
                         "dropped_expired": 0, "dropped_rejected": 0, "dropped_maxlen": 0,
                         "dropped_delivery_limit": 0}
        self.turn = Turn(store)
        self.boxes = Mailboxes(store)
        # Windows a delivery left low, to read ahead (top_up()): true while
        # any waits.  (The set itself: the loop asks after every turn.)
        self.windows_low = self.boxes.low
        self.dead = DeadLetters(store, self.boxes, self.counters)
        self.delivery = Delivery(store, self.boxes, self.dead, self.turn, self.counters)
        self.sessions = Sessions(self.delivery.drop_consumer)
        self.intake = Intake(store, self.boxes, self.dead, self.delivery, self.sessions, self.counters,
                             max_message_size)
        # Several relays share the store (`relay --shared`): its capability
        # (store/shared.py); None on a store this relay owns.
        shared = getattr(store, "shared", None)
        self.fabric = None if shared is None else Fabric(shared, self.boxes, self.delivery, self.dead)
        recover(self, now)

    # --- views kept for callers (relay/server.py, security, tests) ---

    @property
    def peers(self):
        return self.sessions.peers

    @property
    def mailboxes(self) -> dict[str, Mailbox]:
        return self.boxes.by_name

    @property
    def storage_full(self) -> bool:
        """Set by the relay process while the disk is full, or while its
        writes keep failing: nothing new is stored (sends and new mailboxes
        get StorageFull); delivery and acks go on."""
        return bool(self.intake.storage_full)

    @storage_full.setter
    def storage_full(self, value: bool | str) -> None:
        """True (the disk is full), a str (what else keeps the relay from
        storing: what refused senders are told), or False."""
        why = DISK_FULL if value is True else value or False
        self.intake.storage_full = self.boxes.storage_full = why

    @property
    def refusal(self) -> str | bool:
        """Why nothing new is stored (what refused senders are told), or False."""
        return self.intake.storage_full

    @property
    def permissions(self):
        return self.sessions.permissions

    @permissions.setter
    def permissions(self, value) -> None:
        self.sessions.permissions = value

    # --- input -------------------------------------------------------------------

    def receive(self, identity: bytes, frames: list[bytes], now: float, user: str | None = None,
                key: str | None = None) -> None:
        """Handle one command from the peer `identity`.  Bad input gets an
        ERROR reply and a log line; it never raises.

        `user` is the authenticated identity (a key name) of the connection
        the command came on, checked against `permissions`; `key` its CURVE
        public key (z85), kept with a session at HELLO for LOOKUP."""
        try:
            command = decode(frames)
        except RemoteProtocolError as exc:
            log.warning("malformed command from %s: %s", identity.hex(), exc)
            self.turn.error(identity, None, error_from_code(exc.code, str(exc)))
            return
        peer = self.sessions.peers.get(identity)
        req = _req_of(command.cmd, command.fields)
        if peer is None and command.cmd != Cmd.HELLO:
            self.turn.error(identity, req, NotReady("say HELLO first"))
            return
        if peer is not None:
            peer.last_heard = now
        handler = self._HANDLERS.get(command.cmd)
        if handler is None:
            self.turn.error(identity, None, Malformed(f"a node does not send {command.cmd.name}"))
            return
        ctx = Ctx(identity, peer, user, key, now)
        try:
            self.sessions.check_owner(ctx)
            handler(self, ctx, *command.fields)
        except RelayError as exc:
            self.turn.error(identity, req, exc)

    def send_alone(self, identity: bytes, frames: list[bytes], now: float,
                   user: str | None = None) -> list[Output] | None:
        """A turn's only command, when nothing else is due, written or held:
        if it is a SEND of one record in the usual shape to a known mailbox
        with no limits and no consumer, from a session of this connection,
        with an id the store surely does not hold, it is stored and
        committed here in one store call, without the general path's
        objects (Ctx, batches, the turn's housekeeping).  Returns its
        CONFIRM, to go out now (the commit has returned); None: not that
        case, nothing changed, hand the frames to receive().  A failed
        commit raises StoreError, as commit() does."""
        if (len(frames) != 3 or frames[1] != _SEND_BYTE or frames[0] != SIGNATURE or not self.turn.idle
                or self.fabric is not None or self.intake.storage_full):
            return None
        peer = self.sessions.peers.get(identity)
        if peer is None or peer.user != user:
            return None
        try:
            fields = _unpack(frames[2], raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several unrelated types; receive() says what
            return None
        if type(fields) is not list or len(fields) != 2:
            return None
        req, records = fields
        if type(req) is not int or type(records) is not list or len(records) != 1:
            return None
        if not self.intake.store_alone(records[0], user, now):
            return None
        self.turn.deletes_since = None  # (its commit took any deletes held: store/sqlite.py)
        peer.last_heard = peer.last_sent = now
        return [(identity, self.turn.encode(Cmd.CONFIRM, req, []))]

    def refuse(self, identity: bytes, frames: list[bytes], why: str, now: float) -> None:
        """Answer a command whose connection may no longer talk to the relay
        (its key left the authorized keys): ERROR 403 to the request, and the
        peer's session is dropped (its unacked messages go back to their
        mailboxes).  Nothing stored changes."""
        req = None
        try:
            command = decode(frames)
            req = _req_of(command.cmd, command.fields)
        except RemoteProtocolError:
            pass
        self.drop_session(identity, why, now)
        log.warning("refused a command from %s: %s", identity.hex(), why)
        self.turn.error(identity, req, PermissionDenied(why))

    def drop_sessions(self, keep: Callable[[str | None], bool], why: str, now: float) -> int:
        """Drop every session whose identity `keep` rejects (its key was
        removed): it gets ERROR 403, its unacked messages go back to their
        mailboxes, and nothing more is delivered to it.  Returns how many."""
        dropped = self.sessions.drop_unwanted(keep, why, now)
        for identity in dropped:
            self.turn.error(identity, None, PermissionDenied(why))
        return len(dropped)

    def drop_session(self, identity: bytes, why: str, now: float) -> None:
        """Forget the session of `identity` (if any): its consumers go, their
        unacked messages are requeued; its next command gets NOT_READY."""
        peer = self.sessions.peers.get(identity)
        if peer is not None:
            self.sessions.drop(peer, why, now)

    # --- handlers: sessions ---

    def _on_hello(self, ctx: Ctx, name: str, instance: bytes, heartbeat: float) -> None:
        peer = self.sessions.hello(ctx, name, instance, heartbeat)
        self.turn.reply_now(ctx.identity, Cmd.WELCOME, self.name, peer.heartbeat, self.max_message_size)

    def _on_heartbeat(self, ctx: Ctx) -> None:
        pass

    def _on_bye(self, ctx: Ctx, reason: str) -> None:
        self.sessions.drop(ctx.peer, f"said bye: {reason}"[:200], ctx.now)

    # --- handlers: mailboxes ---

    def _on_declare(self, ctx: Ctx, req: int, name: str, options: dict) -> None:
        name = _valid_name(name)
        self.sessions.check(ctx.user, "declare", name)
        dead_letter = options.get("dead_letter")
        if isinstance(dead_letter, str):
            self.sessions.check(ctx.user, "send", dead_letter)  # dead letters are sends to it
        mb = self.boxes.declare(name, options, ctx.now)
        self.turn.reply_after_commit(ctx.identity, Cmd.REPLY, req, mb.status(ctx.now))

    def _on_delete(self, ctx: Ctx, req: int, name: str) -> None:
        self.sessions.check(ctx.user, "admin", _valid_name(name))
        mb = self.boxes.get(name)
        if mb is None:
            raise MailboxNotFound(f"mailbox {name!r} does not exist")
        if mb.consumers:
            raise PreconditionFailed(f"mailbox {name!r} has {len(mb.consumers)} consumer(s)")
        self.boxes.delete(mb, "deleted by " + ctx.peer.name)
        self.turn.reply_after_commit(ctx.identity, Cmd.REPLY, req, None)

    def _on_status(self, ctx: Ctx, req: int) -> None:
        mailboxes = self.boxes.by_name.values()
        permissions = self.sessions.permissions
        if permissions is not None:  # only what this identity may administer
            if not permissions.may_any(ctx.user, "admin"):
                raise PermissionDenied(f"{ctx.user or 'this peer'} may not see the relay's status")
            mailboxes = [mb for mb in mailboxes if permissions.allows(ctx.user, "admin", mb.name)]
        result = {
            "relay": self.name,
            "peers": len(self.sessions.peers),
            "counters": dict(self.counters),
            "storage_full": self.storage_full,
            "mailboxes": [mb.status(ctx.now) for mb in sorted(mailboxes, key=lambda m: m.name)],
        }
        self.turn.reply_now(ctx.identity, Cmd.REPLY, req, result)

    def _on_lookup(self, ctx: Ctx, req: int, name: str) -> None:
        """Where a mailbox's consumers take direct deliveries (with the CURVE
        key each consumer's session authenticated with, for the sender to
        pin), and its depth: a sender goes direct only once the relay holds
        nothing for it."""
        self.sessions.check(ctx.user, "send", _valid_name(name))
        mb = self.boxes.get(name)
        result = {"mailbox": name, "exists": mb is not None, "depth": mb.count if mb else 0,
                  "direct": [[c.peer.name, c.endpoint, c.peer.key] for c in (mb.consumers if mb else ())
                             if c.endpoint]}
        self.turn.reply_now(ctx.identity, Cmd.REPLY, req, result)

    # --- handlers: messages ---

    def _on_send(self, ctx: Ctx, req: int, records: list) -> None:
        errors = self.intake.store_records(ctx, records)
        self.counters["refused"] += len(errors)  # (metrics) the others are confirmed with the commit
        self.counters["confirmed"] += len(records) - len(errors)
        self.turn.reply_after_commit(ctx.identity, Cmd.CONFIRM, req, errors)

    def _on_consume(self, ctx: Ctx, req: int, cid: int, name: str, prefetch: int,
                    endpoint: str | None, prefetch_bytes: int | None = None) -> None:
        name = _valid_name(name)
        self.sessions.check(ctx.user, "consume", name)
        if not 1 <= prefetch <= MAX_PREFETCH:
            raise Malformed(f"prefetch must be 1..{MAX_PREFETCH}, got {prefetch}")
        if prefetch_bytes is not None and not 1 <= prefetch_bytes <= MAX_PREFETCH_BYTES:
            raise Malformed(f"prefetch_bytes must be 1..{MAX_PREFETCH_BYTES} or nil, got {prefetch_bytes}")
        if endpoint is not None and len(endpoint) > MAX_ENDPOINT:
            raise Malformed(f"endpoint longer than {MAX_ENDPOINT} characters")
        if endpoint is not None and (problem := endpoint_problem(endpoint)) is not None:
            raise Malformed(problem)  # (else every sender LOOKUP gives it to would try it)
        mb = self.boxes.get_or_create(name, ctx.now)
        self.delivery.consume(ctx.peer, cid, mb, prefetch, endpoint, prefetch_bytes, ctx.now)
        self.turn.reply_now(ctx.identity, Cmd.REPLY, req, mb.status(ctx.now))

    def _on_cancel(self, ctx: Ctx, req: int, cid: int) -> None:
        consumer = ctx.peer.consumers.get(cid)
        if consumer is not None:
            self.delivery.drop_consumer(consumer, ctx.now)

    def _on_ack(self, ctx: Ctx, tags: list) -> None:
        self.delivery.ack(ctx.peer, tags, ctx.now)

    def _on_nack(self, ctx: Ctx, tags: list, requeue: bool) -> None:
        self.delivery.nack(ctx.peer, tags, requeue, ctx.now)

    _HANDLERS: dict[Cmd, Callable[..., None]] = {
        Cmd.HELLO: _on_hello,
        Cmd.HEARTBEAT: _on_heartbeat,
        Cmd.BYE: _on_bye,
        Cmd.DECLARE: _on_declare,
        Cmd.DELETE: _on_delete,
        Cmd.STATUS: _on_status,
        Cmd.SEND: _on_send,
        Cmd.CONSUME: _on_consume,
        Cmd.CANCEL: _on_cancel,
        Cmd.LOOKUP: _on_lookup,
        Cmd.ACK: _on_ack,
        Cmd.NACK: _on_nack,
        **ADMIN_HANDLERS,  # PURGE, MOVE, PEEK: relay/admin.py
    }

    # --- time ----------------------------------------------------------------------

    def next_deadline(self) -> float:
        if self.delivery.busy:
            return float("-inf")  # deliveries wait for the next turn
        deadline = min(self.sessions.next_deadline(), self.boxes.next_idle_deadline())
        if self.fabric is not None:
            deadline = min(deadline, self.fabric.next_deadline())
        if self.dead.next_expiry is not None:
            deadline = min(deadline, self.dead.next_expiry)
        if self.turn.deletes_since is not None:
            deadline = min(deadline, self.turn.deletes_since + DELETES_HELD_SECONDS)
        return deadline

    def tick(self, now: float) -> None:
        """Heartbeats, dead peers, expired messages and idle mailboxes."""
        for identity in self.sessions.tick(now):
            self.turn.reply_now(identity, Cmd.HEARTBEAT)
        if self.fabric is not None:
            self.fabric.tick(now)
        if self.dead.next_expiry is not None and self.dead.next_expiry <= now:
            if self.fabric is None:
                self.dead.expire_due(now, self.delivery.unacked)
            else:
                self.fabric.expire_due(now)
        self.boxes.expire_idle(now)

    @property
    def wakeup_fd(self) -> int | None:
        """Shared: a socket the relay loop polls; readable, it calls wake()."""
        return None if self.fabric is None else self.fabric.shared.fileno()

    def wake(self) -> None:
        """Another relay (or this one) stored messages: claim them for the
        consumers here (delivered by the next pump())."""
        self.fabric.wake()

    def pump(self, now: float) -> None:
        """Hand ready messages to consumers with credit."""
        self.delivery.pump(now)

    def top_up(self) -> None:
        """Read ahead into the windows deliveries left low: for a turn whose
        output has gone, when no input waits (Mailboxes.top_up)."""
        self.boxes.top_up(self.delivery.unacked)

    def shutdown(self) -> None:
        """Tell every peer the relay is going away."""
        for peer in self.sessions.peers.values():
            self.turn.reply_now(peer.identity, Cmd.BYE, "relay shutting down")

    # --- output and commit --------------------------------------------------------------

    def take_output(self, now: float) -> list[Output]:
        """Frames that may go out now (before the turn's commit)."""
        out = self.turn.take_now()
        peers = self.sessions.peers
        for identity, _ in out:
            peer = peers.get(identity)
            if peer is not None:
                peer.last_sent = now
        return out

    def hold_deletes(self, now: float) -> bool:
        """No commit this turn: its writes are a few recent deletes
        (turn.py).  Not with a shared store, whose claims other relays read."""
        return self.fabric is None and self.turn.hold_deletes(now)

    @property
    def deletes_unwritten(self) -> bool:
        """Deletes held for a later commit (hold_deletes) whose statements
        have not run yet."""
        return self.turn.deletes_since is not None and self.fabric is None and bool(self.store.open_deletes())

    def write_held_deletes(self) -> None:
        """Run the held deletes' statements now, into the store's open
        transaction (SQLiteStore.seal), while the consumers work on their
        deliveries; their COMMIT still waits (turn.py), and finds them done."""
        self.store.seal()

    def prepare_commit(self) -> list[Output]:
        """Seal the turn's writes and return the replies that may go out
        only once the caller's store.commit() has returned."""
        return self.turn.prepare_commit()

    def commit(self) -> None:
        """Make the turn's writes durable; then the held replies may go."""
        self.turn.commit()


_SEND_BYTE = bytes([Cmd.SEND])
_unpack = msgpack.unpackb


def _req_of(cmd: Cmd, fields: tuple) -> int | None:
    """The request id of a command that carries one first (BYE and
    HEARTBEAT do not; ACK's first field is a list)."""
    if cmd in (Cmd.BYE, Cmd.HEARTBEAT) or not fields:
        return None
    first = fields[0]
    return first if type(first) is int else None


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except LocalProtocolError as exc:
        raise Malformed(str(exc)) from None


