"""Direct delivery for the threaded Node: this node's ROUTER (the receiving
end) and one DEALER per peer it sends to (the sending ends), driving the
sans-IO DirectInbox, DirectLink and PathTable in the Node's I/O thread.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import zmq

from ..protocol.constants import FRAME_HEADROOM, SEND_BATCH
from ..protocol.direct import (
    DEFAULT_DIRECT_TIMEOUT,
    DEFAULT_WINDOW,
    DirectConfirmed,
    DirectInbox,
    DirectLink,
    LinkFailed,
    LinkState,
)
from ..protocol.message import Message
from ..protocol.paths import HOLD, PathTable

log = logging.getLogger("murano_zmq.node")

__all__ = ["DEFAULT_DIRECT_BIND", "HOLD", "DirectPeers"]

# Where a node takes direct deliveries unless told otherwise: loopback, any port.
DEFAULT_DIRECT_BIND = "tcp://127.0.0.1:*"


class DirectPeers:
    def __init__(self, context: zmq.Context, node_name: str, instance: bytes, heartbeat: float,
                 dedup, max_message_size: int, bind: str = DEFAULT_DIRECT_BIND,
                 timeout: float = DEFAULT_DIRECT_TIMEOUT, window: int = DEFAULT_WINDOW,
                 secure: Callable[[zmq.Socket, bool], None] | None = None):
        self._context = context
        self.node_name = node_name
        self.instance = instance
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.window = window
        self.bind = bind
        self._secure = secure  # applies CURVE to a socket (server=True for the ROUTER)
        self.paths = PathTable()
        self.inbox = DirectInbox(node_name, max_message_size, dedup)
        self.consumers: dict[str, int] = {}  # mailbox -> this node's consumer id
        self.endpoint: str | None = None
        self._router: zmq.Socket | None = None
        self._links: dict[str, DirectLink] = {}
        self._socks: dict[str, zmq.Socket] = {}
        self._queues: dict[str, deque] = {}  # endpoint -> (record, waiter) not yet sent
        self._waiters: dict[int, object] = {}  # id(record) -> waiter, while direct
        self._out: dict[str, int] = {}  # mailbox -> its records queued or unconfirmed on a link
        self._sticky: dict[str, str] = {}  # mailbox -> the link those records are on
        self.changed = True  # the set of sockets to poll changed

    # --- lifetime (I/O thread) ----------------------------------------------------

    def start(self) -> str:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # A peer cannot make this node allocate more than one message's worth.
        sock.setsockopt(zmq.MAXMSGSIZE, self.inbox.max_message_size + FRAME_HEADROOM)
        if self._secure is not None:
            self._secure(sock, True)
        sock.bind(self.bind)
        self._router = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    @property
    def queued(self) -> int:
        """Records waiting for a link's window."""
        return sum(len(q) for q in list(self._queues.values()))

    def sockets(self) -> list[zmq.Socket]:
        self.changed = False
        return [self._router, *self._socks.values()]

    def close(self) -> None:
        for endpoint, link in self._links.items():
            link.close()
        self.inbox.close()
        self.flush(0.0)
        for sock in self._socks.values():
            sock.close(200)
        if self._router is not None:
            self._router.close(200)

    # --- sending ----------------------------------------------------------------------

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
        if endpoint is not None and endpoint != HOLD:
            if endpoint not in self._links:
                self._open(endpoint, now)
            self._queues[endpoint].append((record, waiter))
            self._out[mailbox] = self._out.get(mailbox, 0) + 1
            self._sticky[mailbox] = endpoint
        return endpoint

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
            link = self._open(endpoint, now)
        return link.state != LinkState.FAILED and link.room() > len(self._queues[endpoint])

    def _open(self, endpoint: str, now: float) -> DirectLink:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self._secure is not None:
            self._secure(sock, False)
        sock.connect(endpoint)
        link = DirectLink(endpoint, self.node_name, self.instance, now, self.heartbeat, self.timeout, self.window)
        self._links[endpoint] = link
        self._socks[endpoint] = sock
        self._queues[endpoint] = deque()
        self.changed = True
        return link

    def flush(self, now: float) -> None:
        """Queued records into SENDs (window permitting), and write every outbox."""
        for endpoint, link in self._links.items():
            queue = self._queues[endpoint]
            while queue and link.state == LinkState.READY and link.room():
                batch = []
                while queue and len(batch) < min(SEND_BATCH, link.room()):
                    record, waiter = queue.popleft()
                    self._waiters[id(record)] = waiter
                    batch.append(record)
                link.send(batch, now)
            out = link.drain()
            for frames in out:
                self._socks[endpoint].send_multipart(frames)
            if out:
                link.sent(now)
        for identity, frames in self.inbox.drain():
            try:
                self._router.send_multipart([identity, *frames], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer is gone; it gives its unconfirmed records to the relay
            self.inbox.sent(identity, now)

    # --- input ------------------------------------------------------------------------

    def readable(self, sock: zmq.Socket, now: float) -> tuple[list, list]:
        """Read what `sock` has: (events for the dispatcher, (record, waiter)
        pairs that must go to the relay instead)."""
        events, to_relay = [], []
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if sock is self._router:
                events.extend(self.inbox.receive(frames[0], frames[1:], now, self.consumers))
                continue
            endpoint = next(e for e, s in self._socks.items() if s is sock)
            try:
                link_events = self._links[endpoint].receive(frames, now)
            except Exception as exc:
                log.warning("node %s: bad command from peer %s dropped: %s", self.node_name, endpoint, exc)
                continue
            to_relay.extend(self._link_events(link_events))
            if sock.closed:
                break  # the link failed (e.g. the peer said BYE)
        return events, to_relay

    def _link_events(self, link_events: list) -> list:
        to_relay = []
        for ev in link_events:
            if isinstance(ev, DirectConfirmed):
                for record in ev.done:
                    self._settled(record)
                    waiter = self._waiters.pop(id(record), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(record[0])
            elif isinstance(ev, LinkFailed):
                to_relay.extend(self._fail(ev.endpoint, ev.reason, ev.records))
        return to_relay

    def _fail(self, endpoint: str, reason: str, records: list) -> list:
        link = self._links.pop(endpoint)
        if link.state != LinkState.FAILED:
            records = records + link.fail(reason).records
        log.info("node %s: direct link to %s failed (%s); %d message(s) go to the relay",
                 self.node_name, endpoint, reason, len(records) + len(self._queues[endpoint]))
        self.paths.link_failed(endpoint)
        pairs = [(r, self._waiters.pop(id(r), None)) for r in records]
        pairs.extend(self._queues.pop(endpoint))
        for record, _ in pairs:
            self._settled(record)
            record[6] = True  # the peer's application may have had it: the relay marks it redelivered
        self._socks.pop(endpoint).close(0)
        self.changed = True
        return pairs

    def tick(self, now: float) -> list:
        self.inbox.tick(now)
        to_relay = []
        for link in list(self._links.values()):
            to_relay.extend(self._link_events(link.tick(now)))
        return to_relay

    def next_deadline(self) -> float:
        return min([self.inbox.next_deadline(), *(link.next_deadline() for link in self._links.values())])

    def settle(self, message: Message, how: str, requeue: bool) -> list[Message]:
        return self.inbox.settle(message, how, requeue)
