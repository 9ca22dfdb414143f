"""Node: the threaded runner of NodeCore.

The core and every socket belong to one thread at a time: whoever holds
`_owner` (a lock: exclusive, and a memory barrier between owners).  The
I/O thread sleeps one of two ways (node/sleeps.py).  While no caller has
asked for the sockets lately it keeps `_owner` and waits in zmq_poll on the
sockets and a wake pipe: the cheapest wake-up.  Once a blocking send has
asked, it releases `_owner` for its sleeps and waits on the sockets' ZMQ_FDs
and the pipe, touching no socket, until callers stop asking (CALLERS_RECENT).

A blocking send (send, send_many) from a thread that finds the I/O thread
asleep on the FDs takes the sockets itself (node/owned.py): it writes its SEND, polls them until its
CONFIRM comes, handing everything it reads (deliveries, heartbeats, other
confirms) to the core as the I/O thread would, then hands back.  No wake-up
of another thread, no Future: a send costs one socket round trip.  It hands
back early when anyone writes the wake pipe (another caller's send, an ack,
close()), and then waits like any other call.

Other calls (and a send that finds the sockets taken) put a job on a queue
(sends on their own queue, bounded by max_pending), wake the I/O thread
through the pipe, and wait on a Future.  The runners only poll, read,
write and wake; the core decides.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

import zmq

from ..discovery.zeroconf import Discovery, wait_for_relays
from ..protocol.constants import DEFAULT_PREFETCH
from ..protocol.errors import NodeClosed, RelayUnavailable
from ..protocol.frames import Cmd
from ..protocol.message import Message, pack_body
from ..protocol.topics import TopicEvent
from .base import NodeBase
from .common import FORGOTTEN_ON_TIMEOUT, SendGroup, build_record, build_records, declare_options
from .handles import Consumer, Subscription
from .iothread import IOThread
from .owned import OwnedSends
from .sleeps import EpollSleep, SendSlot

log = logging.getLogger("murano_zmq.node")

__all__ = ["Consumer", "Node", "Subscription"]


class Node(IOThread, OwnedSends, NodeBase):
    """A process's handle on the fabric, for threaded code.

    >>> with Node("conductor-1", relay="tcp://127.0.0.1:5570") as node:
    ...     node.send("api.results", {"task": 7, "ok": True})
    ...     for msg in node.consume("conductor"):
    ...         handle(msg.body); msg.ack()

    `poller`: a callable making the Poller the I/O thread waits with (default
    `Node.default_poller`, zmq.Poller; murano_zmq.oslo.green sets one that
    waits the eventlet way).  Other keyword arguments: see docs/architecture.md.
    """

    default_poller: Callable[[], Any] = zmq.Poller

    def __init__(self, name: str | None = None, relay: str | None = None, *, poller=None, **options):
        self._setup(name, relay, **options)
        self._poller_factory = poller or type(self).default_poller
        self._jobs: deque[tuple[Callable[[], None], Any]] = deque()  # (job, its caller's waiter or None)
        self._outgoing: deque = deque()  # (record, future) not yet routed
        self._settles: list = []  # (message, how, requeue) the application settled; one job takes them
        self._subscriptions: dict[int, Subscription] = {}
        self._lock = threading.Lock()  # guards the queues above
        # Whoever holds _owner owns the core and the sockets (see the module doc).
        self._owner = threading.Lock()
        self._io_turn = False  # the I/O thread holds _owner for a turn (short): worth waiting for
        self._io_ident: int | None = None
        self._io_version = -1  # the socket set the I/O thread's sleep on FDs watches
        self._keep_version = -1  # the socket set its zmq_poll watches
        # A caller may take the sockets only where waiting in zmq_poll is
        # right: not under eventlet (murano_zmq.oslo.green's poller), where
        # it would block every green thread.
        self._inline = self._poller_factory is zmq.Poller
        self._caller_poll: tuple | None = None  # (version, zmq.Poller) of the owning caller
        self._sleep: EpollSleep | None = None  # the I/O thread's sleep on FDs (set by it)
        self._owner_wanted = float("-inf")  # when a caller last asked for the sockets
        self._keeping = False  # the I/O thread sleeps in zmq_poll, holding _owner
        self._closed = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        if self._auto is not None:
            self._find_relays()
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
            if self._discovery is not None:
                self._discovery.close()
            raise self._start_error
        if self._discover:
            if self._discovery is None:
                self._discovery = Discovery(self._interfaces, on_change=self._on_peers)
            self._advertise()

    def _find_relays(self) -> None:
        """relay="auto": browse until a relay is advertised (bounded), and
        keep browsing: relays advertised later join the list (_on_peers)."""
        self._discovery = Discovery(self._interfaces, on_change=self._on_peers)
        try:
            wait_for_relays(self._discovery, self._auto, timeout=min(self.timeout, 10.0),
                            usable=self._usable_relay)
        except BaseException:
            self._discovery.close()
            self._discovery = None
            self._close_wake()  # no I/O thread will
            raise
        self._learn_relays(self._discovery.peers)  # the I/O thread does not run yet

    # --- public API --------------------------------------------------------------

    def declare(self, mailbox: str, *, ttl: float | None = None, message_ttl: float | None = None,
                max_length: int | None = None, max_bytes: int | None = None, overflow: str = "reject",
                dead_letter: str | None = None, passive: bool = False,
                timeout: float | None = None, delivery_limit: int | None = None) -> dict:
        """Create a mailbox with options (or check it exists, passive=True).

        delivery_limit: a message is handed out at most this many times; one
        that comes back after that (nack with requeue, or its consumer gone)
        goes to dead_letter, or away.  Returns the mailbox's status.  Raises
        PreconditionFailed when it exists with other options,
        MailboxNotFound for a passive declare of a missing one.
        """
        options = declare_options(ttl, message_ttl, max_length, max_bytes, overflow, dead_letter, passive,
                                  delivery_limit)
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
        record = build_record(mailbox, body, headers, ttl, time.time(), self._core.max_size, msg_id)
        if not wait:
            self._check_deliverable_now(mailbox)
        slot = SendSlot()
        return self._send_and_wait([record], [slot], slot, timeout)

    def send_async(self, mailbox: str, body: Any, headers: dict | None = None,
                   ttl: float | None = None, wait: bool = True,
                   msg_id: bytes | None = None) -> concurrent.futures.Future:
        """Send without blocking: the future resolves to the id once safe."""
        record = build_record(mailbox, body, headers, ttl, time.time(), self._core.max_size, msg_id)
        if not wait:
            self._check_deliverable_now(mailbox)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue_records([record], [future])
        return future

    def send_many(self, messages: Iterable[tuple], timeout: float | None = None) -> list[bytes]:
        """Pipelined send of (mailbox, body[, headers[, ttl]]) tuples; waits
        until all are stored and returns their ids in order (or raises the
        first error; the others may have been stored)."""
        records = build_records(messages, time.time(), self._core.max_size)
        slot = SendSlot()
        group = SendGroup(slot, [r[0] for r in records])
        return self._send_and_wait(records, [group] * len(records), slot, timeout)

    def _send_and_wait(self, records: list, waiters: list, slot: SendSlot, timeout: float | None,
                       job: Callable[[], None] | None = None) -> Any:
        """Send the records (or run `job`, a request settling `slot`) on this
        thread when the sockets are free, else through the I/O thread; wait
        for `slot` either way."""
        self._check_open()
        timeout = self.timeout if timeout is None else self._timeout(timeout)
        deadline = time.monotonic() + timeout
        if self._take_sockets():
            self._send_owned(records, waiters, slot, deadline, job)
        elif job is not None:
            self._submit(job, slot)
        else:
            self._queue_records(records, waiters)
        if not slot.wait(deadline - time.monotonic()):
            raise self._timed_out(timeout, send=job is None)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _queue_records(self, records: list, waiters: list) -> None:
        self._check_process()  # (before the lock: a fork may have copied it held)
        with self._lock:
            self._check_open()
            self._check_room(records)
            self._outgoing.extend(zip(records, waiters))
        self._wake()

    def consume(self, mailbox: str, prefetch: int = DEFAULT_PREFETCH,
                timeout: float | None = None, direct: bool = True,
                prefetch_bytes: int | None = None) -> "Consumer":
        """A consumer of `mailbox`: iterate it for Messages; ack each one.

        direct=False: take this mailbox's messages through the relay only
        (for long work where the ack means "finished": a direct sender would
        wait that long for its CONFIRM).

        prefetch_bytes: a byte credit on top of `prefetch` (AMQP's
        prefetch-size): the relay hands this consumer no more unacked body
        bytes than that (one message at least, whatever its size).
        """
        self._check_consume(mailbox, prefetch, prefetch_bytes)
        consumer = Consumer(self, mailbox)
        slot = SendSlot()

        def job() -> None:
            consumer.cid = self._core.consume(mailbox, prefetch, direct, consumer._feed, slot, prefetch_bytes)

        try:
            self._send_and_wait([], [], slot, timeout, job)
        except BaseException:
            consumer.cancel()  # else a consumer nobody reads would take messages later
            raise
        if direct and self.endpoint is not None:
            self._advertise()
        return consumer

    # --- topics (PUB/SUB: cheap, lossy) -------------------------------------------

    def publish(self, topic: str, body: Any) -> None:
        """Publish an event to every subscriber of a prefix of `topic`.  No
        ack and no store: a subscriber that is slow or not yet connected loses it."""
        packed = pack_body(body)
        self._check_publish(topic, packed)

        def job() -> None:
            if self._topics.publish(topic, packed, time.time()) and self._discovery is not None:
                threading.Thread(target=self._advertise, daemon=True).start()  # not in this thread

        self._submit(job)

    def subscribe(self, prefix: str = "", callback: Callable[[TopicEvent], None] | None = None,
                  publishers: Iterable[str] = ()) -> "Subscription":
        """Events whose topic starts with `prefix`, from every publisher this
        node knows (discovered, the forwarder, `publishers`).  Iterate the
        subscription, call get(), or pass `callback` (run in a thread of its own).

        With CURVE keys each of `publishers` is (endpoint, public key): the
        publisher's key comes from configuration, as the relay's does."""
        given = self._publisher_keys(prefix, publishers)
        with self._lock:
            sid = self._new_subscription_id()
        subscription = Subscription(self, sid, prefix, callback)
        self._subscriptions[sid] = subscription
        self._submit(lambda: self._topics.subscribe(sid, prefix, given))
        return subscription

    def _on_peers(self, peers: dict) -> None:
        """(discovery thread) peers changed: the I/O thread tells the core."""
        try:
            self._submit(lambda: self._learn_peers(peers, time.time()))
        except NodeClosed:
            pass

    def close(self) -> None:
        """Flush acks, say BYE, stop the I/O thread; pending calls get NodeClosed."""
        try:
            self._check_process()
        except RuntimeError:  # a forked child's copy: the sockets, threads and adverts are the parent's
            self._closed.set()
            return
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
        slot = SendSlot()
        made: list[int] = []
        try:
            return self._send_and_wait([], [], slot, timeout,
                                       lambda: made.append(self._core.request(cmd, *fields, waiter=slot)))
        except RelayUnavailable:
            if cmd in FORGOTTEN_ON_TIMEOUT and made and not self._closed.is_set():
                self._submit(lambda: self._core.forget(made[0]))
            raise

    def _submit(self, job: Callable[[], None], waiter: Any = None) -> None:
        """Queue `job` for the I/O thread; `waiter` (the caller's future)
        gets the job's exception if it raises one."""
        self._check_process()  # (before the lock: a fork may have copied it held)
        with self._lock:
            self._check_open()
            self._jobs.append((job, waiter))
        self._wake()

    def _settle(self, message: Message, how: str, requeue: bool) -> None:
        self._check_process()
        with self._lock:
            if self._closed.is_set():
                return  # unsettled messages come again after a restart
            # Through the jobs' queue: an ack must reach the relay before a
            # later CANCEL or BYE, or the relay requeues the message.  One
            # job takes every settle made until it runs (a consumer's burst).
            first = not self._settles
            if first:
                self._jobs.append((self._settle_queued, None))
            self._settles.append((message, how, requeue))
        if first:  # (the later ones find that job queued and the I/O thread woken for it)
            self._wake()

    def _settle_queued(self) -> None:
        """(a job) the settles made since the last one, in order."""
        with self._lock:
            settles, self._settles = self._settles, []
        self._core.settle_many(settles)

    def _cancel(self, cid: int, mailbox: str) -> None:
        def job() -> None:
            self._core.cancel(cid, mailbox)
            if self._core.advert_due and self._discovery is not None:
                self._core.advert_due = False
                threading.Thread(target=self._advertise, daemon=True).start()

        self._submit(job)

    def _check_deliverable_now(self, mailbox: str) -> None:
        self._check_open()  # (a closed node has no relay either: NodeClosed says why)
        super()._check_deliverable_now(mailbox)

    def _check_open(self) -> None:
        self._check_process()
        if self._closed.is_set():
            raise NodeClosed(f"node {self.name} is closed")
