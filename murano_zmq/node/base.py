"""What Node and AsyncNode share before any loop runs: their arguments
(relay, discovery, CURVE, keys, forwarder, bounds), the NodeCore and the
sockets object, and the small checks both make in their API calls."""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from typing import Iterable

import zmq

from ..discovery.zeroconf import INTERFACES_ENV, Advert, auto_pattern, relay_endpoints
from ..protocol.constants import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_PREFETCH,
    DEFAULT_RELAY_ENDPOINT,
    DEFAULT_SPIN,
    DEFAULT_TIMEOUT,
    MAX_HEARTBEAT,
    MAX_NAME_LENGTH,
    MAX_PREFETCH,
    MAX_PREFETCH_BYTES,
    MAX_SPIN,
    MIN_HEARTBEAT,
    RELAY_ENV,
)
from ..protocol.direct import DEFAULT_DIRECT_TIMEOUT, bind_problem
from ..protocol.errors import MessageTooLarge, RelayUnavailable, SendQueueFull
from ..protocol.message import check_name, check_peer_name, is_number, is_whole, records_size
from ..protocol.topics import check_topic
from ..security.curve import client_curve
from ..security.keys import KeyFileError, load_public_key
from ..security.node import node_security
from .common import check_wait, pairs_size
from .core import NodeCore
from .sockets import DEFAULT_DIRECT_BIND, NodeSockets, check_endpoint
from .topics import TopicSockets, parse_forwarder

__all__ = ["DEFAULT_DIRECT_BIND", "NodeBase", "default_node_name", "resolve_relay"]

log = logging.getLogger("murano_zmq.node")


def resolve_relay(relay: str | None) -> str:
    """--relay / argument, else $MURANO_ZMQ_RELAY, else the default endpoint."""
    return relay or os.environ.get(RELAY_ENV) or DEFAULT_RELAY_ENDPOINT


def check_relay(relay) -> str:
    """`relay=` as given (an endpoint, a list of them, "a,b", "auto" or
    "auto:PATTERN", None for $MURANO_ZMQ_RELAY or the default) as the
    node keeps it; ValueError, here in the caller's thread, for anything
    ZeroMQ could not connect to."""
    if isinstance(relay, (list, tuple)):  # several relays: the session moves on when one is lost
        if not relay or not all(isinstance(r, str) for r in relay):
            raise ValueError(f"relay= takes an endpoint, a list of endpoints or 'auto', got {relay!r}")
        relay = ",".join(relay)
    if relay is not None and not isinstance(relay, str):
        raise ValueError(f"relay= takes an endpoint, a list of endpoints or 'auto', got {relay!r}")
    source = f"${RELAY_ENV}=" if not relay and os.environ.get(RELAY_ENV) else "relay="
    relay = resolve_relay(relay)
    if auto_pattern(relay) is not None:
        return relay
    endpoints = [e.strip() for e in relay.split(",")]
    try:
        for endpoint in endpoints:
            check_endpoint(endpoint)
    except ValueError as exc:
        raise ValueError(f"{source}{relay!r}: {exc}") from None
    twice = next((e for i, e in enumerate(endpoints) if e in endpoints[:i]), None)
    if twice is not None:  # (a failover list that fails over to the same relay)
        raise ValueError(f"{source}{relay!r}: {twice} is named twice")
    return ",".join(endpoints)


class _Process:
    """This process, as nodes know it: a fork makes a new one (no getpid()
    on every send)."""


_process = _Process()


def _forked() -> None:
    global _process
    _process = _Process()


os.register_at_fork(after_in_child=_forked)


def default_node_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class NodeBase:
    """Arguments and shared checks; subclasses run the loop."""

    def _setup(self, name: str | None, relay: str | None, *, heartbeat: float = DEFAULT_HEARTBEAT,
               timeout: float = DEFAULT_TIMEOUT, context: zmq.Context | None = None, curve_key=None,
               relay_key=None, direct: bool = True, bind: str = DEFAULT_DIRECT_BIND,
               direct_timeout: float = DEFAULT_DIRECT_TIMEOUT, discovery: bool | str | None = None,
               forwarder=None, max_pending: int = DEFAULT_MAX_PENDING,
               max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES, authorized_keys=None,
               trusted_keys=None, permissions=None, forwarder_key=None, spin: float = DEFAULT_SPIN) -> None:
        self.name = check_peer_name(name) if name else default_node_name()
        # (0 or less reconnected at every turn, flooding the relay; nan made
        # every HELLO a 400; a str killed the I/O thread)
        if not is_number(heartbeat) or not MIN_HEARTBEAT <= heartbeat <= MAX_HEARTBEAT:
            raise ValueError(f"heartbeat must be {MIN_HEARTBEAT} to {MAX_HEARTBEAT} seconds, got {heartbeat!r}")
        timeout = check_wait(timeout)
        direct_timeout = check_wait(direct_timeout, "direct_timeout")
        self._made_in = _process  # (a Node does not survive a fork: its sockets are the parent's)
        problem = bind_problem(bind)
        if problem is not None:
            raise ValueError(f"bind={bind!r}: {problem}")
        # discovery: True / interfaces ("127.0.0.1,10.0.0.5" or "all") to
        # advertise this node and learn peers by zeroconf; None: on when
        # $MURANO_ZMQ_DISCOVERY_INTERFACES is set.  relay="auto" finds a relay.
        if discovery is None:
            discovery = bool(os.environ.get(INTERFACES_ENV))
        self._discover = bool(discovery)
        self._interfaces = discovery if isinstance(discovery, str) else None
        self.relay = check_relay(relay)
        # relay="auto" / "auto:PATTERN": every relay discovery finds (whose
        # name matches), learned for the node's life.
        self._auto = auto_pattern(self.relay)
        self._bad_adverts: set[str] = set()
        self.timeout = timeout
        # spin: how long a blocking send or request looks for its answer
        # without sleeping (node/owned.py, node/aio.py); 0: it sleeps at once.
        if not is_number(spin) or not 0 <= spin <= MAX_SPIN:
            raise ValueError(f"spin must be 0 to {MAX_SPIN} seconds, got {spin!r}")
        self.spin = spin
        self._spin_pays = True  # the last lone wait's answer came within the spin
        if not is_whole(max_pending) or max_pending < 1:
            raise ValueError(f"max_pending must be a whole number >= 1, got {max_pending!r}")
        self.max_pending = max_pending
        if not is_whole(max_pending_bytes) or max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be a whole number >= 1, got {max_pending_bytes!r}")
        self.max_pending_bytes = max_pending_bytes
        # At least the bytes `pending` holds: the last sum plus what came
        # since.  The sum (a pass over every held message) runs only when
        # this passes the bound, so a flowing node sums once per
        # max_pending_bytes sent, and nothing is counted at the many places
        # a message leaves the node's queues.
        self._held_bytes_bound = 0
        self._held_when_full = math.inf  # `pending` when the last sum found the node full
        self._context = context or zmq.Context.instance()
        # CURVE (docs/security.md): curve_key is this node's key pair (a
        # KeyPair or a .key_secret path), relay_key the relay's public key
        # (z85 text, a KeyPair or a .key path); both or neither.
        self._curve = client_curve(curve_key, relay_key)
        # The rest of the fabric with keys (docs/security.md): authorized_keys
        # (DIR) may connect to this node's direct ROUTER and PUB; trusted_keys
        # (DIR, default the authorized ones) pin what discovery says;
        # permissions (FILE) checks direct sends; forwarder_key is the
        # forwarder's public key.
        self._security = node_security(self._curve, authorized_keys, trusted_keys, permissions, forwarder_key)
        forwarder = parse_forwarder(forwarder)
        if self._security is not None and forwarder and self._security.forwarder_key is None:
            raise ValueError("a node with CURVE keys needs the forwarder's public key (forwarder_key)")
        # Direct delivery (docs/architecture.md): direct=False: relay only (a
        # node that cannot accept connections, e.g. behind NAT).
        self._core = NodeCore(self.name, uuid.uuid4().bytes, heartbeat, direct=direct,
                              direct_timeout=direct_timeout, security=self._security,
                              max_message_size=DEFAULT_MAX_MESSAGE_SIZE)
        self._topics = TopicSockets(self._context, self.name, bind, forwarder, self._security)
        self._io = NodeSockets(self._context, self._core, None if self._auto else self.relay, self._curve,
                               self._security, self._topics, bind)
        self._io.on_topic = self._feed_topic
        self._discovery = None
        self._next_subscription = 1
        self._wake_r, self._wake_w = os.pipe()  # wakes the runner's poll
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._armed = 0.0  # when Node's I/O thread's current sleep ends at the latest

    @property
    def pending(self) -> int:
        """Messages this node holds that no socket has taken yet."""
        return len(self._outgoing) + self._core.pending

    @property
    def relays(self) -> list[str]:
        """The relays this node would use, in the order a lost session tries them."""
        return list(self._io.relays)

    @property
    def relay_endpoint(self) -> str | None:
        """The relay of the current session (None before the first)."""
        return self._io.relay_endpoint

    def _where(self) -> str:
        """The relay, for error messages."""
        if self._auto is not None and self._io.relay_endpoint:
            return f"{self._io.relay_endpoint} ({self.relay})"
        return self.relay

    @property
    def endpoint(self) -> str | None:
        """Where this node takes direct deliveries (None: relay only)."""
        return self._core.endpoint

    # --- checks the API calls share -------------------------------------------------

    def _check_room(self, records: list) -> None:
        """Refuse `records` (SendQueueFull) if the node would then hold more
        than max_pending messages or max_pending_bytes bytes that no socket
        has taken.  (Node: called holding its lock.)"""
        count, held = len(records), self.pending
        if count > self.max_pending:
            raise SendQueueFull(f"a send_many of {count} messages is more than node {self.name} may hold "
                                f"(max_pending={self.max_pending}): send them in parts, or raise max_pending")
        if held + count > self.max_pending:
            raise SendQueueFull(f"node {self.name} holds {held} messages it could not hand on yet "
                                f"(max_pending={self.max_pending}); is the relay at {self._where()} reachable?")
        size = len(records[0][3]) + len(records[0][2]) if count == 1 else records_size(records)
        limit = self.max_pending_bytes
        if size > limit:
            raise SendQueueFull(f"a send of {size} bytes is more than node {self.name} may hold "
                                f"(max_pending_bytes={limit}): send it in parts, or raise max_pending_bytes")
        bound = (self._held_bytes_bound if held else 0) + size
        if bound > limit:
            # Summed again only if messages left since the last sum found the
            # node full: refusals while nothing drains cost no pass.
            held_bytes = self._pending_bytes() if held < self._held_when_full else self._held_bytes_bound
            bound = held_bytes + size
            if bound > limit:
                self._held_bytes_bound, self._held_when_full = held_bytes, held
                raise SendQueueFull(f"node {self.name} holds {held} messages of {held_bytes} bytes it could not "
                                    f"hand on yet (max_pending_bytes={limit}); is the relay at {self._where()} "
                                    "reachable?")
        self._held_bytes_bound, self._held_when_full = bound, math.inf

    def _pending_bytes(self) -> int:
        """Body and header bytes of the messages `pending` counts."""
        for _ in range(3):
            try:
                return pairs_size(tuple(self._outgoing)) + self._core.pending_bytes()
            except RuntimeError:  # (a queue another thread changed while it was copied: rare)
                continue
        return self.max_pending_bytes  # (full, for this call: the next one sums again)

    def _check_deliverable_now(self, mailbox: str) -> None:
        if not self._core.deliverable_now(mailbox):
            raise RelayUnavailable(f"no relay connected at {self._where()} and no direct consumer of "
                                   f"{mailbox} (wait=False)")

    @staticmethod
    def _check_consume(mailbox: str, prefetch: int = DEFAULT_PREFETCH, prefetch_bytes: int | None = None) -> None:
        check_name(mailbox)
        # The relay's bounds, checked here: a CONSUME it refuses would only
        # come back as 400 MALFORMED.
        if not is_whole(prefetch) or not 1 <= prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be a whole number from 1 to {MAX_PREFETCH}, got {prefetch!r}")
        if prefetch_bytes is not None and not (is_whole(prefetch_bytes) and 1 <= prefetch_bytes <= MAX_PREFETCH_BYTES):
            raise ValueError(f"prefetch_bytes must be a whole number from 1 to {MAX_PREFETCH_BYTES} or None, "
                             f"got {prefetch_bytes!r}")

    @property
    def path_counts(self) -> dict[str, int]:
        """Records this node handed to each path so far: {"direct": n, "relay": m}
        (one that falls back from a direct link counts on both)."""
        return dict(self._core.sent)

    def _check_publish(self, topic: str, packed_body: bytes) -> None:
        check_topic(topic)
        if len(packed_body) > DEFAULT_MAX_MESSAGE_SIZE:  # (a forwarder would drop it, with the connection)
            raise MessageTooLarge(f"an event of {len(packed_body)} bytes is over the {DEFAULT_MAX_MESSAGE_SIZE} "
                                  "a forwarder passes by default")
        if self._security is not None and not self._security.accepts and not self._topics.forwarder:
            raise ValueError("a node with CURVE keys publishes only with authorized_keys (who may "
                             "subscribe) or through a forwarder (forwarder=, forwarder_key=)")

    def _publisher_keys(self, prefix: str, publishers: Iterable) -> dict:
        """`subscribe(publishers=...)` as endpoint -> key (None without CURVE)."""
        if not isinstance(prefix, str):
            raise ValueError("prefix must be a str")
        if len(prefix) > MAX_NAME_LENGTH:  # (its subscription would never reach a publisher)
            raise ValueError(f"a prefix is at most {MAX_NAME_LENGTH} characters, as a topic is; got {len(prefix)}")
        out: dict[str, bytes | None] = {}
        for item in publishers:
            endpoint, key = (item, None) if isinstance(item, str) else tuple(item)
            check_endpoint(endpoint)  # (a bad one is the caller's ValueError; an advert's, a log line)
            if self._security is not None:
                if key is None:
                    raise ValueError(f"publisher {endpoint}: a node with CURVE keys needs its public "
                                     "key: publishers=[(endpoint, key)]")
                try:
                    key = load_public_key(key)
                except KeyFileError as exc:
                    raise ValueError(f"publisher {endpoint}: {exc}") from None
            out[endpoint] = key
        return out

    def _feed_topic(self, sid: int, events: list) -> None:
        subscription = self._subscriptions.get(sid)
        if subscription is not None:
            subscription._feed(events)

    def _new_subscription_id(self) -> int:
        sid = self._next_subscription
        self._next_subscription += 1
        return sid

    def _timeout(self, timeout: float | None) -> float:
        """A call's timeout (None: the node's), checked before anything is sent."""
        return self.timeout if timeout is None else check_wait(timeout)

    def _check_process(self) -> None:
        if self._made_in is not _process:
            raise RuntimeError(f"node {self.name} was made before this process forked: its sockets are the "
                               "parent's; make a new node in this process")

    def _timed_out(self, timeout: float, send: bool = False) -> RelayUnavailable:
        """The time-out of a call; of a send (`send`), which may wait for a
        direct link, with the links open now."""
        links = self._core.sender.link_endpoints() if send and self._core.sender is not None else []
        direct = f", nor from direct link(s) to {', '.join(links)[:300]}" if links else ""
        return RelayUnavailable(f"no answer from relay {self._where()}{direct} within {timeout:.4g}s (the node "
                                "keeps trying until it is closed)")

    # --- the wake pipe (Node's I/O thread sleeps on it) -------------------------------

    def _wake(self) -> None:
        if self._woken or self._wake_w is None:
            return
        self._woken = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or the loop has ended

    def _close_wake(self) -> None:
        r, w, self._wake_w = self._wake_r, self._wake_w, None
        os.close(r)
        os.close(w)

    # --- discovery ------------------------------------------------------------------

    @property
    def peers(self) -> dict:
        """What discovery sees: service name -> Advert."""
        return self._discovery.peers if self._discovery is not None else {}

    def _advert(self) -> Advert:
        key = self._security.key.public.decode() if self._security is not None else ""
        return Advert(self.name, "node", self.endpoint or "", self._topics.pub_endpoint or "",
                      self._core.advertised_mailboxes(), key)

    def _advertise(self) -> None:
        """(any thread but the loop's) say what this node offers now."""
        if self._discovery is not None and self._discover:  # (relay="auto" alone only browses)
            self._discovery.advertise(self._advert())

    def _learn_peers(self, peers: dict, now: float) -> None:
        """(the loop) adverts changed: teach the core and the topic sockets,
        and (relay="auto") take the relays."""
        self._learn_relays(peers)
        if self._discover:
            self._topics.learned(self._core.adverts(peers, now))

    def _learn_relays(self, peers: dict) -> None:
        """(the loop, or before it runs) relay="auto": relays advertised now
        join the node's list."""
        if self._auto is not None:
            self._io.add_relays(relay_endpoints(peers, self._auto, self._usable_relay), first_for=self.name)

    def _usable_relay(self, endpoint: str) -> bool:
        """An advert's endpoint is a claim: one ZeroMQ could not connect to
        is left out (and logged once)."""
        if endpoint in self._io.relays:
            return True
        if endpoint in self._bad_adverts:
            return False
        try:
            check_endpoint(endpoint)
            return True
        except ValueError as exc:
            self._bad_adverts.add(endpoint)
            log.warning("node %s: ignoring an advertised relay: %s", self.name, exc)
            return False
