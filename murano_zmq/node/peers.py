"""Direct delivery for the threaded Node: this node's ROUTER (the receiving
end) and one DEALER per peer it sends to (the sending ends), driving the
sans-IO DirectInbox, DirectLink and PathTable in the Node's I/O thread.

With CURVE (a NodeSecurity): the ROUTER is a CURVE server admitting the
node's authorized keys (bound only when it has some), each DEALER a CURVE
client expecting the key the path table knows for its endpoint (from the
relay's LOOKUP, or a pinned advert), and a monitor on each DEALER fails its
link at once when the peer's handshake refuses this node's key.  The
ROUTER names the sending key on every command, for revocation and the
permissions check.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..protocol.constants import DIRECT_BATCH, FRAME_HEADROOM
from .common import SEND_BATCH_BYTES, ready_frames, record_size
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

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class DirectPeers:
    def __init__(self, context: zmq.Context, node_name: str, instance: bytes, heartbeat: float,
                 dedup, max_message_size: int, bind: str = DEFAULT_DIRECT_BIND,
                 timeout: float = DEFAULT_DIRECT_TIMEOUT, window: int = DEFAULT_WINDOW,
                 security=None):
        self._context = context
        self.node_name = node_name
        self.instance = instance
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.window = window
        self.bind = bind
        self._security = security  # security.node.NodeSecurity, or None: plain TCP
        self.paths = PathTable(require_keys=security is not None)
        self.inbox = DirectInbox(node_name, max_message_size, dedup)
        self.inbox.permissions = security.permissions if security is not None else None
        self.consumers: dict[str, int] = {}  # mailbox -> this node's consumer id
        self.endpoint: str | None = None
        self._router: zmq.Socket | None = None
        self._links: dict[str, DirectLink] = {}
        self._socks: dict[str, zmq.Socket] = {}
        self._monitors: dict[str, zmq.Socket] = {}  # endpoint -> its DEALER's handshake monitor (CURVE)
        self._queues: dict[str, deque] = {}  # endpoint -> (record, waiter) not yet sent
        self._waiters: dict[int, object] = {}  # id(record) -> waiter, while direct
        self._out: dict[str, int] = {}  # mailbox -> its records queued or unconfirmed on a link
        self._sticky: dict[str, str] = {}  # mailbox -> the link those records are on
        self.changed = True  # the set of sockets to poll changed

    # --- lifetime (I/O thread) ----------------------------------------------------

    def start(self) -> str | None:
        """Bind the ROUTER; a keyed node without authorized keys binds none
        (it sends directly but takes deliveries from the relay only)."""
        if self._security is not None and not self._security.accepts:
            return None
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # A peer cannot make this node allocate more than one message's worth.
        sock.setsockopt(zmq.MAXMSGSIZE, self.inbox.max_message_size + FRAME_HEADROOM)
        if self._security is not None:
            self._security.server(sock)
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
        router = [self._router] if self._router is not None else []
        return [*router, *self._socks.values(), *self._monitors.values()]

    def close(self) -> None:
        for endpoint, link in self._links.items():
            link.close()
        self.inbox.close()
        self.flush(0.0)
        for endpoint in list(self._monitors):
            self._close_monitor(endpoint)
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
        if self._security is not None:
            # choose() offers only endpoints with a known key (LOOKUP or a pinned advert).
            self._security.client(sock, self.paths.key_of(endpoint))
            self._monitors[endpoint] = sock.get_monitor_socket(HANDSHAKE_EVENTS)
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
                batch, size = [], 0
                # Small batches: a peer CONFIRMs a SEND once all of it is acked.
                while queue and len(batch) < min(DIRECT_BATCH, link.room()):
                    record_bytes = record_size(queue[0][0])
                    if batch and size + record_bytes > SEND_BATCH_BYTES:
                        break  # keep frames far below the peer's ZMQ_MAXMSGSIZE
                    record, waiter = queue.popleft()
                    self._waiters[id(record)] = waiter
                    batch.append(record)
                    size += record_bytes
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
        monitored = next((e for e, m in self._monitors.items() if m is sock), None)
        if monitored is not None:
            return events, self._handshake_events(monitored, sock, now)
        keyed_router = sock is self._router and self._security is not None  # read the User-Id
        for frames in ready_frames(sock, copy=not keyed_router):
            if sock is self._router:
                self._inbound(frames, now, events)
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

    def _inbound(self, frames: list, now: float, events: list) -> None:
        """One command on the ROUTER; with CURVE, from the key named by its User-Id."""
        if self._security is None:
            events.extend(self.inbox.receive(frames[0], frames[1:], now, self.consumers))
            return
        try:
            user_id = frames[0].get("User-Id")
        except zmq.ZMQError:
            user_id = None
        frames = [f.bytes for f in frames]
        if len(frames) < 2:
            return
        user = self._security.identify(user_id)
        if user is None:  # removed from the authorized keys since the handshake
            log.warning("node %s: refused a direct command: key %s is not authorized here",
                        self.node_name, user_id)
            self.inbox.refuse(frames[0], f"key {user_id} is not authorized by {self.node_name}")
            return
        refused = self.inbox.refused
        events.extend(self.inbox.receive(frames[0], frames[1:], now, self.consumers, user))
        if self.inbox.refused != refused:
            log.warning("node %s refused %d direct message(s) from %s: not allowed to send to their "
                        "mailbox (permissions); the sender hands them to the relay",
                        self.node_name, self.inbox.refused - refused, user)

    def _handshake_events(self, endpoint: str, monitor: zmq.Socket, now: float) -> list:
        """A DEALER's handshake failed: the peer refused this node's key, or is
        not who its key says.  Fail the link now instead of after a timeout."""
        failed = None
        for _ in range(100):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            if event["event"] & HANDSHAKE_EVENTS:
                failed = event
        if failed is None or endpoint not in self._links:
            return []
        why = ("the peer refused this node's key (not in its authorized keys?)"
               if failed["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
               f"CURVE handshake failed (event 0x{failed['event']:x}, value {failed['value']})")
        log.warning("node %s: direct link to %s: %s", self.node_name, endpoint, why)
        to_relay = self._fail(endpoint, why, [])
        if failed["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.paths.link_refused(endpoint, now)  # not again at every LOOKUP
        return to_relay

    def _close_monitor(self, endpoint: str) -> None:
        monitor = self._monitors.pop(endpoint, None)
        if monitor is not None:
            try:
                self._socks[endpoint].disable_monitor()
            except (KeyError, zmq.ZMQError):
                pass
            monitor.close(0)

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
        self._close_monitor(endpoint)
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

    def abandon(self) -> list:
        """Waiters of every record not confirmed yet (the node is closing)."""
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for queue in self._queues.values():
            waiters.extend(w for _, w in queue)
            queue.clear()
        return waiters

    def settle(self, message: Message, how: str, requeue: bool) -> list[Message]:
        return self.inbox.settle(message, how, requeue)
