"""The sending ends of a node's direct links, with no I/O: which link takes a
record, each link's queue and window, who waits for which record, and what
goes to the relay when a link fails or stalls.

A stalled link (records out, no CONFIRM for `stall` seconds: a consumer
that does not take its messages) is not failed: the relay gets a copy of
its unconfirmed records of each mailbox only its peer consumes directly,
oldest first, then the records queued behind them, so that each send
returns once the relay has stored its message (or the peer has settled
it, whichever comes first), and the path table sends the mailbox's next
messages through the relay behind them.  The peer keeps the copies it has;
the dedup window there makes the relay's copies shadows of them.

The runner owns one DEALER per link.  It opens and closes them as
`socket_ops` says, writes what flush() returns, and hands back what it reads
(receive()) and a refused CURVE handshake (refused()).
"""

from __future__ import annotations

import logging
from collections import deque

from ..protocol.constants import DEFAULT_DIRECT_TIMEOUT, DEFAULT_WINDOW, DIRECT_BATCH, DIRECT_STALL, MAX_DIRECT_LINKS
from ..protocol.direct import DirectConfirmed, DirectLink, LinkFailed, LinkState
from ..protocol.paths import HOLD, PathTable
from .common import SEND_BATCH_BYTES, pairs_size, record_size

log = logging.getLogger("murano_zmq.node")

# Seconds between two log lines of a sender whose links are all open and busy.
LINKS_FULL_LOG_EVERY = 60.0

OPEN, CLOSE = "open", "close"  # socket_ops: (OPEN, endpoint, expected key or None) / (CLOSE, endpoint)


class DirectSender:
    def __init__(self, node_name: str, instance: bytes, heartbeat: float,
                 timeout: float = DEFAULT_DIRECT_TIMEOUT, window: int = DEFAULT_WINDOW,
                 require_keys: bool = False, stall: float = DIRECT_STALL):
        self.node_name = node_name
        self.instance = instance
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.stall = min(stall, timeout / 2)  # copies go to the relay well before the link fails
        self.window = window
        self.paths = PathTable(require_keys=require_keys)
        self.socket_ops: list[tuple] = []  # for the runner, in order
        self._links: dict[str, DirectLink] = {}
        self._queues: dict[str, deque] = {}  # endpoint -> (record, waiter) not yet sent
        self._waiters: dict[int, object] = {}  # id(record) -> waiter, while direct
        self._out: dict[str, int] = {}  # mailbox -> its records queued or unconfirmed on a link
        self._sticky: dict[str, str] = {}  # mailbox -> the link those records are on
        self._escrowed: dict[int, _Escrow] = {}  # id(record) -> its waiter: out on a link, copied to the relay
        self._stall_seen: dict[str, tuple] = {}  # endpoint -> the stall escrow() last went through
        self._full_logged = float("-inf")  # when MAX_DIRECT_LINKS, all busy, was last logged

    @property
    def queued(self) -> int:
        """Records waiting for a link's window."""
        if not self._queues:
            return 0  # (every send asks: the usual case, answered at once)
        return sum(len(q) for q in list(self._queues.values()))

    def queued_bytes(self) -> int:
        """Body and header bytes of those records (from any thread, as `queued`)."""
        return sum(pairs_size(tuple(q)) for q in list(self._queues.values()))

    @property
    def has_links(self) -> bool:
        return bool(self._links)

    def link_endpoints(self) -> list[str]:
        """The endpoints links are open to (from any thread: a snapshot, for messages)."""
        try:
            return sorted(self._links)
        except RuntimeError:  # (changed meanwhile by the loop's thread)
            return []

    def busy_mailboxes(self) -> set[str]:
        """Mailboxes with records queued or unconfirmed on a link."""
        return set(self._out)

    def has_link(self, endpoint: str) -> bool:
        return endpoint in self._links

    # --- routing ----------------------------------------------------------------------

    def route(self, record: list, waiter, now: float) -> str | None:
        """Take `record` on a direct link if its mailbox goes direct now.
        Returns the endpoint, None (the relay's), or HOLD (ask again later)."""
        mailbox = record[1]
        endpoint = self.paths.choose(mailbox, lambda e: self._has_room(e, now), now)
        if endpoint is None and self._sticky.get(mailbox) in self._links:
            # The consumer vanished from LOOKUP/discovery while records are
            # still out on its link: going to the relay now could overtake
            # them (if the link then fails); stay behind them.
            endpoint = self._sticky[mailbox]
        if (endpoint is not None and endpoint != HOLD and endpoint not in self._links
                and not self._may_open(mailbox, now)):
            # Every link busy, none to spare: behind the mailbox's records
            # out on a link (FIFO, as above), else the relay takes it.
            endpoint = self._sticky.get(mailbox) if self._sticky.get(mailbox) in self._links else None
        if endpoint is not None and endpoint != HOLD:
            if endpoint not in self._links:
                self._open(endpoint, now)
            self._queues[endpoint].append((record, waiter))
            self._out[mailbox] = self._out.get(mailbox, 0) + 1
            self._sticky[mailbox] = endpoint
        return endpoint

    def relay_only(self, mailbox: str, now: float) -> bool:
        """Would route() give `mailbox`'s next record to the relay, with no
        LOOKUP to ask first?  (PathTable.relay_only, and no link it sticks to.)"""
        return self.paths.relay_only(mailbox, now) and (not self._links or self._sticky.get(mailbox) not in self._links)

    def relay_bound(self, mailbox: str) -> bool:
        """Will route() give the relay every further record to `mailbox`
        until something changes (a confirm, a LOOKUP, another route call)?
        Relay sends of it unconfirmed, and no link it sticks to."""
        return self.paths.relay_bound(mailbox) and self._sticky.get(mailbox) not in self._links

    def _settled(self, record: list) -> None:
        mailbox = record[1]
        left = self._out.get(mailbox, 0) - 1
        if left > 0:
            self._out[mailbox] = left
        else:
            self._out.pop(mailbox, None)
            self._sticky.pop(mailbox, None)

    def _has_room(self, endpoint: str, now: float) -> bool:
        link = self._links.get(endpoint)
        if link is None:
            if len(self._links) >= MAX_DIRECT_LINKS:
                return False  # (route() may close an idle one for it)
            link = self._open(endpoint, now)
        return link.state != LinkState.FAILED and link.room() > len(self._queues[endpoint])

    def _may_open(self, mailbox: str, now: float) -> bool:
        """Room for one more link (MAX_DIRECT_LINKS), made by closing the
        idle one (nothing out, nothing queued) whose last CONFIRM is oldest,
        if need be.  (Its peer's session ends by its heartbeat.)"""
        if len(self._links) < MAX_DIRECT_LINKS:
            return True
        idle = [(link.last_progress, endpoint) for endpoint, link in self._links.items()
                if link.room() == link.window and not self._queues[endpoint]]
        if idle:
            endpoint = min(idle)[1]
            del self._links[endpoint]
            del self._queues[endpoint]
            self._stall_seen.pop(endpoint, None)
            self.socket_ops.append((CLOSE, endpoint))
            return True
        if now - self._full_logged >= LINKS_FULL_LOG_EVERY:
            self._full_logged = now
            log.warning("node %s: %d direct links open and busy (the most): messages to %s and others wait "
                        "behind their mailbox's link or take the relay until one is idle", self.node_name,
                        len(self._links), mailbox)
        return False

    def _open(self, endpoint: str, now: float) -> DirectLink:
        link = DirectLink(endpoint, self.node_name, self.instance, now, self.heartbeat, self.timeout, self.window)
        self._links[endpoint] = link
        self._queues[endpoint] = deque()
        # choose() offers only endpoints with a known key under CURVE (LOOKUP or a pinned advert).
        self.socket_ops.append((OPEN, endpoint, self.paths.key_of(endpoint)))
        return link

    def flush(self, now: float) -> list[tuple[str, list[bytes]]]:
        """Queued records into SENDs (window permitting); every link's frames to write."""
        out = []
        for endpoint, link in self._links.items():
            queue = self._queues[endpoint]
            while queue and link.state == LinkState.READY and link.room():
                batch, size = [], 0
                # Small batches: a peer CONFIRMs a SEND once all of it is acked.
                while queue and len(batch) < min(DIRECT_BATCH, link.room()):
                    record_bytes = record_size(queue[0][0])
                    if batch and (size + record_bytes > SEND_BATCH_BYTES
                                  or link.bytes_out + size + record_bytes > link.window_bytes):
                        break  # frames far below the peer's ZMQ_MAXMSGSIZE; the window's bytes
                    record, waiter = queue.popleft()
                    self._waiters[id(record)] = waiter
                    batch.append(record)
                    size += record_bytes
                link.send(batch, now)
            frames = link.drain()
            if frames:
                out.extend((endpoint, f) for f in frames)
                link.sent(now)
        return out

    # --- input ------------------------------------------------------------------------

    def receive(self, endpoint: str, frames: list, now: float) -> list:
        """One command read on a link's socket; returns the (record, waiter)
        pairs that must go to the relay instead."""
        link = self._links.get(endpoint)
        if link is None:
            return []  # the link failed meanwhile; its socket is closing
        try:
            events = link.receive(frames, now)
        except Exception as exc:
            log.warning("node %s: bad command from peer %s dropped: %s", self.node_name, endpoint, exc)
            return []
        return self._link_events(events, now)

    def refused(self, endpoint: str, why: str, auth: bool, now: float) -> list:
        """The link's CURVE handshake failed: fail it now, not after a timeout."""
        if endpoint not in self._links:
            return []
        log.warning("node %s: direct link to %s: %s", self.node_name, endpoint, why)
        to_relay = self._fail(endpoint, why, [], now)
        if auth:
            self.paths.link_refused(endpoint, now)  # not again at every LOOKUP
        return to_relay

    def _link_events(self, link_events: list, now: float) -> list:
        to_relay = []
        for ev in link_events:
            if isinstance(ev, DirectConfirmed):
                if ev.done:  # (a CONFIRM that refused every record is no sign of a working peer)
                    self.paths.link_worked(ev.endpoint)
                for record in ev.done:
                    escrow = self._escrowed.pop(id(record), None)
                    if escrow is not None:
                        escrow.link_done(record[0])
                        continue
                    self._settled(record)
                    waiter = self._waiters.pop(id(record), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(record[0])
            elif isinstance(ev, LinkFailed):
                to_relay.extend(self._fail(ev.endpoint, ev.reason, ev.records, now))
        return to_relay

    def _fail(self, endpoint: str, reason: str, records: list, now: float) -> list:
        """The link is gone: its unconfirmed records (the peer's application
        may have had them: marked redelivered), then those queued behind
        them (never sent: a link sends only once it has its WELCOME), for
        the relay."""
        link = self._links.pop(endpoint)
        self._stall_seen.pop(endpoint, None)
        if link.state != LinkState.FAILED:
            records = records + link.fail(reason).records
        kept = []
        for record in records:
            escrow = self._escrowed.pop(id(record), None)
            if escrow is None:
                kept.append(record)
            else:
                escrow.link_failed()  # the relay has its copy already
        records = kept
        log.info("node %s: direct link to %s failed (%s); %d message(s) go to the relay",
                 self.node_name, endpoint, reason, len(records) + len(self._queues[endpoint]))
        self.paths.link_failed(endpoint, now)
        pairs = [(r, self._waiters.pop(id(r), None)) for r in records]
        for record in records:
            record[6] = True  # the peer's application may have had it: the relay marks it redelivered
        pairs.extend(self._queues.pop(endpoint))  # (never sent on the link)
        for record, _ in pairs:
            self._settled(record)
        self.socket_ops.append((CLOSE, endpoint))
        return pairs

    def tick(self, now: float) -> list:
        to_relay = []
        for link in list(self._links.values()):
            to_relay.extend(self._link_events(link.tick(now), now))
        return to_relay

    def escrow(self, now: float) -> list:
        """Stalled links (call only while a relay session is up): the relay
        gets a copy of each unconfirmed record whose mailbox no other direct
        consumer is known for, in the order sent, then the records queued
        behind them.  Returns the (record, waiter) pairs for the relay."""
        pairs: list = []
        for endpoint, link in self._links.items():
            since = link.stalled_since()
            if since is None or now - since < self.stall:
                continue
            queue = self._queues[endpoint]
            stall = self._stall_mark(endpoint, link, since)
            if self._stall_seen.get(endpoint) == stall:
                continue  # nothing new out there, nor of its consumers, since the last look
            self._stall_seen[endpoint] = stall
            # With competing direct consumers (even one whose link failed) a
            # copy at the relay could be handed to another live one while
            # this peer's application works on it: those records wait for the link.
            alone: dict[str, bool] = {}

            def may_copy(mailbox: str) -> bool:
                if mailbox not in alone:
                    alone[mailbox] = all(e == endpoint for e in self.paths.direct_consumers(mailbox, usable=False))
                return alone[mailbox]

            for record in link.unconfirmed():
                key = id(record)
                if key in self._escrowed or not may_copy(record[1]):
                    continue
                escrow = self._escrowed[key] = _Escrow(self._waiters.pop(key, None))
                self._settled(record)
                copy = list(record)
                copy[6] = True  # the peer's application may have it: the relay marks it redelivered
                pairs.append((copy, escrow))
            if any(may_copy(record[1]) for record, _ in queue):
                keep: deque = deque()
                for record, waiter in queue:
                    if may_copy(record[1]):
                        self._settled(record)
                        pairs.append((record, waiter))  # never sent: no copy needed
                    else:
                        keep.append((record, waiter))
                self._queues[endpoint] = keep
        if pairs:
            log.info("node %s: %d message(s) out on stalled direct links get a copy at the relay",
                     self.node_name, len(pairs))
        return pairs

    def next_deadline(self) -> float:
        if not self._links:
            return float("inf")  # (every turn asks: the usual case, answered at once)
        deadline = min(link.next_deadline() for link in self._links.values())
        if self.paths.relay_up:  # escrow() is due when a link has stalled
            for endpoint, link in self._links.items():
                since = link.stalled_since()
                if since is not None and self._stall_seen.get(endpoint) != self._stall_mark(endpoint, link, since):
                    deadline = min(deadline, since + self.stall)
        return deadline

    def _stall_mark(self, endpoint: str, link: DirectLink, since: float) -> tuple:
        return since, link.sends, len(self._queues[endpoint]), self.paths.version

    def close(self) -> None:
        for link in self._links.values():
            link.close()

    def abandon(self) -> list:
        """Waiters of every record not confirmed yet (the node is closing)."""
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for escrow in self._escrowed.values():
            escrow.link_failed()
            waiters.append(escrow)
        self._escrowed.clear()
        for queue in self._queues.values():
            waiters.extend(w for _, w in queue)
            queue.clear()
        return waiters


class _Escrow:
    """The waiter of a record out on a stalled link whose copy went to the
    relay: the first of the relay's CONFIRM (stored) and the peer's
    (settled) completes the send, once.  A relay that refuses the copy
    does not fail the send while the peer may still settle the record."""

    __slots__ = ("waiter", "fired", "out", "refusal")

    def __init__(self, waiter):
        self.waiter = waiter  # None: nobody waits (the caller gave up)
        self.fired = False
        self.out = True  # still unconfirmed on its link
        self.refusal: BaseException | None = None

    def done(self) -> bool:
        return self.fired or (self.waiter is not None and self.waiter.done())

    def set_result(self, msg_id) -> None:
        if not self.done():
            self.fired = True
            if self.waiter is not None:
                self.waiter.set_result(msg_id)

    def set_exception(self, error: BaseException) -> None:
        if self.out:
            self.refusal = error  # the link decides
        elif not self.done():
            self.fired = True
            if self.waiter is not None:
                self.waiter.set_exception(error)

    def link_done(self, msg_id) -> None:
        self.out = False
        self.set_result(msg_id)

    def link_failed(self) -> None:
        """The link gave up on the record; the relay's answer decides."""
        self.out = False
        if self.refusal is not None:
            self.set_exception(self.refusal)
