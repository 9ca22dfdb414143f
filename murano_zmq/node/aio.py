"""AsyncNode: the asyncio runner of NodeCore, a full peer of Node.

Everything runs on the event loop, with no task of its own: the loop
watches each socket's ZMQ_FD (add_reader) and calls a turn that reads what
is queued (ZMQ_EVENTS), hands it to the core, ticks it and writes; one timer
stands for the core's next deadline.  API coroutines call the core and
write at once when nothing else is in flight (a lone send() costs no extra
loop iteration); a burst of sends in one iteration is coalesced into one
SEND by a call_soon.  A confirm read in a turn resolves the sender's future
there: the send resumes on the next iteration.  A lone send with nothing
else ready on the loop first looks for its confirm without going back to
it (spin), and returns without an iteration (at least one a millisecond).
The runner decides nothing; the core does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable, Iterable

import zmq
import zmq.asyncio

from ..discovery.zeroconf import Discovery, wait_for_relays
from ..protocol.constants import DEFAULT_PREFETCH
from ..protocol.errors import NodeClosed, RelayUnavailable
from ..protocol.frames import Cmd
from ..protocol.message import Message, pack_body
from ..protocol.topics import TopicEvent
from .base import NodeBase
from .common import FORGOTTEN_ON_TIMEOUT, SendGroup, build_record, build_records, declare_options
from .handles import AsyncConsumer, AsyncSubscription
from .sleeps import spin_paid, spin_poll

log = logging.getLogger("murano_zmq.node")

__all__ = ["AsyncConsumer", "AsyncNode", "AsyncSubscription"]


class AsyncNode(NodeBase):
    """The asyncio twin of Node; use `async with AsyncNode(...) as node`.
    Takes Node's keyword arguments (direct, bind, discovery, curve_key, ...);
    `relay="auto"` is resolved by `await node.start()` (or `async with`)."""

    def __init__(self, name: str | None = None, relay: str | None = None, *,
                 context: zmq.Context | None = None, **options):
        if isinstance(context, zmq.asyncio.Context):
            context = zmq.Context.shadow(context.underlying)  # sockets here are plain ones
        self._setup(name, relay, context=context, **options)
        self._outgoing: deque = deque()  # (record, future) not yet routed
        self._subscriptions: dict[int, AsyncSubscription] = {}
        self._running = False
        self._failed_turns = 0  # in a row: a turn that keeps failing closes the node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._turn_scheduled = False
        self._in_turn = False  # a turn runs (the core's sinks and callbacks are called in it)
        self._loop_seen = 0.0  # when a lone send last let the loop run (time.perf_counter())
        self._watched: list[int] = []  # FDs the loop watches for us
        self._watched_version = -1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")  # the core deadline (time.time()) the timer is set for
        self._closed = False
        self._discovery_started: asyncio.Task | None = None

    async def start(self) -> "AsyncNode":
        """Find the relay (relay="auto"), bind, connect, start discovery."""
        if self._auto is not None and not self._running and not self._closed:
            await self._find_relays()
        self._start()
        if self._discovery_started is not None:
            await self._discovery_started
        return self

    async def _find_relays(self) -> None:
        """relay="auto": browse until a relay is advertised (bounded), and
        keep browsing: relays advertised later join the list."""
        loop = asyncio.get_running_loop()
        if self._discovery is None:
            self._discovery = await loop.run_in_executor(None, self._new_discovery, loop)
        try:
            await loop.run_in_executor(None, lambda: wait_for_relays(
                self._discovery, self._auto, timeout=min(self.timeout, 10.0), usable=self._usable_relay))
        except BaseException:
            discovery, self._discovery = self._discovery, None
            await loop.run_in_executor(None, discovery.close)
            raise
        self._learn_relays(self._discovery.peers)

    def _new_discovery(self, loop: asyncio.AbstractEventLoop) -> Discovery:
        def on_change(peers: dict) -> None:  # (discovery thread)
            if not self._closed:
                loop.call_soon_threadsafe(self._peers_changed, peers)

        return Discovery(self._interfaces, on_change)

    def _peers_changed(self, peers: dict) -> None:
        """(the loop) before start() only the relays are taken; after, everything."""
        if not self._running:
            self._learn_relays(peers)
        else:
            self._learned(peers, time.time())

    async def _start_discovery(self) -> None:
        """Browse and advertise (discovery runs its own thread)."""
        if self._discovery is None:
            self._discovery = await self._loop.run_in_executor(None, self._new_discovery, self._loop)
        else:  # made by relay="auto" before the node ran: what it saw of the peers
            self._learn_peers(self._discovery.peers, time.time())
        await self._advertise_async()

    async def __aenter__(self) -> "AsyncNode":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- public API ----------------------------------------------------------------

    async def declare(self, mailbox: str, *, ttl: float | None = None, message_ttl: float | None = None,
                      max_length: int | None = None, max_bytes: int | None = None,
                      overflow: str = "reject", dead_letter: str | None = None,
                      passive: bool = False, timeout: float | None = None,
                      delivery_limit: int | None = None) -> dict:
        options = declare_options(ttl, message_ttl, max_length, max_bytes, overflow, dead_letter, passive,
                                  delivery_limit)
        return await self._request(Cmd.DECLARE, mailbox, options, timeout=timeout)

    async def delete(self, mailbox: str, timeout: float | None = None) -> None:
        await self._request(Cmd.DELETE, mailbox, timeout=timeout)

    async def status(self, timeout: float | None = None) -> dict:
        return await self._request(Cmd.STATUS, timeout=timeout)

    async def send(self, mailbox: str, body: Any, headers: dict | None = None, ttl: float | None = None,
                   timeout: float | None = None, wait: bool = True, msg_id: bytes | None = None) -> bytes:
        """Send and wait until the message is safe (see Node.send); returns the id."""
        self._start()
        timeout = self._timeout(timeout)
        record = build_record(mailbox, body, headers, ttl, time.time(), self._core.max_size, msg_id)
        if not wait:
            self._check_deliverable_now(mailbox)
        future = self._loop.create_future()
        self._check_room([record])
        if self._flush_scheduled or self._core.session.unconfirmed:
            self._outgoing.append((record, future))
            self._schedule_flush()  # others in flight: coalesce with this iteration's sends
            return await self._expiring(future, timeout)
        # alone: write now, no extra loop iteration
        self._io.flush(time.time(), [*self._take_outgoing(), (record, future)] if self._outgoing
                       else [(record, future)])
        self._after_io()
        written = time.perf_counter()
        # Spun for (_spin_for) only with nothing else ready on the loop (its
        # queue seen: asyncio's own loops) and not inside a turn.
        idle = bool(self.spin) and not self._in_turn and not getattr(self._loop, "_ready", True)
        if idle and self._spin_pays:
            self._spin_for(future, written + min(self.spin, timeout))
        if not future.done():
            result = await self._expiring(future, timeout)
            self._loop_seen = time.perf_counter()
        else:
            # Answered in the spin: no loop iteration, but for one when none
            # ran for a while, so that the loop's timers, other FDs and
            # cancellations are not held up by sends that follow each other.
            if written - self._loop_seen > _LOOP_AT_LEAST_EVERY:
                await asyncio.sleep(0)
                self._loop_seen = time.perf_counter()
            result = future.result()
        if idle:
            self._spin_pays = spin_paid(time.perf_counter() - written, self.spin)
        return result

    def send_nowait(self, mailbox: str, body: Any, headers: dict | None = None, ttl: float | None = None,
                    wait: bool = True, msg_id: bytes | None = None) -> asyncio.Future:
        """Queue a send; the future resolves to the id once safe."""
        self._start()
        record = build_record(mailbox, body, headers, ttl, time.time(), self._core.max_size, msg_id)
        if not wait:
            self._check_deliverable_now(mailbox)
        future = self._loop.create_future()
        self._queue_records([record], [future])
        return future

    async def send_many(self, messages: Iterable[tuple], timeout: float | None = None) -> list[bytes]:
        """Pipelined send of (mailbox, body[, headers[, ttl]]) tuples; returns
        the ids once all are stored (or raises the first error)."""
        self._start()
        timeout = self._timeout(timeout)
        records = build_records(messages, time.time(), self._core.max_size)
        future = self._loop.create_future()
        self._queue_records(records, [SendGroup(future, [r[0] for r in records])] * len(records))
        return await self._expiring(future, timeout)

    def _queue_records(self, records: list, waiters: list) -> None:
        self._check_room(records)
        self._outgoing.extend(zip(records, waiters))
        self._schedule_flush()

    async def consume(self, mailbox: str, prefetch: int = DEFAULT_PREFETCH,
                      timeout: float | None = None, direct: bool = True,
                      prefetch_bytes: int | None = None) -> "AsyncConsumer":
        """A consumer of `mailbox` (see Node.consume): `async for msg in consumer`."""
        self._check_consume(mailbox, prefetch, prefetch_bytes)
        self._start()
        timeout = self._timeout(timeout)
        consumer = AsyncConsumer(self, mailbox)
        future = self._loop.create_future()
        consumer.cid = self._core.consume(mailbox, prefetch, direct, consumer._feed, future, prefetch_bytes)
        self._schedule_flush()
        try:
            await self._wait(future, timeout)
        except BaseException:
            consumer.cancel()  # else a consumer nobody reads would take messages later
            raise
        if direct and self.endpoint is not None:
            await self._advertise_async()
        return consumer

    def publish(self, topic: str, body: Any) -> None:
        """Publish an event (see Node.publish); call it from the loop."""
        packed = pack_body(body)
        self._check_publish(topic, packed)
        self._start()
        if self._topics.publish(topic, packed, time.time()) and self._discovery is not None:
            self._loop.create_task(self._advertise_async())  # the new PUB

    def subscribe(self, prefix: str = "", callback: Callable[[TopicEvent], None] | None = None,
                  publishers: Iterable[str] = ()) -> "AsyncSubscription":
        """Events whose topic starts with `prefix` (see Node.subscribe):
        `async for event in subscription`, get(), or `callback` (run on the loop)."""
        given = self._publisher_keys(prefix, publishers)
        self._start()
        sid = self._new_subscription_id()
        subscription = self._subscriptions[sid] = AsyncSubscription(self, sid, prefix, callback)
        self._topics.subscribe(sid, prefix, given)
        self._after_io()  # a new socket to watch
        return subscription

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._check_process()
        except RuntimeError:  # a forked child's copy: the sockets and adverts are the parent's
            return
        if self._running:
            self._unwatch()
            try:
                self._io.close()  # last acks and BYEs
            except Exception:
                log.exception("node %s: closing its sockets failed", self.name)
                self._io.abort()
        error = NodeClosed(f"node {self.name} is closed")
        self._core.abandon(error)
        for _, future in self._outgoing:
            if not future.done():
                future.set_exception(error)
        self._outgoing.clear()
        if self._discovery_started is not None:
            try:
                await self._discovery_started
            except Exception:
                log.exception("node %s: discovery did not start", self.name)
        if self._discovery is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._discovery.close)
        if self._security is not None:
            self._security.close()
        self._close_wake()

    # --- plumbing ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise NodeClosed(f"node {self.name} is closed")
        self._check_process()
        if self._running:
            if asyncio.get_running_loop() is not self._loop:
                self._wrong_place()
            return
        if not self._io.relays:
            raise ValueError(f"relay={self.relay!r}: use `async with AsyncNode(...)` or `await node.start()` first")
        self._loop = asyncio.get_running_loop()
        try:
            if self._security is not None:
                self._security.start(self._context)  # this node's ZAP domain; key files watched
                self._security.on_trust_change = lambda: self._loop.call_soon_threadsafe(
                    self._learned, self.peers, time.time())
            self._io.bind_router()
            self._io.connect(time.time())
        except BaseException:
            self._failed_start()
            raise
        self._running = True
        self._after_io()
        if self._discover:  # also without start(): the first call starts it
            self._discovery_started = self._loop.create_task(self._start_discovery())

    def _failed_start(self) -> None:
        """(a bind or connect failed) The node is closed, its wake pipe,
        key watch and discovery with it: `async with` never calls close()
        when its start fails (each such start lost descriptors)."""
        self._closed = True
        self._io.abort()
        if self._discovery is not None:
            self._discovery.close()
            self._discovery = None
        if self._security is not None:
            self._security.close()
        self._close_wake()

    def _wrong_place(self) -> None:
        """(a call from another loop) the send would go out, and its caller
        would hear of a failure: say why, before anything goes."""
        raise RuntimeError(f"node {self.name} runs on the event loop it started on: call it from there "
                           "(a loop of its own per AsyncNode)")

    async def _advertise_async(self) -> None:
        self._core.advert_due = False
        if self._discovery is not None:
            await self._loop.run_in_executor(None, self._advertise)

    async def _request(self, cmd: Cmd, *fields: Any, timeout: float | None) -> Any:
        self._start()
        timeout = self._timeout(timeout)
        future = self._loop.create_future()
        req = self._core.request(cmd, *fields, waiter=future)
        self._schedule_flush()
        try:
            return await self._wait(future, timeout)
        except (RelayUnavailable, asyncio.CancelledError):  # (timed out, or the caller's own wait_for)
            if cmd in FORGOTTEN_ON_TIMEOUT and not self._closed:
                self._core.forget(req)
            raise

    async def _wait(self, awaitable, timeout: float) -> Any:
        """(timeout: the call's, from _timeout())"""
        try:
            return await asyncio.wait_for(asyncio.shield(awaitable), timeout)
        except asyncio.TimeoutError:
            raise self._timed_out(timeout) from None

    async def _expiring(self, future: asyncio.Future, timeout: float) -> Any:
        """Await a future of our own (the core's waiter) with one timer, not
        wait_for + shield: on time-out the future fails with RelayUnavailable
        (the core skips a done waiter; the message may still be stored).
        timeout: the call's, from _timeout()."""
        timer = self._loop.call_later(timeout, _expire, future, self._timed_out, timeout, True)
        try:
            return await future
        finally:
            timer.cancel()

    def _spin_for(self, future: asyncio.Future, until: float) -> None:
        """(a lone send, just written, nothing else ready on the loop) Look
        for its answer on the relay socket without going back to the loop,
        until time.perf_counter() reaches `until` (sleeps.spin_poll), and
        read it here.  Other tasks are not held up: none is ready, and
        concurrent sends coalesce as before."""
        io = self._io
        sock = io.relay_sock
        fd = None if sock is None else io.relay_fd()
        if fd is not None and spin_poll([(sock, zmq.POLLIN)], until):
            self._turn(fd)

    def _settle(self, message: Message, how: str, requeue: bool) -> None:
        if self._closed:
            return  # unsettled messages come again after a restart
        core = self._core
        core.settle(message, how, requeue)
        if core.session.acks_due and not self._in_turn:
            try:
                self._write()  # half a window acked: out now, the relay refills while the rest is worked
                return
            except Exception:  # (not the application's to handle: the flush below tries again)
                log.exception("node %s: writing acks failed", self.name)
        self._schedule_flush()

    def _cancel(self, cid: int, mailbox: str) -> None:
        if self._closed:
            return
        self._core.cancel(cid, mailbox)
        if self._core.advert_due and self._discovery is not None:
            self._loop.create_task(self._advertise_async())
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Route queued sends and write what the core has."""
        self._flush_scheduled = False
        if not self._closed:
            self._write()

    def _write(self) -> None:
        self._io.flush(time.time(), self._take_outgoing())
        self._after_io()

    def _take_outgoing(self) -> deque:
        routing, self._outgoing = self._outgoing, deque()
        return routing

    def _learned(self, peers: dict, now: float) -> None:
        if not self._closed:
            self._learn_peers(peers, now)
            self._after_io()

    # --- the loop's side: FD callbacks and the deadline timer ---------------------

    def _turn(self, fd: int | None = None) -> None:
        """A socket's FD fired (`fd`: only that socket is asked for input;
        each FD that fires has its own call, and a socket no FD reported
        has none queued unless touched since, which _after_io asks), input
        was left queued, or a deadline came: read what is queued, tick,
        route, write."""
        self._turn_scheduled = False
        if self._closed:
            return
        self._in_turn = True  # (an ack from a callback run by this turn waits for its end)
        read_only = False
        try:
            io = self._io
            if fd is not None and not self._outgoing and io.socket_of(fd) is io.relay_sock:
                # The usual wake-up, a CONFIRM or DELIVER: read it (without
                # asking ZMQ_EVENTS first: a read that finds nothing is the
                # rare case), and a full turn only if that left something to
                # do or the core's next deadline may have come: the timer's
                # time less the 1 ms by which _after_io lets it lag behind
                # an earlier deadline (no later than the deadline, then).
                read_only = io.relay_turn(time.time(), self._timer_at - _TIMER_SLACK)
            else:
                io.turn(io.readable(None if fd is None else (fd,)), time.time(), self._take_outgoing())
            self._failed_turns = 0
        except Exception:
            log.exception("node %s: a turn failed", self.name)
            self._failed_turns += 1
            if self._failed_turns >= _FAILED_TURNS_LIMIT:  # it will not get better: no busy loop
                log.error("node %s: %d turns in a row failed; closing it", self.name, self._failed_turns)
                self._closing_task = self._loop.create_task(self.close())
                return
        finally:
            self._in_turn = False
        self._after_io(read_only)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._turn()

    def _after_io(self, read_only: bool = False) -> None:
        """After any read or write: watch the sockets there are now; a turn
        soon when input is queued (a write or read may have taken its FD
        edge: the FD would not fire); the timer at the core's next deadline.
        `read_only`: the turn only read the relay socket, dry, and wrote
        nothing (relay_turn's word): deadlines only moved later, and the
        timer set stands."""
        if self._closed or not self._running:
            return
        io = self._io
        changed = io.version != self._watched_version
        if changed:
            self._unwatch()
            self._watched = list(io.fds())
            for fd in self._watched:
                self._loop.add_reader(fd, self._turn, fd)
            self._watched_version = io.version
        if not self._turn_scheduled and io.input_waiting(touched_only=not changed):
            self._turn_scheduled = True
            self._loop.call_soon(self._turn)
        if read_only and self._timer is not None:
            return
        deadline = min(self._core.next_deadline(), time.time() + 1.0)
        if deadline < self._timer_at - _TIMER_SLACK or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            # at least 1 ms: a deadline the tick does not move must not spin the loop
            self._timer = self._loop.call_later(max(0.001, deadline - time.time()), self._on_timer)

    def _unwatch(self) -> None:
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched = []
        self._watched_version = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, float("inf")


_FAILED_TURNS_LIMIT = 20
# Sends answered in their spin return without a loop iteration, but for one
# when the loop has not run for this long (seconds).
_LOOP_AT_LEAST_EVERY = 0.001
# The timer is moved earlier only for a deadline this much before it (no
# re-arming for every small move): it may run this late after the deadline.
_TIMER_SLACK = 0.001


def _expire(future: asyncio.Future, timed_out, timeout: float, send: bool) -> None:
    if not future.done():  # (the error is made only now: most sends never need it)
        future.set_exception(timed_out(timeout, send))
