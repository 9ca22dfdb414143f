"""NodeCore: every decision a node makes, with no I/O.

It holds the relay session (ClientCore), the routing of each send (relay,
direct, or held back for a LOOKUP: PathTable), the sending ends of direct
links (DirectSender), the receiving end (DirectInbox), the dedup window both
paths share, settling by the path a message came on, consumers, and which
adverts are trusted.  Waiters are anything with done(), set_result() and
set_exception() (concurrent or asyncio futures): the runner picks them.

The runners (Node: a thread; AsyncNode: an asyncio task) only poll, read,
write and wake: they hand each command they read to relay_frames(),
link_frames() or inbox_frames(), call tick() and route(), write what
relay_out(), links_out() and inbox_out() return, and open or close one
DEALER per direct link as `socket_ops` says.  Time is an argument.

No zmq, asyncio, socket or threading import belongs here.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from operator import itemgetter
from typing import Any, Callable

from ..protocol.client import ClientCore, Confirmed, Failed, RelayLost, Replied, State
from ..protocol.constants import DEFAULT_HEARTBEAT, DEFAULT_MAX_MESSAGE_SIZE, MAX_IN_FLIGHT_BATCHES, PATH_IDLE
from ..protocol.direct import DEFAULT_DIRECT_TIMEOUT
from ..protocol.inbox import DirectInbox
from ..protocol.frames import Cmd
from ..protocol.message import Message, count_down_ttl
from ..protocol.paths import HOLD
from .common import Dispatcher, Orphan, pairs_size, take_batch
from .links import DirectSender

_MAILBOX = itemgetter(1)  # a SEND record's mailbox

log = logging.getLogger("murano_zmq.node")


class NodeCore:
    def __init__(self, name: str, instance: bytes, heartbeat: float = DEFAULT_HEARTBEAT, *,
                 direct: bool = True, direct_timeout: float = DEFAULT_DIRECT_TIMEOUT, security=None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.name = name
        self.session = ClientCore(name, instance, heartbeat)
        self.dispatch = Dispatcher()
        self.dispatch.welcomed = lambda ev: setattr(self, "max_size", ev.max_message_size)
        self.max_size: int | None = None  # the relay's limit, once WELCOME gave it
        # security: a NodeSecurity (its pure questions only: permissions,
        # identify, trusted_name, may_consume), or None.
        self._security = security
        self.sender = DirectSender(name, instance, heartbeat, direct_timeout,
                                   require_keys=security is not None) if direct else None
        self.inbox = DirectInbox(name, max_message_size, self.session.dedup) if direct else None
        if self.inbox is not None:
            self.inbox.permissions = security.permissions if security is not None else None
        self.endpoint: str | None = None  # where this node takes direct deliveries (set by the runner)
        self.consumers: dict[str, int] = {}  # mailbox -> consumer id taking direct deliveries
        self.advert_due = False  # what this node consumes directly changed: advertise again
        self._relay_queue: deque = deque()  # (record, waiter) routed to the relay
        self._held: deque = deque()  # (record, waiter) waiting for a LOOKUP to choose a path
        self._relay_sends: dict[int, dict[str, int]] = {}  # SEND req -> records per mailbox, for the path table
        self._lookups: dict[int, str] = {}  # LOOKUP req -> mailbox
        self._lost: RelayLost | None = None
        self._untrusted: set[tuple[str, str]] = set()  # adverts whose key was not trusted (logged once)
        # Records handed to each path (one that falls back from a direct link
        # counts on both): what murano_zmq.metrics exports for nodes that opt in.
        self.sent = {"direct": 0, "relay": 0}
        self._prune_due = 0.0  # when to forget idle mailboxes' paths next (_prune_paths)

    # --- state the runners read ------------------------------------------------------

    @property
    def state(self) -> State:
        return self.session.state

    @property
    def paths(self):
        return self.sender.paths if self.sender is not None else None

    @property
    def holding(self) -> bool:
        """Records wait here for a LOOKUP to choose their path."""
        return bool(self._held)

    @property
    def pending(self) -> int:
        """Messages held here that no socket has taken yet."""
        queued = self.sender.queued if self.sender is not None else 0
        return len(self._held) + len(self._relay_queue) + queued

    def pending_bytes(self) -> int:
        """Body and header bytes of the messages `pending` counts.  Another
        thread may ask: it sums snapshots (each taken whole under the GIL)."""
        queued = self.sender.queued_bytes() if self.sender is not None else 0
        return pairs_size(tuple(self._held)) + pairs_size(tuple(self._relay_queue)) + queued

    def deliverable_now(self, mailbox: str) -> bool:
        """Would a message to `mailbox` leave now (relay session up, or direct)?"""
        if self.session.state == State.READY:
            return True
        if self.sender is None:
            return False
        return self.sender.paths.is_direct(mailbox, relay_up=False)

    def settled_down(self) -> bool:
        """Nothing to route, write or reconnect, and no direct link open: a
        turn that only read the relay may end without tick and write (the
        next deadline still gets its tick)."""
        return (self._lost is None and not self.session.has_output and not self._relay_queue
                and not self._held and (self.sender is None or (not self.sender.has_links
                                                               and not self.inbox.has_output)))

    def next_deadline(self) -> float:
        deadline = self.session.next_deadline()
        if self.sender is not None:
            deadline = min(deadline, self.sender.next_deadline(), self.inbox.next_deadline())
        return deadline

    # --- the application's calls ------------------------------------------------------

    def request(self, cmd: Cmd, *fields: Any, waiter) -> int:
        req = self.session.request(cmd, *fields)
        self.dispatch.requests[req] = waiter
        return req

    def forget(self, req: int) -> None:
        """A request whose caller gave up (a STATUS that timed out): not
        replayed after a reconnect, its reply dropped."""
        self.dispatch.requests.pop(req, None)
        self.session.forget(req)

    def consume(self, mailbox: str, prefetch: int, direct: bool, sink: Callable[[list], None], waiter,
                prefetch_bytes: int | None = None) -> int:
        """Start a consumer (direct deliveries too, if this node takes them)."""
        endpoint = self.endpoint if direct else None
        cid, req = self.session.consume(mailbox, prefetch, endpoint, prefetch_bytes)
        if endpoint is not None:
            self.consumers[mailbox] = cid
        self.dispatch.sinks[cid] = sink
        self.dispatch.requests[req] = waiter
        return cid

    def cancel(self, cid: int, mailbox: str) -> None:
        """Stop a consumer on both paths."""
        self.session.cancel(cid)
        self.dispatch.sinks.pop(cid, None)
        if self.consumers.get(mailbox) == cid:
            del self.consumers[mailbox]  # direct senders now get 404 and use the relay
            self.advert_due = True

    def settle(self, message: Message, how: str, requeue: bool) -> None:
        """Settle with the path that brought the message."""
        if message.origin is None:
            self.session.settle(message, how, requeue)
            if self.inbox is not None and (how == "ack" or not requeue):
                self.inbox.settled_elsewhere((message.mailbox, message.id))
            return
        again = self.inbox.settle(message, how, requeue)
        self.session.settled_elsewhere((message.mailbox, message.id), not again, how != "ack" and not requeue)
        sink = self.dispatch.sinks.get(self.consumers.get(message.mailbox, -1))
        if again and sink is not None:
            sink(again)

    def settle_many(self, settles: list[tuple[Message, str, bool]]) -> None:
        """settle() of each (message, how, requeue), in order; the acks of
        relay copies (the usual consumer's) in runs at once."""
        run: list[Message] = []
        for message, how, requeue in settles:
            if message.origin is None and how == "ack":
                run.append(message)
                continue
            if run:
                self._ack_relay_copies(run)
                run = []
            self.settle(message, how, requeue)
        if run:
            self._ack_relay_copies(run)

    def _ack_relay_copies(self, messages: list[Message]) -> None:
        keys = self.session.settle_acks(messages)
        if self.inbox is not None:
            self.inbox.settled_elsewhere_many(keys)

    # --- routing ----------------------------------------------------------------------

    def route(self, incoming, now: float) -> None:
        """Route new sends (direct, relay or held), then put the relay's share
        into SEND commands once the relay's limit is known."""
        if len(incoming) == 1 and not self._held and not self._relay_queue and self._send_alone(incoming[0], now):
            return
        routing = incoming
        if self._held:  # held back earlier: they go first
            self._held.extend(incoming)
            routing, self._held = self._held, deque()
        sender = self.sender
        if sender is None:  # (a node with no direct path holds nothing back)
            self._relay_queue.extend(routing)
            self._fill_sends(now)
            return
        held_mailboxes: set[str] = set()
        sender.paths.relay_up = self.session.state == State.READY
        # A run of records to one mailbox that is bound to the relay (see
        # DirectSender.relay_bound) is queued without asking again per record.
        bound, bound_count = None, 0
        for record, waiter in routing:
            mailbox = record[1]
            if mailbox == bound:
                self._relay_queue.append((record, waiter))
                bound_count += 1
                continue
            if bound_count:
                sender.paths.via_relay(bound, bound_count)
                bound, bound_count = None, 0
            if self.session.state == State.READY and sender.paths.wants_lookup(mailbox, now):
                self._lookups[self.session.request(Cmd.LOOKUP, mailbox)] = mailbox
            if mailbox in held_mailboxes:
                self._held.append((record, waiter))  # behind one held back: FIFO
                continue
            path = sender.route(record, waiter, now)
            if path == HOLD:
                held_mailboxes.add(mailbox)
                self._held.append((record, waiter))
                continue
            if path is not None:
                self.sent["direct"] += 1
                continue
            self._to_relay(record, waiter)
            if sender.relay_bound(mailbox):
                bound = mailbox
        if bound_count:
            sender.paths.via_relay(bound, bound_count)
        self._fill_sends(now)

    def send_now(self, pair: tuple, now: float) -> list[bytes] | None:
        """A lone send (record, waiter) when nothing else is held, queued or
        waiting to be written, in _send_alone()'s usual case: the frames of
        its SEND, for the runner to write now to the relay (they count as
        written), without route()'s and relay_out()'s steps.  None, with
        nothing done: route() it."""
        sender = self.sender
        if self._held or self._relay_queue or self.session.has_output or (sender is not None and (
                sender.has_links or sender.socket_ops or self.inbox.has_output)):
            return None
        return self._send_alone(pair, now, write_now=True)

    def _send_alone(self, pair: tuple, now: float, write_now: bool = False):
        """A lone send (nothing held or queued before it) in the usual case,
        put into a SEND of its own without the general routing: the relay
        session up with room, the record within its limit, and the relay
        the mailbox's only path with nothing to look up.  What route() and
        _fill_sends() would do for it; False (nothing done) otherwise.
        `write_now`: the SEND's frames instead of True, if no output waits
        ahead of it (ClientCore.send_now), else None (nothing done)."""
        record, waiter = pair
        session, sender = self.session, self.sender
        declined = None if write_now else False
        if session.state != State.READY or session.unconfirmed >= MAX_IN_FLIGHT_BATCHES:
            return declined
        mailbox = record[1]
        limit = session.max_message_size
        if (limit is not None and len(record[3]) + len(record[2]) > limit) or (
                sender is not None and not sender.relay_only(mailbox, now)):
            return declined
        if record[5] is not None and not count_down_ttl(record, now - record[4]):
            return declined  # (its ttl passed on its way here: take_batch fails it)
        if write_now:  # (send_now() checked that no output waits: this writes)
            req, frames = session.send_now([record], now)
        else:
            req = session.send([record], now)
        if sender is not None:
            sender.paths.relay_up = True
            sender.paths.via_relay(mailbox, now=now)
            self._relay_sends[req] = {mailbox: 1}
        self.sent["relay"] += 1
        self.dispatch.sends[req] = ([waiter], [record])
        return frames if write_now else True

    def _fill_sends(self, now: float) -> None:
        session = self.session
        while self._relay_queue and session.state == State.READY and session.unconfirmed < MAX_IN_FLIGHT_BATCHES:
            dropped: list = []
            records, waiters = take_batch(self._relay_queue, session.max_message_size, dropped, now)
            if self.sender is not None:
                for r in dropped:  # refused before sending: no confirm will count them down
                    self.sender.paths.relay_confirmed(r[1])
            if not records:
                if dropped:
                    continue
                break
            req = session.send(records, now)
            self.sent["relay"] += len(records)
            self.dispatch.sends[req] = (waiters, records)
            if self.sender is not None:
                # (Counter counts in C, but costs ~10,000 instructions to make: not for a lone send)
                self._relay_sends[req] = Counter(map(_MAILBOX, records)) if len(records) > 1 else {records[0][1]: 1}

    def _to_relay(self, record: list, waiter) -> None:
        """Queue a record for the relay.  The path table counts it from now
        on, not from when it goes out: a later record to the same mailbox
        must not go direct while this one still waits here (FIFO)."""
        self._relay_queue.append((record, waiter))
        if self.sender is not None:
            self.sender.paths.via_relay(record[1])

    def _fall_back(self, pairs: list) -> None:
        """Records a direct link gave back join the relay queue, in order."""
        for record, waiter in pairs:
            self._to_relay(record, waiter if waiter is not None and not waiter.done() else Orphan())

    # --- input ------------------------------------------------------------------------

    def relay_connected(self, now: float) -> None:
        """A fresh relay socket: HELLO, then replay what is pending."""
        self._lost = None
        self._apply(self.session.connection_made(now), now)

    def relay_frames(self, frames: list, now: float) -> None:
        req = self.session.take_confirm(frames, now)
        if req is not None:  # the usual command: a SEND's CONFIRM, without an event
            self._relay_confirmed(req)
            self.dispatch.confirmed(req)
            return
        try:
            events = self.session.receive(frames, now)
        except Exception as exc:
            log.warning("node %s: bad command from relay dropped: %s", self.name, exc)
            return
        self._apply(events, now)

    def relay_dropped(self) -> None:
        """The relay connection dropped (socket monitor)."""
        self._lost = RelayLost("connection to the relay dropped")

    def take_lost(self) -> RelayLost | None:
        """A reason to reconnect, once: the runner opens a new relay socket."""
        lost, self._lost = self._lost, None
        return lost

    def link_frames(self, endpoint: str, frames: list, now: float) -> None:
        self._fall_back(self.sender.receive(endpoint, frames, now))

    def link_refused(self, endpoint: str, why: str, auth: bool, now: float) -> None:
        self._fall_back(self.sender.refused(endpoint, why, auth, now))

    def inbox_frames(self, identity: bytes, frames: list, now: float, user_id=None) -> None:
        """A command on this node's ROUTER; with CURVE, from the key named by its User-Id."""
        if self._security is None:
            self.dispatch.apply(self.inbox.receive(identity, frames, now, self.consumers))
            return
        user = self._security.identify(user_id)
        if user is None:  # removed from the authorized keys since the handshake
            log.warning("node %s: refused a direct command: key %s is not authorized here", self.name, user_id)
            self.inbox.refuse(identity, f"key {user_id} is not authorized by {self.name}")
            return
        refused = self.inbox.refused
        self.dispatch.apply(self.inbox.receive(identity, frames, now, self.consumers, user))
        if self.inbox.refused != refused:
            log.warning("node %s refused %d direct message(s) from %s: not allowed to send to their "
                        "mailbox (permissions); the sender hands them to the relay",
                        self.name, self.inbox.refused - refused, user)

    def inbox_send_failed(self, identity: bytes, frames: list) -> None:
        """The ROUTER could not pass a command to a peer (ROUTER_MANDATORY)."""
        self.inbox.send_failed(identity, frames)

    def tick(self, now: float) -> None:
        self._apply(self.session.tick(now), now)
        if self.sender is not None:
            self.inbox.tick(now)
            self._fall_back(self.sender.tick(now))
            if now >= self._prune_due:
                self._prune_paths(now)
            # A stalled link's records get a copy at the relay, ahead of the
            # mailbox's next sends (with no relay session they wait on the link).
            self.sender.paths.relay_up = self.session.state == State.READY
            if self.sender.paths.relay_up:
                self._fall_back(self.sender.escrow(now))

    def _prune_paths(self, now: float) -> None:
        """Forget idle mailboxes' paths (PathTable.prune); look up those the
        relay may still hold messages of ours for."""
        self._prune_due = now + PATH_IDLE
        paths = self.sender.paths
        ask = paths.prune(now, self.sender.busy_mailboxes())
        if self.session.state == State.READY:
            for mailbox in ask:
                if paths.wants_lookup(mailbox, now):
                    self._lookups[self.session.request(Cmd.LOOKUP, mailbox)] = mailbox

    def _apply(self, events: list, now: float) -> None:
        """Dispatch events; relay confirms also tell the path table, LOOKUP
        replies teach it."""
        paths = self.paths
        if paths is not None:
            for ev in events:
                if isinstance(ev, (Confirmed, Failed)):
                    self._relay_confirmed(ev.req)
                if isinstance(ev, (Replied, Failed)) and ev.req in self._lookups:
                    mailbox = self._lookups.pop(ev.req)
                    if isinstance(ev, Replied):
                        paths.looked_up(mailbox, ev.result, now)
                    else:
                        paths.lookup_failed(mailbox, now)
        lost = self.dispatch.apply(events)
        if lost is not None:
            self._lost = lost

    def _relay_confirmed(self, req: int) -> None:
        """SEND `req` is answered: its records no longer wait at the relay (the path table)."""
        sends = self._relay_sends.pop(req, None)
        if sends is not None:
            paths = self.sender.paths
            for mailbox, count in sends.items():
                paths.relay_confirmed(mailbox, count)

    # --- output -------------------------------------------------------------------------

    def relay_out(self, now: float) -> list:
        """Frames for the relay socket, in order (the runner writes them all)."""
        self.session.flush_acks()
        out = self.session.drain()
        if out:
            self.session.sent(now)
        return out

    def links_out(self, now: float) -> list:
        return self.sender.flush(now) if self.sender is not None else []

    def inbox_out(self, now: float) -> list:
        if self.inbox is None:
            return []
        out = self.inbox.drain()
        for identity, _ in out:
            self.inbox.sent(identity, now)
        return out

    # --- adverts ------------------------------------------------------------------------

    def advertised_mailboxes(self) -> tuple[str, ...]:
        return tuple(sorted(self.consumers))

    def adverts(self, peers: dict, now: float) -> dict:
        """Discovery's view changed: teach the path table who consumes what
        directly; returns the publishers (PUB endpoint -> key) for topics.

        With keys, an advert counts only if its key is trusted (pinned: in
        trusted_keys), and names a direct consumer only of mailboxes that
        key may consume (when the node has a permissions file): discovery
        never makes this node trust a key on its own."""
        by_mailbox: dict[str, dict[str, bytes | None]] = {}
        pubs: dict[str, bytes | None] = {}
        for a in peers.values():
            if a.role != "node" or a.name == self.name:
                continue
            key, who = None, None
            if self._security is not None:
                who = self._security.trusted_name(a.key)
                if who is None:
                    if (a.name, a.key) not in self._untrusted:
                        self._untrusted.add((a.name, a.key))
                        log.warning("node %s: ignoring the advert of %s: its key %r is not trusted",
                                    self.name, a.name, a.key or None)
                    continue
                key = a.key.encode("ascii")
            for mailbox in a.mailboxes:
                if a.endpoint and (who is None or self._security.may_consume(who, mailbox)):
                    by_mailbox.setdefault(mailbox, {})[a.endpoint] = key
            if a.pub:
                pubs[a.pub] = key
        if self.sender is not None:
            paths = self.sender.paths
            for mailbox in set(by_mailbox) | set(paths.discovered_mailboxes()):
                paths.discovered(mailbox, by_mailbox.get(mailbox, {}), now)
        return pubs

    # --- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Last acks and BYE on every path (the runner writes them, then closes)."""
        self.session.close()
        if self.sender is not None:
            self.sender.close()
            self.inbox.close()

    def abandon(self, error: BaseException) -> list:
        """Fail every waiter; returns the waiters of sends never handed on."""
        self.dispatch.fail_all(error)
        waiters = [w for q in (self._relay_queue, self._held) for _, w in q]
        self._relay_queue.clear()
        self._held.clear()
        if self.sender is not None:
            waiters.extend(self.sender.abandon())
        for waiter in waiters:
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        return waiters
