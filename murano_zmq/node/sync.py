"""Node: the threaded driver of ClientCore.

One I/O thread owns the DEALER socket and the core.  API calls from any
thread put a job on a queue, wake the I/O thread through a pipe, and wait on
a concurrent.futures.Future.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import zmq

from ..protocol.client import ClientCore, Confirmed, Failed, RelayLost, State
from ..protocol.constants import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PENDING,
    DEFAULT_PREFETCH,
    DEFAULT_TIMEOUT,
    MAX_IN_FLIGHT_BATCHES,
)
from ..protocol.errors import NodeClosed, RelayUnavailable, SendQueueFull
from ..protocol.direct import DEFAULT_DIRECT_TIMEOUT
from ..protocol.frames import Cmd
from ..protocol.message import Message, check_name, pack_body
from ..security.curve import client_curve
from ..security.keys import KeyFileError, load_public_key
from ..security.node import node_security
from ..discovery.zeroconf import INTERFACES_ENV, Advert, Discovery, find_relay
from ..protocol.topics import TopicEvent, check_topic
from .peers import DEFAULT_DIRECT_BIND, HOLD, DirectPeers
from .topics import TopicSockets, parse_forwarder
from .common import (
    Dispatcher,
    SendGroup,
    build_record,
    build_records,
    close_relay_socket,
    declare_options,
    default_node_name,
    ready_frames,
    relay_socket,
    resolve_relay,
    take_batch,
)

log = logging.getLogger("murano_zmq.node")


class Node:
    """A process's handle on the fabric, for threaded code.

    >>> with Node("conductor-1", relay="tcp://127.0.0.1:5570") as node:
    ...     node.send("api.results", {"task": 7, "ok": True})
    ...     for msg in node.consume("conductor"):
    ...         handle(msg.body); msg.ack()
    """

    def __init__(self, name: str | None = None, relay: str | None = None, *,
                 heartbeat: float = DEFAULT_HEARTBEAT, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.Context | None = None, curve_key=None, relay_key=None,
                 direct: bool = True, bind: str = DEFAULT_DIRECT_BIND,
                 direct_timeout: float = DEFAULT_DIRECT_TIMEOUT,
                 discovery: bool | str | None = None, forwarder: tuple[str, str] | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, authorized_keys=None, trusted_keys=None,
                 permissions=None, forwarder_key=None):
        self.name = name or default_node_name()
        # discovery: True / interfaces ("127.0.0.1,10.0.0.5" or "all") to
        # advertise this node and learn peers by zeroconf; None: on when
        # $MURANO_ZMQ_DISCOVERY_INTERFACES is set.  relay="auto" finds a relay.
        if discovery is None:
            discovery = bool(os.environ.get(INTERFACES_ENV))
        self._interfaces = discovery if isinstance(discovery, str) else None
        if relay == "auto":
            relay = find_relay(self._interfaces, timeout=min(timeout, 10.0))
        self.relay = resolve_relay(relay)
        self.timeout = timeout
        self.max_pending = max_pending
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
        self._security = node_security(self._curve, authorized_keys, trusted_keys, permissions,
                                       forwarder_key)
        forwarder = parse_forwarder(forwarder)
        if self._security is not None and forwarder and self._security.forwarder_key is None:
            raise ValueError("a node with CURVE keys needs the forwarder's public key (forwarder_key)")
        self._core = ClientCore(self.name, uuid.uuid4().bytes, heartbeat)
        self._dispatch = Dispatcher()
        self._jobs: deque[Callable[[], None]] = deque()
        self._outgoing: deque = deque()  # (record, future) not yet routed
        self._relay_queue: deque = deque()  # (record, future) routed to the relay
        self._held: deque = deque()  # (record, future) waiting for a LOOKUP to choose a path
        self._relay_sends: dict[int, list[str]] = {}  # SEND req -> mailboxes, for the path table
        # Direct delivery (docs/architecture.md): a ROUTER for peers that send
        # here, a DEALER per peer this node sends to.  direct=False: relay only
        # (a node that cannot accept connections, e.g. behind NAT).  With
        # keys every one of them is CURVE; a keyed node without authorized
        # keys binds no ROUTER (it still sends directly).
        self._peers = DirectPeers(self._context, self.name, self._core.instance_id, heartbeat,
                                  self._core.dedup, DEFAULT_MAX_MESSAGE_SIZE, bind, direct_timeout,
                                  security=self._security) if direct else None
        self._topics = TopicSockets(self._context, self.name, bind, forwarder, self._security)
        self._untrusted: set[tuple[str, str]] = set()  # adverts whose key was not trusted (logged once)
        self._subscriptions: dict[int, Subscription] = {}
        self._discovery: Discovery | None = None
        self._next_subscription = 1
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._closed = threading.Event()
        self._max_size: int | None = None
        self._dispatch.welcomed = lambda ev: setattr(self, "_max_size", ev.max_message_size)
        if self._security is not None:
            self._security.start(self._context)  # this node's ZAP domain; key files watched
            # Trusted keys or permissions reloaded: judge the adverts again.
            self._security.on_trust_change = lambda: self._discovery is not None and self._on_peers(self.peers)
        self._thread = threading.Thread(target=self._run, name=f"murano-zmq-{self.name}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._start_error is not None:
            if self._security is not None:
                self._security.close()
            raise self._start_error
        if discovery:
            self._discovery = Discovery(self._interfaces, on_change=self._on_peers)
            self._advertise()

    @property
    def endpoint(self) -> str | None:
        """Where this node takes direct deliveries (None: relay only)."""
        return self._peers.endpoint if self._peers is not None else None

    # --- public API --------------------------------------------------------------

    def declare(self, mailbox: str, *, ttl: float | None = None, message_ttl: float | None = None,
                max_length: int | None = None, max_bytes: int | None = None, overflow: str = "reject",
                dead_letter: str | None = None, passive: bool = False,
                timeout: float | None = None) -> dict:
        """Create a mailbox with options (or check it exists, passive=True).

        Returns the mailbox's status.  Raises PreconditionFailed when it exists
        with other options, MailboxNotFound for a passive declare of a missing one.
        """
        options = declare_options(ttl, message_ttl, max_length, max_bytes, overflow, dead_letter, passive)
        return self._request(Cmd.DECLARE, mailbox, options, timeout=timeout)

    def delete(self, mailbox: str, timeout: float | None = None) -> None:
        """Delete a mailbox and its messages (refused while it has consumers)."""
        self._request(Cmd.DELETE, mailbox, timeout=timeout)

    def status(self, timeout: float | None = None) -> dict:
        """The relay's view: counters and one entry per mailbox."""
        return self._request(Cmd.STATUS, timeout=timeout)

    def send(self, mailbox: str, body: Any, headers: dict | None = None, ttl: float | None = None,
             timeout: float | None = None, wait: bool = True, msg_id: bytes | None = None) -> bytes:
        """Send and wait until the message is safe; returns its id.

        Safe means: stored durably by the relay, or (direct path) acked by the
        consumer's application.  wait=False: raise RelayUnavailable at once
        rather than hold the message while no relay is connected.  msg_id:
        an idempotency key (murano_zmq.idempotent_id), else a fresh id.
        """
        return self._wait(self.send_async(mailbox, body, headers, ttl, wait, msg_id), timeout)

    def send_async(self, mailbox: str, body: Any, headers: dict | None = None,
                   ttl: float | None = None, wait: bool = True,
                   msg_id: bytes | None = None) -> concurrent.futures.Future:
        """Send without blocking: the future resolves to the id once safe."""
        record = build_record(mailbox, body, headers, ttl, time.time(), self._max_size, msg_id)
        if not wait:
            self._check_deliverable_now(mailbox)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue_records([record], [future])
        return future

    def _check_deliverable_now(self, mailbox: str) -> None:
        direct = self._peers is not None and self._peers.paths.is_direct(mailbox)
        if not direct and self._core.state != State.READY:
            raise RelayUnavailable(f"no relay connected at {self.relay} and no direct consumer of "
                                   f"{mailbox} (wait=False)")

    def send_many(self, messages: Iterable[tuple], timeout: float | None = None) -> list[bytes]:
        """Pipelined send of (mailbox, body[, headers[, ttl]]) tuples; waits
        until all are stored and returns their ids in order (or raises the
        first error; the others may have been stored)."""
        records = build_records(messages, time.time(), self._max_size)
        future: concurrent.futures.Future = concurrent.futures.Future()
        group = SendGroup(future, [r[0] for r in records])
        self._queue_records(records, [group] * len(records))
        return self._wait(future, timeout)

    def _queue_records(self, records: list, waiters: list) -> None:
        with self._lock:
            self._check_open()
            held = self.pending
            if held + len(records) > self.max_pending:
                raise SendQueueFull(f"node {self.name} holds {held} messages it could not hand on yet "
                                    f"(max_pending={self.max_pending}); is the relay at {self.relay} reachable?")
            self._outgoing.extend(zip(records, waiters))
        self._wake()

    @property
    def pending(self) -> int:
        """Messages this node holds that no socket has taken yet."""
        peers = self._peers.queued if self._peers is not None else 0
        return len(self._outgoing) + len(self._held) + len(self._relay_queue) + peers

    def consume(self, mailbox: str, prefetch: int = DEFAULT_PREFETCH,
                timeout: float | None = None, direct: bool = True) -> "Consumer":
        """A consumer of `mailbox`: iterate it for Messages; ack each one.

        direct=False: take this mailbox's messages through the relay only
        (for long work where the ack means "finished": a direct sender would
        wait that long for its CONFIRM).
        """
        check_name(mailbox)
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a whole number >= 1, got {prefetch!r}")
        consumer = Consumer(self, mailbox)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> None:
            endpoint = self.endpoint if direct else None
            cid, req = self._core.consume(mailbox, prefetch, endpoint)
            if endpoint is not None:
                self._peers.consumers[mailbox] = cid
            consumer.cid = cid
            self._dispatch.sinks[cid] = consumer._feed
            self._dispatch.requests[req] = future

        self._submit(job)
        try:
            self._wait(future, timeout)
        except BaseException:
            consumer.cancel()  # else a consumer nobody reads would take messages later
            raise
        if self._discovery is not None and self._peers is not None:
            self._advertise()
        return consumer

    # --- topics (PUB/SUB: cheap, lossy) -------------------------------------------

    def publish(self, topic: str, body: Any) -> None:
        """Publish an event to every subscriber of a prefix of `topic`.  No
        ack and no store: a subscriber that is slow or not yet connected loses it."""
        check_topic(topic)
        if self._security is not None and not self._security.accepts and not self._topics.forwarder:
            raise ValueError("a node with CURVE keys publishes only with authorized_keys (who may "
                             "subscribe) or through a forwarder (forwarder=, forwarder_key=)")
        packed = pack_body(body)

        def job() -> None:
            if self._topics.publish(topic, packed, time.time()) and self._discovery is not None:
                self._advertise_soon()

        self._submit(job)

    def subscribe(self, prefix: str = "", callback: Callable[[TopicEvent], None] | None = None,
                  publishers: Iterable[str] = ()) -> "Subscription":
        """Events whose topic starts with `prefix`, from every publisher this
        node knows (discovered, the forwarder, `publishers`).  Iterate the
        subscription, call get(), or pass `callback` (run in a thread of its own).

        With CURVE keys each of `publishers` is (endpoint, public key): the
        publisher's key comes from configuration, as the relay's does."""
        if not isinstance(prefix, str):
            raise ValueError("prefix must be a str")
        given = self._publisher_keys(publishers)
        with self._lock:
            sid = self._next_subscription
            self._next_subscription += 1
        subscription = Subscription(self, sid, prefix, callback)
        self._subscriptions[sid] = subscription
        self._submit(lambda: self._topics.subscribe(sid, prefix, given))
        return subscription

    def _publisher_keys(self, publishers: Iterable) -> dict:
        """`subscribe(publishers=...)` as endpoint -> key (None without CURVE)."""
        out: dict[str, bytes | None] = {}
        for item in publishers:
            endpoint, key = (item, None) if isinstance(item, str) else tuple(item)
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

    @property
    def peers(self) -> dict:
        """What discovery sees: service name -> Advert."""
        return self._discovery.peers if self._discovery is not None else {}

    def _advertise(self) -> None:
        mailboxes = tuple(sorted(self._peers.consumers)) if self._peers is not None else ()
        key = self._security.key.public.decode() if self._security is not None else ""
        self._discovery.advertise(Advert(self.name, "node", self.endpoint or "",
                                         self._topics.pub_endpoint or "", mailboxes, key))

    def _advertise_soon(self) -> None:
        """(I/O thread) re-advertise without blocking this thread."""
        threading.Thread(target=self._advertise, daemon=True).start()

    def _on_peers(self, peers: dict) -> None:
        """(discovery thread) peers changed: teach the path table and topics.

        With keys, an advert counts only if its key is trusted (pinned: in
        trusted_keys), and names a direct consumer only of mailboxes that
        key may consume (when the node has a permissions file): discovery
        never makes this node trust a key on its own."""
        nodes = [a for a in peers.values() if a.role == "node" and a.name != self.name]
        by_mailbox: dict[str, dict[str, bytes | None]] = {}
        pubs: dict[str, bytes | None] = {}
        for a in nodes:
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

        def job() -> None:
            if self._peers is not None:
                now = time.time()
                for mailbox in set(by_mailbox) | set(self._peers.paths.discovered_mailboxes()):
                    self._peers.paths.discovered(mailbox, by_mailbox.get(mailbox, {}), now)
            self._topics.learned(pubs)

        try:
            self._submit(job)
        except NodeClosed:
            pass

    def close(self) -> None:
        """Flush acks, say BYE, stop the I/O thread; pending calls get NodeClosed."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._wake()
        self._thread.join(10)
        if self._discovery is not None:
            self._discovery.close()
        if self._security is not None:
            self._security.close()  # after the I/O thread closed the sockets it guards
        for subscription in self._subscriptions.values():
            subscription._stop()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing for API threads ---------------------------------------------------

    def _request(self, cmd: Cmd, *fields: Any, timeout: float | None) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> None:
            self._dispatch.requests[self._core.request(cmd, *fields)] = future

        self._submit(job)
        return self._wait(future, timeout)

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._check_open()
            self._jobs.append(job)
        self._wake()

    def _settle(self, message: Message, how: str, requeue: bool) -> None:
        with self._lock:
            if self._closed.is_set():
                return  # unsettled messages come again after a restart
            # Same queue as other jobs: an ack must reach the relay before a
            # later CANCEL or BYE, or the relay requeues the message.
            self._jobs.append(lambda: self._settle_now(message, how, requeue))
        self._wake()

    def _cancel_consumer(self, cid: int, mailbox: str) -> None:
        """(I/O thread) stop a consumer on both paths."""
        self._core.cancel(cid)
        self._dispatch.sinks.pop(cid, None)
        if self._peers is not None and self._peers.consumers.get(mailbox) == cid:
            del self._peers.consumers[mailbox]  # direct senders now get 404 and use the relay
            if self._discovery is not None:
                self._advertise_soon()

    def _settle_now(self, message: Message, how: str, requeue: bool) -> None:
        """(I/O thread) settle with the path that brought the message."""
        if message.origin is None:
            self._core.settle(message, how, requeue)
            if self._peers is not None and (how == "ack" or not requeue):
                self._peers.inbox.settled_elsewhere((message.mailbox, message.id))
            return
        again = self._peers.settle(message, how, requeue)
        self._core.settled_elsewhere((message.mailbox, message.id), not again)
        sink = self._dispatch.sinks.get(self._peers.consumers.get(message.mailbox, -1))
        if again and sink is not None:
            sink(again)

    def _wait(self, future: concurrent.futures.Future, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RelayUnavailable(
                f"no answer from relay {self.relay} within {timeout}s (the node keeps trying "
                "until it is closed)"
            ) from None

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or the I/O thread has ended

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise NodeClosed(f"node {self.name} is closed")

    # --- the I/O thread ------------------------------------------------------------------

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = relay_socket(self._context, self.relay, self._curve)
        self._core.connection_made(time.time())
        return sock, sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def _run(self) -> None:
        try:
            if self._peers is not None:
                self._peers.start()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        sock, monitor = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        peer_socks: list = []
        topic_socks: dict = {}
        try:
            while not self._closed.is_set():
                if self._topics.changed:
                    for t in topic_socks:
                        poller.unregister(t)
                    topic_socks = self._topics.sockets()
                    for t in topic_socks:
                        poller.register(t, zmq.POLLIN)
                if self._peers is not None and self._peers.changed:
                    for p in peer_socks:
                        poller.unregister(p)
                    peer_socks = self._peers.sockets()
                    for p in peer_socks:
                        poller.register(p, zmq.POLLIN)
                now = time.time()
                deadline = self._core.next_deadline()
                if self._peers is not None:
                    deadline = min(deadline, self._peers.next_deadline())
                wait = max(0.0, min(1.0, deadline - now))
                events = dict(poller.poll(int(wait * 1000) + 1))
                if self._wake_r in events:
                    # Drain, then re-arm: re-arming first could swallow the
                    # byte of a wake that sets the flag in between, leaving
                    # the flag up with an empty pipe (a lost wake-up).
                    os.read(self._wake_r, 4096)
                    self._woken = False
                lost = self._run_jobs()
                now = time.time()
                if sock in events:
                    lost = self._read(sock, now) or lost
                if monitor in events:
                    monitor.recv_multipart()
                    lost = RelayLost("connection to the relay dropped")
                if self._peers is not None:
                    self._peer_io(peer_socks, events, now)
                for t, sid in topic_socks.items():
                    if t in events and sid in self._subscriptions:
                        self._subscriptions[sid]._feed(self._topics.read(t))
                lost = self._apply(self._core.tick(now)) or lost
                if lost is not None:
                    log.info("node %s reconnecting: %s", self.name, lost.reason)
                    poller.unregister(sock)
                    poller.unregister(monitor)
                    close_relay_socket(sock, monitor)
                    sock, monitor = self._connect()
                    poller.register(sock, zmq.POLLIN)
                    poller.register(monitor, zmq.POLLIN)
                self._move_sends()  # a WELCOME may have opened the way
                self._write(sock)
                if self._peers is not None:
                    self._peers.flush(time.time())
            # closing: last acks and BYE go out with a short linger
            self._run_jobs()
            self._core.close()
            sock.setsockopt(zmq.LINGER, 500)
            self._write(sock)
            if self._peers is not None:
                self._peers.close()
            self._topics.close()
        except Exception:
            log.exception("node %s I/O thread failed", self.name)
            self._closed.set()
        finally:
            close_relay_socket(sock, monitor, linger=None)
            closed = NodeClosed(f"node {self.name} is closed")
            self._dispatch.fail_all(closed)
            with self._lock:
                pending = (self._outgoing, self._relay_queue, self._held)
                waiters = [w for q in pending for _, w in q]
                for q in pending:
                    q.clear()
            if self._peers is not None:
                waiters.extend(self._peers.abandon())
            for waiter in waiters:  # every pending send learns the node is gone
                if waiter is not None and not waiter.done():
                    waiter.set_exception(closed)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run_jobs(self):
        with self._lock:
            jobs, self._jobs = self._jobs, deque()
        for job in jobs:
            job()
        self._core.flush_acks()
        self._move_sends()
        return None

    def _move_sends(self) -> None:
        """Route queued sends (direct or relay), then put the relay's share
        into SEND commands once the relay's limit is known."""
        with self._lock:
            routing, self._outgoing = self._outgoing, deque()
        if self._held:  # held back earlier: they go first
            self._held.extend(routing)
            routing, self._held = self._held, deque()
        now = time.time()
        held_mailboxes: set[str] = set()
        for record, waiter in routing:
            mailbox = record[1]
            if self._peers is not None:
                if self._core.state == State.READY and self._peers.paths.wants_lookup(mailbox, now):
                    self._lookup(mailbox)
                if mailbox in held_mailboxes:
                    self._held.append((record, waiter))  # behind one held back: FIFO
                    continue
                path = self._peers.route(record, waiter, now)
                if path == HOLD:
                    held_mailboxes.add(mailbox)
                    self._held.append((record, waiter))
                    continue
                if path is not None:
                    continue
            self._to_relay(record, waiter)
        while self._core.state == State.READY and self._core.unconfirmed < MAX_IN_FLIGHT_BATCHES:
            dropped: list = []
            records, futures = take_batch(self._relay_queue, self._core.max_message_size, dropped)
            if self._peers is not None:
                for r in dropped:  # refused before sending: no confirm will count them down
                    self._peers.paths.relay_confirmed(r[1])
            if not records:
                if dropped:
                    continue
                break
            req = self._core.send(records)
            self._dispatch.sends[req] = [(f, r[0]) for f, r in zip(futures, records)]
            if self._peers is not None:
                self._relay_sends[req] = [r[1] for r in records]

    def _to_relay(self, record: list, waiter) -> None:
        """Queue a record for the relay.  The path table counts it from now
        on, not from when it goes out: a later record to the same mailbox
        must not go direct while this one still waits here (FIFO)."""
        self._relay_queue.append((record, waiter))
        if self._peers is not None:
            self._peers.paths.via_relay(record[1])

    def _lookup(self, mailbox: str) -> None:
        future: concurrent.futures.Future = concurrent.futures.Future()
        paths = self._peers.paths

        def learned(f: concurrent.futures.Future) -> None:  # runs in the I/O thread
            if f.exception() is None:
                paths.looked_up(mailbox, f.result(), time.time())
            else:
                paths.lookup_failed(mailbox, time.time())

        future.add_done_callback(learned)
        self._dispatch.requests[self._core.request(Cmd.LOOKUP, mailbox)] = future

    def _apply(self, events: list):
        """Dispatch events; relay confirms also tell the path table."""
        if self._relay_sends:
            for ev in events:
                if isinstance(ev, (Confirmed, Failed)):
                    for mailbox in self._relay_sends.pop(ev.req, ()):
                        self._peers.paths.relay_confirmed(mailbox)
        return self._dispatch.apply(events)

    def _peer_io(self, peer_socks: list, events: dict, now: float) -> None:
        """Read direct traffic; what must go to the relay joins its queue."""
        to_relay = []
        for p in peer_socks:
            if p in events and not p.closed:  # a failed link closed its socket meanwhile
                delivered, failed = self._peers.readable(p, now)
                self._dispatch.apply(delivered)
                to_relay.extend(failed)
        to_relay.extend(self._peers.tick(now))
        for record, waiter in to_relay:
            if waiter is None or waiter.done():
                # Nobody waits any more (a send_many that failed elsewhere, a
                # caller that gave up): the message is still delivered.
                waiter = concurrent.futures.Future()
            self._to_relay(record, waiter)

    def _read(self, sock: zmq.Socket, now: float):
        lost = None
        for frames in ready_frames(sock):
            try:
                events = self._core.receive(frames, now)
            except Exception as exc:
                log.warning("node %s: bad command from relay dropped: %s", self.name, exc)
                continue
            lost = self._apply(events) or lost
        return lost

    def _write(self, sock: zmq.Socket) -> None:
        out = self._core.drain()
        for frames in out:
            sock.send_multipart(frames)
        if out:
            self._core.sent(time.time())


class Subscription:
    """Topic events for one prefix; iterate, call get(), or give a callback."""

    def __init__(self, node: Node, sid: int, prefix: str, callback=None):
        self.node = node
        self.sid = sid
        self.prefix = prefix
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = None
        if callback is not None:
            self._thread = threading.Thread(target=self._run_callback, args=(callback,), daemon=True)
            self._thread.start()

    def _feed(self, events: list[TopicEvent]) -> None:
        for e in events:
            self._queue.put(e)

    def get(self, timeout: float | None = None) -> TopicEvent | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[TopicEvent]:
        while not self._stopped.is_set():
            e = self.get(timeout=0.2)
            if e is not None:
                yield e

    def _run_callback(self, callback) -> None:
        for event in self:
            try:
                callback(event)
            except Exception:
                log.exception("subscription %r: callback failed", self.prefix)

    def _stop(self) -> None:
        self._stopped.set()

    def cancel(self) -> None:
        self._stop()
        self.node._subscriptions.pop(self.sid, None)
        try:
            self.node._submit(lambda: self.node._topics.unsubscribe(self.sid))
        except NodeClosed:
            pass


class Consumer:
    """Messages of one mailbox for this node; iterate, or call get()."""

    def __init__(self, node: Node, mailbox: str):
        self.node = node
        self.mailbox = mailbox
        self.cid = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = False

    def _feed(self, messages: list[Message]) -> None:
        for m in messages:
            m._settle = self.node._settle
            self._queue.put(m)

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds (None: wait forever)."""
        if self._cancelled:
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[Message]:
        while not self._cancelled:
            m = self.get(timeout=0.2)
            if m is not None:
                yield m
            elif self.node._closed.is_set():
                return

    def cancel(self) -> None:
        """Stop consuming; messages not yet acked go back to the mailbox."""
        if self._cancelled:
            return
        self._cancelled = True
        cid = self.cid
        try:
            self.node._submit(lambda: self.node._cancel_consumer(cid, self.mailbox))
        except NodeClosed:
            pass
