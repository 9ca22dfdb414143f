"""The node's side of the protocol as a state machine with no I/O.

ClientCore turns API calls into frames (collected in an outbox the driver
drains and writes) and frames from the relay into events.  It owns what must
survive a reconnect: unconfirmed sends, pending requests, consumers, and the
dedup window that hands each message id to application code once per
mailbox (a dead-lettered message keeps its id but is new to its new mailbox).  Time is
an argument (`now`); the driver asks next_deadline() when to call tick().

Node (threads) and AsyncNode (asyncio) are thin drivers of this class.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from .constants import (ACK_EARLY_MIN_PREFETCH, DEDUP_WINDOW, DEFAULT_HEARTBEAT, HEARTBEAT_LIVENESS,
                        KEPT_PACKER_BUFFER, MIN_WELCOME_WAIT, SIGNATURE, WELCOME_LIVENESS)
from .dedup import ACKED, FRESH, REJECTED, DedupWindow
from .errors import LocalProtocolError, NotReady, RelayError, RemoteProtocolError, error_from_code
from .frames import Cmd, decode, encode, encoder
from .message import Message, count_down_ttl, parse_delivery, shown_peer_name, ttl_passed

_CONFIRM = bytes([Cmd.CONFIRM])


# --- events the core hands to its driver --------------------------------------


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A SEND was stored durably; `errors` maps record index -> exception."""

    req: int
    errors: dict[int, RelayError]


@dataclass(frozen=True, slots=True)
class Replied:
    req: int
    result: Any


@dataclass(frozen=True, slots=True)
class Failed:
    req: int
    error: RelayError


@dataclass(frozen=True, slots=True)
class Delivered:
    consumer: int
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class RelayProblem:
    """An ERROR not tied to a request, or a BYE: worth a log line."""

    error: RelayError


@dataclass(frozen=True, slots=True)
class Welcomed:
    relay: str
    max_message_size: int


@dataclass(frozen=True, slots=True)
class RelayLost:
    """Nothing heard from the relay for too long (or it said BYE): reconnect."""

    reason: str


class State(enum.Enum):
    IDLE = "idle"  # no connection yet
    CONNECTING = "connecting"  # HELLO sent, no WELCOME yet
    READY = "ready"
    CLOSED = "closed"


@dataclass(slots=True)
class _Consumer:
    mailbox: str
    prefetch: int
    endpoint: str | None  # where this node takes direct deliveries, if it does
    prefetch_bytes: int | None = None  # byte credit (CONSUME field 5), if any


class ClientCore:
    def __init__(self, node_name: str, instance_id: bytes, heartbeat: float = DEFAULT_HEARTBEAT,
                 dedup_window: int = DEDUP_WINDOW):
        self.node_name = node_name
        self.instance_id = instance_id
        self.heartbeat = heartbeat
        self.state = State.IDLE
        self.relay_name: str | None = None
        self.max_message_size: int | None = None
        self._next_req = 1
        self._next_consumer = 1
        self._outbox: list[list[bytes]] = []
        self._encode = encoder()  # the core is driven by one thread at a time
        self._unconfirmed: dict[int, list] = {}  # req -> SEND records
        self._sent_at: dict[int, float] = {}  # req -> when its records' ttls were last counted
        # req -> (the index in the first SEND of each record replayed, the
        # errors of those left out): a replay leaves out records whose ttl
        # passed (connection_made), and its CONFIRM speaks of what is left.
        self._left_out: dict[int, tuple[list[int], dict]] = {}
        self._requests: dict[int, tuple[Cmd, tuple]] = {}  # req -> command to resend
        self._consumers: dict[int, _Consumer] = {}
        self.dedup = DedupWindow(dedup_window)  # keys: (mailbox, message id)
        # Relay copies of a message whose other copy is with the application:
        # they are settled when it is.  key -> relay tags
        self._shadows: dict[tuple, set[int]] = {}
        self._pending_acks: list[int] = []
        # Connections made to a relay so far: a delivery's tag is settled
        # only on the connection that brought it (Message.connection).  A
        # relay started on another store (a new data directory, the next
        # relay of a list) numbers its deliveries from the same first tag:
        # an ack of an older delivery settled a newer message there.
        self.connections = 0
        # Acks of relay copies worth writing without waiting for the
        # application to pause: half its smallest window (see ack_early).
        self.ack_early = 0
        self._last_heard = 0.0
        self._last_sent = 0.0
        # The driver sets it when it has another relay to try: a session
        # with no WELCOME within WELCOME_LIVENESS heartbeats is lost.
        self.quick_failover = False

    # --- driver hooks -------------------------------------------------------

    def drain(self) -> list[list[bytes]]:
        """The frames to write now, in order."""
        out, self._outbox = self._outbox, []
        return out

    def connection_made(self, now: float) -> list:
        """A fresh socket to the relay: say HELLO and replay what is pending.
        A relay counts a record's ttl from its receipt: a replay's ttls are
        what is left of them, and a record whose ttl passed meanwhile is
        left out, failed with the SEND's CONFIRM (at once, Confirmed
        events, if none is left; it may have been stored, as after any
        time-out)."""
        self._check_open()
        self.state = State.CONNECTING
        self._last_heard = self._last_sent = now
        self.connections += 1
        # The last connection's tags: its relay gave their messages back
        # when the session ended; copies delivered again are settled
        # through the dedup window (_on_deliver).
        self._pending_acks.clear()
        self._shadows.clear()
        self._put(Cmd.HELLO, self.node_name, self.instance_id, self.heartbeat)
        failed = []
        for req, records in list(self._unconfirmed.items()):
            elapsed, self._sent_at[req] = now - self._sent_at[req], now
            alive = [count_down_ttl(r, elapsed) for r in records]
            if not all(alive):
                records = self._leave_out(req, records, alive)
                if not records:
                    failed.append(Confirmed(req, self._left_out.pop(req)[1]))
                    del self._unconfirmed[req], self._sent_at[req]
                    continue
            for record in records:
                record[6] = True  # retry: the relay checks its id index
            self._put(Cmd.SEND, req, records)
        pending_consumers = set()
        for req, (cmd, fields) in self._requests.items():
            self._put(cmd, *fields)
            if cmd == Cmd.CONSUME:
                pending_consumers.add(fields[1])
        # Consumers the old relay session had accepted: subscribe again
        # (req 0: nobody waits for the reply).
        for consumer, c in self._consumers.items():
            if consumer not in pending_consumers:
                self._put(Cmd.CONSUME, 0, consumer, c.mailbox, c.prefetch, c.endpoint, c.prefetch_bytes)
        return failed

    def _leave_out(self, req: int, records: list, alive: list[bool]) -> list:
        """The records of SEND `req` still to replay (kept as its records);
        the others' errors kept for its CONFIRM."""
        origin, errors = self._left_out.get(req) or (list(range(len(records))), {})
        for i, ok, record in zip(origin, alive, records):
            if not ok:
                errors[i] = ttl_passed(record)
        self._left_out[req] = ([i for i, ok in zip(origin, alive) if ok], errors)
        self._unconfirmed[req] = records = [r for r, ok in zip(records, alive) if ok]
        return records

    def next_deadline(self) -> float:
        if self.state in (State.IDLE, State.CLOSED):
            return float("inf")
        return min(self._last_sent + self.heartbeat, self._last_heard + self.heartbeat * HEARTBEAT_LIVENESS)

    def tick(self, now: float) -> list:
        """Send a heartbeat when due; report RelayLost when the relay is silent."""
        if self.state in (State.IDLE, State.CLOSED):
            return []
        if now - self._last_heard > self.heartbeat * HEARTBEAT_LIVENESS:
            return [RelayLost(f"no word from the relay for {now - self._last_heard:.1f}s")]
        if self.quick_failover and self.state == State.CONNECTING \
                and now - self._last_heard > max(self.heartbeat * WELCOME_LIVENESS, MIN_WELCOME_WAIT):
            return [RelayLost(f"no WELCOME from the relay within {now - self._last_heard:.1f}s")]
        self.flush_acks()
        if now - self._last_sent >= self.heartbeat:
            self._put(Cmd.HEARTBEAT)
        return []

    def sent(self, now: float) -> None:
        """The driver wrote frames at `now` (they count as a heartbeat)."""
        self._last_sent = now

    # --- API calls ------------------------------------------------------------

    def send(self, records: list, now: float) -> int:
        """Queue one SEND of `records`, their ttls counted down to `now`
        (node/common.py take_batch; a replay counts on from `now`); returns
        its request id."""
        self._check_open()
        req = self._new_send(records, now)
        self._put(Cmd.SEND, req, records)
        return req

    def send_now(self, records: list, now: float) -> tuple[int, list[bytes]] | None:
        """send(), when nothing else waits to be written: its request id and
        frames, to be written now (they count as sent at `now`), without the
        outbox; None (nothing done) if output waits ahead of it."""
        if self._outbox or self._pending_acks or self.state == State.CLOSED:
            return None
        req = self._new_send(records, now)
        frames = self._frames(Cmd.SEND, req, records)
        self._last_sent = now
        return req, frames

    def forget(self, req: int) -> None:
        """Drop a request (a read its caller gave up on): not replayed."""
        self._requests.pop(req, None)

    def request(self, cmd: Cmd, *fields: Any) -> int:
        """A DECLARE, STATUS or DELETE; the first field (req) is filled in.
        Fields that cannot be encoded raise LocalProtocolError and change
        nothing (no request is kept to be replayed)."""
        self._check_open()
        frames = self._encode_checked(cmd, self._next_req, *fields)
        req = self._new_req()
        self._requests[req] = (cmd, (req, *fields))
        self._outbox.append(frames)
        return req

    def consume(self, mailbox: str, prefetch: int, endpoint: str | None = None,
                prefetch_bytes: int | None = None) -> tuple[int, int]:
        """Start a consumer; returns (consumer id, request id).  `endpoint`:
        where this node also takes direct deliveries for the mailbox;
        `prefetch_bytes`: a byte credit on top of the message credit."""
        self._check_open()
        consumer = self._next_consumer
        req = self.request(Cmd.CONSUME, consumer, mailbox, prefetch, endpoint, prefetch_bytes)
        self._next_consumer += 1
        self._consumers[consumer] = _Consumer(mailbox, prefetch, endpoint, prefetch_bytes)
        self._set_ack_early()
        return consumer, req

    def _set_ack_early(self) -> None:
        """ack_early: once this many acks wait, a runner writes them at
        once, so the relay refills half a window while the application
        works through the other half (else a burst of `prefetch` messages
        is worked, then acked, then refilled: stop and go).  Half the
        smallest prefetch of the consumers; 0 (never early) under
        ACK_EARLY_MIN_PREFETCH, where an ACK per few messages would cost
        more than the overlap gives."""
        smallest = min((c.prefetch for c in self._consumers.values()), default=0)
        self.ack_early = smallest // 2 if smallest >= ACK_EARLY_MIN_PREFETCH else 0

    @property
    def acks_due(self) -> bool:
        """ack_early acks are waiting: write them now (see _set_ack_early)."""
        return 0 < self.ack_early <= len(self._pending_acks)

    def consumer_of(self, mailbox: str) -> int | None:
        """A consumer id of this node for `mailbox`, or None."""
        for consumer, c in self._consumers.items():
            if c.mailbox == mailbox:
                return consumer
        return None

    def cancel(self, consumer: int) -> None:
        """Stop a consumer; the relay gives its unacked messages to others."""
        if self._consumers.pop(consumer, None) is not None and self.state != State.CLOSED:
            self._set_ack_early()
            # A CONSUME still waiting for its reply must not be replayed later.
            for req in [r for r, (cmd, f) in self._requests.items() if cmd == Cmd.CONSUME and f[1] == consumer]:
                del self._requests[req]
            self.flush_acks()
            self._put(Cmd.CANCEL, 0, consumer)
            # The relay requeues what this consumer held: let it come again.
            self.dedup.release(consumer)

    def settled_elsewhere(self, key: tuple, done: bool, rejected: bool = False) -> None:
        """A copy that came another way (direct) was settled: settle the relay
        copies that arrived meanwhile the same way (done: ack; done and
        rejected: reject; else requeue)."""
        tags = self._shadows.pop(key, None)
        if tags and done and not rejected:
            self._pending_acks.extend(tags)
        elif tags:
            self.flush_acks()
            self._put(Cmd.NACK, sorted(tags), not done)

    def settle(self, message: Message, how: str, requeue: bool) -> None:
        """The application acked or nacked `message`."""
        rejected = how != "ack" and not requeue
        done = how == "ack" or rejected
        self.dedup.settle((message.mailbox, message.id), done, rejected)
        current = message.connection == self.connections
        tags = self._shadows.get((message.mailbox, message.id))
        if tags:
            if current:
                tags.discard(message.tag)
            self.settled_elsewhere((message.mailbox, message.id), done, rejected)
        if not current:
            return  # (an earlier connection's tag: see self.connections)
        if how == "ack":
            self._pending_acks.append(message.tag)
            return
        self.flush_acks()  # keep ACK/NACK in the order the application gave them
        self._put(Cmd.NACK, [message.tag], requeue)

    def settle_acks(self, messages: list[Message]) -> list[tuple]:
        """settle(m, "ack", False) of each of `messages`, in order, at once
        (the tags join the same ACK); their (mailbox, id) keys."""
        keys = [(m.mailbox, m.id) for m in messages]
        self.dedup.settle_done(keys)
        current = self.connections
        if self._shadows:
            for m, key in zip(messages, keys):
                tags = self._shadows.get(key)
                if tags:
                    if m.connection == current:
                        tags.discard(m.tag)
                    self.settled_elsewhere(key, True)
        self._pending_acks.extend([m.tag for m in messages if m.connection == current])
        return keys

    def flush_acks(self) -> None:
        """Put the acks collected since the last flush into one ACK."""
        if self._pending_acks and self.state != State.CLOSED:
            self._put(Cmd.ACK, self._pending_acks)
            self._pending_acks = []

    def close(self) -> None:
        if self.state != State.CLOSED:
            self.flush_acks()
            if self.state in (State.CONNECTING, State.READY):
                self._put(Cmd.BYE, "node closing")
            self.state = State.CLOSED

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    @property
    def has_output(self) -> bool:
        """Frames or acks are waiting to be written."""
        return bool(self._outbox or self._pending_acks)

    # --- input ------------------------------------------------------------------

    def take_confirm(self, frames: list[bytes], now: float) -> int | None:
        """The usual reply, a CONFIRM with no errors of a SEND awaiting it,
        taken without decode()'s objects or an event: the SEND's request id
        (confirmed now).  None, with nothing changed, for anything else:
        receive() it (the general way, which says what is wrong)."""
        if len(frames) == 3 and frames[1] == _CONFIRM and frames[0] == SIGNATURE:
            try:
                fields = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
            except Exception:  # msgpack raises several unrelated types; decode() says what
                return None
            if type(fields) is list and len(fields) == 2 and fields[1] == []:
                req = fields[0]
                if type(req) is int and req in self._unconfirmed and req not in self._left_out:
                    del self._unconfirmed[req]
                    del self._sent_at[req]
                    self._last_heard = now
                    return req
        return None

    def receive(self, frames: list[bytes], now: float) -> list:
        """Events for one command from the relay.  Invalid input raises
        RemoteProtocolError and changes nothing."""
        req = self.take_confirm(frames, now)
        if req is not None:
            return [Confirmed(req, {})]
        command = decode(frames)
        self._last_heard = now
        handler = self._HANDLERS.get(command.cmd)
        if handler is None:
            raise RemoteProtocolError(f"a relay does not send {command.cmd.name}")
        return handler(self, *command.fields)

    def _on_welcome(self, relay: str, heartbeat: float, max_size: int) -> list:
        self.state = State.READY
        self.relay_name = shown_peer_name(relay)
        self.max_message_size = max_size
        return [Welcomed(self.relay_name, max_size)]

    def _on_confirm(self, req: int, errors: list) -> list:
        # Check every entry before anything changes (found by tests/security/test_fuzz.py).
        for item in errors:
            if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int
                    and type(item[1]) is int and isinstance(item[2], str)):
                raise RemoteProtocolError("bad CONFIRM error entry")
        if self._unconfirmed.pop(req, None) is None:
            return []  # a confirm for a resend already confirmed
        del self._sent_at[req]
        found = {item[0]: error_from_code(item[1], item[2]) for item in errors} if errors else {}
        if self._left_out and req in self._left_out:  # (a replay that left records out: their indexes)
            origin, left_out = self._left_out.pop(req)
            found = {**left_out, **{origin[i]: e for i, e in found.items() if 0 <= i < len(origin)}}
        return [Confirmed(req, found)]

    def _on_reply(self, req: int, result: Any) -> list:
        if self._requests.pop(req, None) is None:
            return []
        return [Replied(req, result)]

    def _on_error(self, req: int | None, code: int, text: str) -> list:
        error = error_from_code(code, text)
        if isinstance(error, NotReady):
            # A restarted relay does not know this session: handshake again;
            # the request stays pending and is replayed.
            return [RelayLost(f"relay lost the session: {text}")]
        request = self._requests.pop(req, None) if req is not None else None
        if request is not None:
            if request[0] == Cmd.CONSUME:
                self._consumers.pop(request[1][1], None)  # refused: do not replay it
                self._set_ack_early()
            return [Failed(req, error)]
        if req is not None and self._unconfirmed.pop(req, None) is not None:
            del self._sent_at[req]
            self._left_out.pop(req, None)
            return [Failed(req, error)]
        return [RelayProblem(error)]

    def _on_deliver(self, consumer: int, records: list) -> list:
        connection = self.connections
        messages = [parse_delivery(r, connection) for r in records]
        if consumer not in self._consumers:
            # Cancelled meanwhile (or never ours): give them back, and make
            # sure the relay forgets that consumer.
            if messages:
                self._put(Cmd.NACK, [m.tag for m in messages], True)
            self._put(Cmd.CANCEL, 0, consumer)
            return []
        fresh, rejected = [], []
        for m, seen in zip(messages, self.dedup.offer_many([(m.mailbox, m.id) for m in messages], consumer)):
            if seen is FRESH:
                fresh.append(m)
            elif seen is ACKED:
                self._pending_acks.append(m.tag)  # seen and acked: settle quietly
            elif seen is REJECTED:
                rejected.append(m.tag)  # seen and rejected: to its dead-letter mailbox
            else:  # IN_APP: a copy (e.g. one that came direct) is with the application
                self._shadows.setdefault((m.mailbox, m.id), set()).add(m.tag)
        if rejected:
            self.flush_acks()
            self._put(Cmd.NACK, rejected, False)
        return [Delivered(consumer, fresh)] if fresh else []

    def _on_heartbeat(self) -> list:
        return []

    def _on_bye(self, reason: str) -> list:
        return [RelayLost(f"relay said bye: {reason}")]

    _HANDLERS = {
        Cmd.WELCOME: _on_welcome,
        Cmd.CONFIRM: _on_confirm,
        Cmd.REPLY: _on_reply,
        Cmd.ERROR: _on_error,
        Cmd.DELIVER: _on_deliver,
        Cmd.HEARTBEAT: _on_heartbeat,
        Cmd.BYE: _on_bye,
    }

    # --- helpers -------------------------------------------------------------------

    def _new_req(self) -> int:
        req = self._next_req
        self._next_req += 1
        return req

    def _new_send(self, records: list, now: float) -> int:
        """A SEND's request id, its records kept until confirmed (replayed after a reconnect)."""
        req = self._new_req()
        self._unconfirmed[req] = records
        self._sent_at[req] = now
        return req

    def _put(self, cmd: Cmd, *fields: Any) -> None:
        self._outbox.append(self._frames(cmd, *fields))

    def _frames(self, cmd: Cmd, *fields: Any) -> list[bytes]:
        frames = self._encode(cmd, *fields)
        if len(frames[2]) > KEPT_PACKER_BUFFER:
            self._encode = encoder()  # not to keep a buffer that size
        return frames

    @staticmethod
    def _encode_checked(cmd: Cmd, *fields: Any) -> list:
        try:
            return encode(cmd, *fields)
        except (OverflowError, TypeError, ValueError) as exc:
            raise LocalProtocolError(f"{cmd.name} cannot be encoded: {exc}") from None

    def _check_open(self) -> None:
        if self.state == State.CLOSED:
            raise LocalProtocolError("the node is closed")
