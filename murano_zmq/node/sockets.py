"""Every zmq socket of a node, for both runners: the relay DEALER (and its
disconnect monitor), the direct ROUTER, one DEALER per direct link (with a
CURVE handshake monitor), and the topic sockets.  It reads what is ready
into the NodeCore and writes the core's outboxes; it decides nothing.

Sockets are plain (non-asyncio) zmq sockets used without blocking; the
runner only waits for them to be readable: Node with a zmq.Poller in its
thread, AsyncNode with zmq.asyncio.Poller on its loop.
"""

from __future__ import annotations

import logging
import uuid
import zlib

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..protocol.constants import FRAME_HEADROOM, READ_BATCH, SEND_BATCH
from ..protocol.direct import tcp_parts
from ..zmqio import EVENTS, NODE_ZERO_COPY_FROM, POLLIN, input_probe, ready_frames, send_message
from .core import NodeCore
from .links import OPEN

log = logging.getLogger("murano_zmq.node")


# Where a node takes direct deliveries unless told otherwise: loopback, any port.
DEFAULT_DIRECT_BIND = "tcp://127.0.0.1:*"

# A send_many of more records than this is routed and written this many at
# a time: the relay reads, stores and syncs the first SENDs while the node
# still encodes the rest, where one flush of all of them left the relay idle
# for as long as their encoding took (~20 ms for 10,000 records of 1 KiB;
# docs/performance.md, session 13).
FLUSH_SLICE = 4 * SEND_BATCH

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _plain(sock: zmq.Socket) -> zmq.Socket:
    """LINGER 0 and HWMs of 0: what a node sends is bounded by its own
    in-flight limits, and a durable command must never meet a silent
    high-water-mark drop."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def relay_socket(context: zmq.Context, endpoint: str, curve=None) -> zmq.Socket:
    """A DEALER to the relay with a fresh routing id (a fresh relay session)."""
    sock = _plain(context.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    if curve is not None:
        curve.apply(sock)  # CURVE to the relay (docs/security.md)
    sock.connect(endpoint)
    return sock


def check_endpoint(endpoint: str) -> str:
    """`endpoint` if ZeroMQ can connect to it (as the relay DEALER will),
    else ValueError: judged here, in the caller's thread, by a connect of a
    throwaway socket, so that a bad value never reaches the node's own thread.
    Host names resolve later and are not checked."""
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5570): {endpoint!r}")
    why = None
    parts = tcp_parts(endpoint)
    if parts is not None:
        host, port = parts
        if host in ("", "[]"):
            why = "no host"  # (libzmq takes it, and then never connects)
        elif not port:
            why = "no port"
        elif port.isdigit() and not 0 < int(port) < 65536:
            why = f"port {port} out of range"
    if why is None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            why = exc.strerror
        finally:
            sock.close(0)
    if why is not None:
        raise ValueError(f"not a ZeroMQ endpoint a node can connect to (e.g. tcp://127.0.0.1:5570): "
                         f"{endpoint!r} ({why})")
    return endpoint


class NodeSockets:
    def __init__(self, context: zmq.Context, core: NodeCore, relay: str, curve=None, security=None,
                 topics=None, bind: str = DEFAULT_DIRECT_BIND):
        self._context = context
        self.core = core
        # The relays, in the order a lost session tries them: given
        # (relay=[...] or "a,b"), or found by zeroconf (relay="auto"; empty
        # until found, then grown by add_relays()).
        self.relays: list[str] = [] if relay is None else relay.split(",")
        self.relay_endpoint: str | None = None  # the current session's relay
        self._curve = curve
        self._security = security  # security.node.NodeSecurity, or None: plain TCP
        self.topics = topics
        self.bind = bind
        self.on_topic = None  # (subscription id, [TopicEvent]) -> None, set by the runner
        self._sock: zmq.Socket | None = None
        self._relay_has_input = None  # the relay socket's zmqio.input_probe() (set with the socket)
        self._relay_unsent: list = []  # frames the relay DEALER could not take yet (see write)
        self._monitor: zmq.Socket | None = None
        self._router: zmq.Socket | None = None
        self._links: dict[str, zmq.Socket] = {}
        self._handshakes: dict[zmq.Socket, str] = {}  # a link's handshake monitor -> its endpoint
        self._by_sock: dict[zmq.Socket, str] = {}  # a link's DEALER -> its endpoint
        self._version = 0  # bumped whenever the set of sockets to poll changes
        self._by_fd: dict = {}  # ZMQ_FD -> socket, as fds() last gave them
        self._touched: set = set()  # sockets read or written since input_waiting() last asked
        self._first: str | None = None  # relay="auto": where the first session goes

    # --- lifetime ---------------------------------------------------------------------

    def bind_router(self) -> str | None:
        """Bind the direct ROUTER; a keyed node without authorized keys binds
        none (it sends directly but takes deliveries from the relay only)."""
        if self.core.inbox is None or (self._security is not None and not self._security.accepts):
            return None
        sock = _plain(self._context.socket(zmq.ROUTER))
        # A peer cannot make this node allocate more than one message's worth.
        sock.setsockopt(zmq.MAXMSGSIZE, self.core.inbox.max_message_size + FRAME_HEADROOM)
        # A command for a peer with no connection now fails (EHOSTUNREACH)
        # instead of vanishing: the core keeps a CONFIRM for when the peer
        # is back (its link keeps its routing id across reconnects).
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self._security is not None:
            self._security.server(sock)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ValueError(f"bind={self.bind!r}: cannot bind the node's direct ROUTER there "
                             f"({exc.strerror})") from None
        self._router = sock
        self.core.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.core.endpoint

    def add_relays(self, found: list[str], first_for: str | None = None) -> None:
        """(relay="auto") Relays discovery found: new ones join the list in
        sorted order; none leaves it (one whose advert went away is tried
        until it fails).  `first_for`: before the first session, start at
        the relay this node name hashes to, so that nodes spread over the
        relays instead of all taking the first."""
        new = [e for e in found if e not in self.relays]
        if new:
            self.relays = sorted(self.relays + new)
            log.info("node %s: relays %s", self.core.name, ", ".join(self.relays))
        if first_for is not None and self.relays and self.relay_endpoint is None:
            self._first = self.relays[zlib.crc32(first_for.encode()) % len(self.relays)]

    def connect(self, now: float) -> None:
        """A new relay socket (and session): at start and after RelayLost."""
        relays = self.relays
        if self._sock is not None:
            log.debug("node %s: new relay socket", self.core.name)
            self._close_relay(0)
            # Several relays: a lost session moves to the next one (a relay
            # that died, a standby taking over); the core replays what is
            # unconfirmed and consumes again there, as after any reconnect.
            at = relays.index(self.relay_endpoint) if self.relay_endpoint in relays else -1
            endpoint = relays[(at + 1) % len(relays)]
        else:
            endpoint = self._first or relays[0]
        if len(relays) > 1:
            log.info("node %s: relay session to %s", self.core.name, endpoint)
        self.relay_endpoint = endpoint
        self._sock = relay_socket(self._context, endpoint, self._curve)
        self._relay_has_input = input_probe(self._sock)
        self._relay_unsent = []  # the new session replays what is unconfirmed
        # A dropped TCP connection loses the frames in it, and ZeroMQ would
        # reconnect under the same routing id without a word: watch it and
        # start a new session instead, replaying what is unconfirmed.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.core.session.quick_failover = len(relays) > 1
        self.core.relay_connected(now)
        self._version += 1

    def _close_relay(self, linger) -> None:
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(linger)

    @property
    def version(self) -> int:
        """Changes whenever the set of sockets to poll changes: each poller
        (the I/O thread's, a caller's) rebuilds when it moved on."""
        if self.topics is not None and self.topics.changed:
            self.topics.changed = False
            self._version += 1
        return self._version

    def sockets(self) -> list:
        """What to poll for input."""
        socks = [self._sock, self._monitor, *self._links.values(), *self._handshakes]
        if self._router is not None:
            socks.append(self._router)
        if self.topics is not None:
            socks.extend(self.topics.sockets())
        return socks

    def fds(self) -> dict:
        """Each socket's ZMQ_FD -> the socket, for a poll that touches no
        zmq socket (a thread that does not own them may wait on these).
        ZMQ_FD is edge-like: readable() tells what is really there."""
        self._by_fd = {sock.getsockopt(zmq.FD): sock for sock in self.sockets()}
        return self._by_fd

    def relay_fd(self) -> int | None:
        """The relay socket's ZMQ_FD (as of the last fds())."""
        return next((fd for fd, sock in self._by_fd.items() if sock is self._sock), None)

    def socket_of(self, fd: int) -> zmq.Socket | None:
        """The socket whose ZMQ_FD is `fd` (as of the last fds())."""
        return self._by_fd.get(fd)

    def readable(self, fired=None) -> list:
        """The sockets with input queued now (ZMQ_EVENTS): all of them, or
        those of the FDs in `fired` (from the last fds()).  Asking also
        re-arms each ZMQ_FD, so input that comes after this will wake a
        poll on the FDs; input already here would not: look before sleeping."""
        if fired is None:
            socks = self.sockets()
        else:
            socks = [self._by_fd[fd] for fd in fired if fd in self._by_fd]
        return [sock for sock in socks if self._has_input(sock)]

    def input_waiting(self, touched_only: bool = False) -> bool:
        """Has any socket input queued?  A send reads the socket's pending
        input and can take the edge of its ZMQ_FD, so a poll on that FD
        started before the send would not report it.  `touched_only`: ask
        only the sockets read or written since the last ask (the others
        were left with their FD armed)."""
        touched, self._touched = self._touched, set()
        socks = touched if touched_only else self.sockets()
        return any(self._has_input(sock) for sock in socks if not sock.closed)

    def _has_input(self, sock: zmq.Socket) -> bool:
        """ZMQ_EVENTS says `sock` has input (the relay socket's kept probe,
        the cheaper ask, while it is open; a closed socket's get() raises)."""
        if sock is self._sock and not sock.closed:
            return bool(self._relay_has_input())
        return bool(sock.get(EVENTS) & POLLIN)

    def close(self) -> None:
        """Write the core's last frames (acks, BYEs), then close every socket."""
        self.core.close()
        self.write(0.0)
        self.abort(linger=200)

    def abort(self, linger: int = 0) -> None:
        """Close every socket (idempotent)."""
        for endpoint in list(self._links):
            self._close_link(endpoint, linger)
        if self._router is not None:
            self._router.close(linger)
        if self.topics is not None:
            self.topics.close()
        if self._sock is not None and not self._sock.closed:
            self._close_relay(linger and 500)

    # --- one turn: read what is ready, tick, route, write ---------------------------

    def turn(self, ready, now: float, incoming=()) -> None:
        """`ready`: the sockets the poll reported; `incoming`: new sends."""
        core = self.core
        self._touched.update(ready)
        if self._sock in ready:
            for frames in ready_frames(self._sock, has_input=self._relay_has_input):
                core.relay_frames(frames, now)
        if self._monitor in ready:
            self._monitor.recv_multipart()
            core.relay_dropped()
        if self._router is not None and self._router in ready:
            self._read_router(now)
        for sock, endpoint in list(self._by_sock.items()):
            if sock in ready:
                for frames in ready_frames(sock):
                    core.link_frames(endpoint, frames, now)
                    if not core.sender.has_link(endpoint):
                        break  # the link failed (e.g. the peer said BYE)
        for monitor, endpoint in list(self._handshakes.items()):
            if monitor in ready:
                self._handshake_failed(monitor, endpoint, now)
        if self.topics is not None and self.on_topic is not None:
            for sock, sid in self.topics.sockets().items():
                if sock in ready:
                    self.on_topic(sid, self.topics.read(sock))
        core.tick(now)
        lost = core.take_lost()
        if lost is not None:
            log.info("node %s reconnecting: %s", core.name, lost.reason)
            self.connect(now)
        self.flush(now, incoming)

    def relay_turn(self, now: float, due: float) -> bool:
        """A turn when only the relay socket had input (the usual wake-up: a
        CONFIRM): read it; tick and write only if that left something to
        do or `due` (the core's next deadline before the read, or a time
        before it: reading only moves deadlines later) has come.  True
        when it read the socket dry and wrote nothing: no socket then holds
        input whose FD edge is gone."""
        core = self.core
        relay_frames = core.relay_frames
        sock = self._sock
        self._touched.add(sock)  # (its FD edge may be taken: input_waiting() asks it)
        read = 0
        for frames in ready_frames(sock, has_input=self._relay_has_input):
            relay_frames(frames, now)
            read += 1
        if now >= due or not core.settled_down():
            self.turn((), now)
            return False
        if read < READ_BATCH:
            # Read dry, and its last ZMQ_EVENTS re-armed the FD: no input
            # there for input_waiting(touched_only) to find.
            self._touched.discard(sock)
            return True
        return False

    @property
    def relay_sock(self) -> zmq.Socket | None:
        return self._sock

    def flush(self, now: float, incoming=()) -> None:
        """Route new sends, then write every outbox (FLUSH_SLICE records at a
        time: what a slice routes is on the wire before the next is routed)."""
        core = self.core
        if len(incoming) == 1 and not self._relay_unsent:
            frames = core.send_now(incoming[0], now)
            if frames is not None:  # a lone send, nothing else to write: straight out
                self._write_relay([frames])
                return
        if len(incoming) > FLUSH_SLICE:
            pairs = list(incoming)
            for start in range(FLUSH_SLICE, len(pairs), FLUSH_SLICE):
                core.route(pairs[start - FLUSH_SLICE:start], now)
                if core.holding:
                    # Held for a LOOKUP: each route() would walk them all
                    # again, and nothing held is written.  The rest at once.
                    incoming = pairs[start:]
                    break
                try:
                    self.write(now)
                except BaseException:
                    # Queued as one route() would have left them: the next
                    # turn writes them, or abandon() fails their waiters.
                    core.route(pairs[start:], now)
                    raise
            else:
                incoming = pairs[start:]
        core.route(incoming, now)
        self.write(now)

    def write(self, now: float) -> None:
        core = self.core
        touched = self._touched
        out = core.relay_out(now)
        if self._relay_unsent:
            out = self._relay_unsent + out
            self._relay_unsent = []
        if out:
            self._write_relay(out)
        sender = core.sender
        if sender is None:
            return
        if sender.has_links or sender.socket_ops:  # (the usual case has neither: two calls, not five)
            out = core.links_out(now)
            unopened = self._socket_ops(now)
            for endpoint, frames in out:
                sock = self._links.get(endpoint)
                if sock is None:  # (a link that could not open: its records went to the relay's queue)
                    continue
                touched.add(sock)
                sock.send_multipart(frames)
            if unopened:
                self.write(now)  # those records, to the relay
                return
        if core.inbox.has_output:
            out = core.inbox_out(now)
            touched.add(self._router)
            for identity, frames in out:
                try:
                    self._router.send_multipart([identity, *frames], zmq.NOBLOCK)
                except zmq.ZMQError:  # EHOSTUNREACH: no connection from that peer now
                    core.inbox_send_failed(identity, frames)

    def _write_relay(self, out: list) -> None:
        """Write messages (frame lists) to the relay socket, in order."""
        sock = self._sock
        self._touched.add(sock)
        for i, frames in enumerate(out):
            try:
                send_message(sock, frames, NODE_ZERO_COPY_FROM)
            except zmq.Again:
                # HWM 0, so only a DEALER with no connection to hold them
                # (a refused handshake, between reconnects) says so: they
                # wait here, in order, for the next write, not in a blocked send.
                self._relay_unsent = out[i:]
                break

    # --- direct links -----------------------------------------------------------------

    def _socket_ops(self, now: float) -> bool:
        """Open and close the links the core asks for; True if one could not
        be opened (the core gave its records to the relay's queue)."""
        ops = self.core.sender.socket_ops
        unopened = False
        while ops:
            op = ops.pop(0)
            if op[0] == OPEN:
                unopened |= not self._open_link(op[1], op[2], now)
            else:
                self._close_link(op[1], 0)
        return unopened

    def _open_link(self, endpoint: str, key: bytes | None, now: float) -> bool:
        """A DEALER connecting to a peer's endpoint (as LOOKUP gave it); False
        if ZeroMQ refuses the endpoint: the link fails, and is not tried again."""
        try:
            sock = _plain(self._context.socket(zmq.DEALER))
        except zmq.ZMQError as exc:  # (out of sockets or descriptors: not this node's end)
            self.core.link_refused(endpoint, f"cannot open a socket for {endpoint!r} ({exc.strerror})", True, now)
            return False
        # One routing id for the link's life: after a reconnect the peer's
        # ROUTER (ROUTER_HANDOVER) passes CONFIRMs on to the new connection.
        sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        monitor = None
        try:
            if self._security is not None:
                self._security.client(sock, key)
                monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            if monitor is not None:
                monitor.close(0)
            sock.close(0)
            self.core.link_refused(endpoint, f"cannot connect to {endpoint!r} ({exc.strerror})", True, now)
            return False
        if monitor is not None:
            self._handshakes[monitor] = endpoint
        self._links[endpoint] = sock
        self._by_sock[sock] = endpoint
        self._version += 1
        return True

    def _close_link(self, endpoint: str, linger: int) -> None:
        sock = self._links.pop(endpoint, None)
        if sock is None:
            return
        del self._by_sock[sock]
        for monitor in [m for m, e in self._handshakes.items() if e == endpoint]:
            del self._handshakes[monitor]
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(0)
        sock.close(linger)
        self._version += 1

    def _handshake_failed(self, monitor: zmq.Socket, endpoint: str, now: float) -> None:
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
        if failed is None:
            return
        auth = failed["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        why = ("the peer refused this node's key (not in its authorized keys?)" if auth else
               f"CURVE handshake failed (event 0x{failed['event']:x}, value {failed['value']})")
        self.core.link_refused(endpoint, why, auth, now)

    # --- the ROUTER -------------------------------------------------------------------

    def _read_router(self, now: float) -> None:
        keyed = self._security is not None  # read the User-Id of each command
        for frames in ready_frames(self._router, copy=not keyed):
            if not keyed:
                if len(frames) >= 2:
                    self.core.inbox_frames(frames[0], frames[1:], now)
                continue
            try:
                user_id = frames[0].get("User-Id")
            except zmq.ZMQError:
                user_id = None
            frames = [f.bytes for f in frames]
            if len(frames) >= 2:
                self.core.inbox_frames(frames[0], frames[1:], now, user_id)
