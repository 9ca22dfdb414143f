"""PUB/SUB sockets for the threaded Node, used in its I/O thread.

A node binds one PUB on its first publish() (and connects it to a
forwarder's XSUB when one is configured); each subscription is a SUB socket
connected to every publisher the node knows: discovered ones, a forwarder's
XPUB, and any given explicitly.

With CURVE (a NodeSecurity): the PUB is a CURVE server admitting the node's
authorized keys, or, with a forwarder, a CURVE client of the forwarder's
XSUB that binds nothing; each SUB is a CURVE client that sets the expected
server key before each connect (the publisher's, the forwarder's, or the
node's own), and a publisher whose key is not known is not connected to.
"""

from __future__ import annotations

import logging

import zmq

from ..protocol.errors import RemoteProtocolError
from ..protocol.constants import DEFAULT_MAX_MESSAGE_SIZE, FRAME_HEADROOM, MAX_SUBSCRIPTION_SIZE
from ..protocol.topics import TopicEvent, decode_event, encode_event
from ..zmqio import ready_frames

log = logging.getLogger("murano_zmq.node")


def parse_forwarder(forwarder) -> tuple[str, str] | None:
    """A forwarder as (XSUB endpoint, XPUB endpoint), from a pair or "E1,E2"."""
    if not forwarder:
        return None
    if isinstance(forwarder, str):
        forwarder = [e.strip() for e in forwarder.split(",")]
    forwarder = tuple(forwarder)
    if len(forwarder) != 2 or not all(isinstance(e, str) and e for e in forwarder):
        raise ValueError(f"forwarder is (XSUB endpoint, XPUB endpoint), got {forwarder!r}")
    return forwarder


class TopicSockets:
    def __init__(self, context: zmq.Context, node_name: str, bind: str,
                 forwarder: tuple[str, str] | None = None, security=None):
        self._context = context
        self.security = security  # security.node.NodeSecurity, or None: plain TCP
        self.node_name = node_name
        self.bind = bind
        self.forwarder = forwarder  # (XSUB endpoint for publishers, XPUB endpoint for subscribers)
        self.pub_endpoint: str | None = None
        self._pub: zmq.Socket | None = None
        self._subs: dict[int, zmq.Socket] = {}  # subscription id -> SUB
        self._prefixes: dict[int, bytes] = {}
        self._connected: dict[int, set[str]] = {}
        self.publishers: dict[str, bytes | None] = {}  # PUB endpoint -> its key, learned (discovery)
        self.changed = False

    def publish(self, topic: str, packed_body: bytes, now: float) -> bool:
        """Send one event; True if the PUB had to be created (advertise it)."""
        created = self._pub is None
        if created:
            pub = self._context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_SIZE)  # (it only takes subscriptions)
            if self.security is not None and self.forwarder:
                # A socket is a CURVE server or a client for all its
                # connections: with a forwarder the PUB is the XSUB's client
                # and binds nothing (subscribers hear it through the XPUB).
                self.security.client(pub, self.security.forwarder_key)
                pub.connect(self.forwarder[0])
                self._pub = pub
            else:
                if self.security is not None:
                    self.security.server(pub)
                pub.bind(self.bind)
                if self.forwarder:
                    pub.connect(self.forwarder[0])
                self._pub = pub
                self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            if not self.forwarder:
                for sid in self._subs:  # this node's own subscriptions hear it too
                    self._connect(sid, self._own())
        self._pub.send_multipart(encode_event(topic, self.node_name, packed_body, now))
        return created

    def _own(self) -> dict[str, bytes | None]:
        if not self.pub_endpoint:
            return {}
        return {self.pub_endpoint: self.security.key.public if self.security is not None else None}

    def subscribe(self, sid: int, prefix: str, publishers: dict[str, bytes | None]) -> None:
        """A SUB for `prefix`; `publishers`: endpoint -> its key (None without CURVE)."""
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        if not self.forwarder:
            # No event over what a publisher may send (Node._check_publish):
            # a larger frame drops that publisher's connection (for good:
            # libzmq does not connect again after a protocol error) instead
            # of allocating whatever size it says.  (A forwarder bounds
            # what it passes itself, --max-message-size: a limit here would
            # cut every subscriber off it for good at one larger event.)
            sub.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE_SIZE + FRAME_HEADROOM)
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
        self._subs[sid] = sub
        self._prefixes[sid] = prefix.encode("utf-8")
        self._connected[sid] = set()
        if self.forwarder:
            # Everything comes through the forwarder (this node's PUB too):
            # connecting to publishers as well would deliver events twice.
            key = self.security.forwarder_key if self.security is not None else None
            self._connect(sid, {self.forwarder[1]: key, **publishers})
        else:
            learned = {e: self.publishers[e] for e in sorted(self.publishers)}
            self._connect(sid, {**publishers, **self._own(), **learned})
        self.changed = True

    def learned(self, endpoints: "set[str] | dict[str, bytes | None]") -> None:
        """Publishers known now (discovery; with CURVE endpoint -> pinned key):
        subscriptions connect to new ones."""
        if not isinstance(endpoints, dict):
            endpoints = dict.fromkeys(endpoints)
        self.publishers = dict(endpoints)
        if self.forwarder:
            return
        for sid in self._subs:
            self._connect(sid, {e: endpoints[e] for e in sorted(endpoints)})

    def _connect(self, sid: int, endpoints: dict[str, bytes | None]) -> None:
        for endpoint, key in endpoints.items():
            if not endpoint or endpoint in self._connected[sid]:
                continue
            if self.security is not None and key is None:
                log.warning("node %s: no trusted key for publisher %s: not subscribing to it",
                            self.node_name, endpoint)
                continue
            try:
                if self.security is not None:
                    self.security.client(self._subs[sid], key)  # this connection's server key
                self._subs[sid].connect(endpoint)
            except (zmq.ZMQError, ValueError) as exc:
                # An advert is a claim, and a hostile one must cost no more
                # than that publisher's events: not the node.
                log.warning("node %s: cannot subscribe to publisher %r: %s", self.node_name, endpoint, exc)
            self._connected[sid].add(endpoint)  # (either way: not tried again)

    def unsubscribe(self, sid: int) -> None:
        sub = self._subs.pop(sid, None)
        self._prefixes.pop(sid, None)  # (ids never repeat: kept, these grew by each subscribe/cancel)
        self._connected.pop(sid, None)
        if sub is not None:
            sub.close(0)
            self.changed = True

    def sockets(self) -> dict[zmq.Socket, int]:
        """Each SUB -> its subscription id."""
        return {sock: sid for sid, sock in self._subs.items()}

    def read(self, sock: zmq.Socket) -> list[TopicEvent]:
        events = []
        for frames in ready_frames(sock):
            try:
                events.append(decode_event(frames))
            except RemoteProtocolError as exc:
                log.warning("node %s: bad topic event dropped: %s", self.node_name, exc)
        return events

    def close(self) -> None:
        for sub in self._subs.values():
            sub.close(0)
        self._subs.clear()
        if self._pub is not None:
            self._pub.close(100)
