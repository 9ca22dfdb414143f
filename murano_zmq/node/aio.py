"""AsyncNode: the asyncio driver of ClientCore.

Everything runs on the event loop: API coroutines call the core and write
its frames; one reader task reads the socket, ticks the core's timers and
reconnects when the relay is lost.  Sends issued in one loop iteration are
coalesced into SEND commands.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator, Iterable

import zmq
import zmq.asyncio

from ..protocol.client import ClientCore, RelayLost, State
from ..protocol.constants import (
    DEFAULT_HEARTBEAT,
    DEFAULT_PREFETCH,
    DEFAULT_TIMEOUT,
    MAX_IN_FLIGHT_BATCHES,
)
from ..protocol.errors import NodeClosed, RelayUnavailable
from ..protocol.frames import Cmd
from ..protocol.message import Message, check_name
from ..security.curve import client_curve
from .common import (
    Dispatcher,
    SendGroup,
    build_record,
    build_records,
    close_relay_socket,
    declare_options,
    default_node_name,
    relay_socket,
    resolve_relay,
    take_batch,
)

log = logging.getLogger("murano_zmq.node")


class AsyncNode:
    """The asyncio twin of Node; use `async with AsyncNode(...) as node`."""

    def __init__(self, name: str | None = None, relay: str | None = None, *,
                 heartbeat: float = DEFAULT_HEARTBEAT, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.asyncio.Context | None = None, curve_key=None, relay_key=None):
        self.name = name or default_node_name()
        if relay == "auto":
            raise ValueError("AsyncNode takes a relay endpoint; relay='auto' (zeroconf) is for Node")
        self.relay = resolve_relay(relay)
        self.timeout = timeout
        self._context = context or zmq.asyncio.Context.instance()
        # CURVE (docs/security.md): curve_key is this node's key pair (a
        # KeyPair or a .key_secret path), relay_key the relay's public key
        # (z85 text, a KeyPair or a .key path); both or neither.
        self._curve = client_curve(curve_key, relay_key)
        self._core = ClientCore(self.name, uuid.uuid4().bytes, heartbeat)
        self._dispatch = Dispatcher()
        self._outgoing: deque = deque()
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._flush_scheduled = False
        self._closed = False
        self._max_size: int | None = None
        self._dispatch.welcomed = lambda ev: setattr(self, "_max_size", ev.max_message_size)

    async def __aenter__(self) -> "AsyncNode":
        self._start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- public API ----------------------------------------------------------------

    async def declare(self, mailbox: str, *, ttl: float | None = None, message_ttl: float | None = None,
                      max_length: int | None = None, max_bytes: int | None = None,
                      overflow: str = "reject", dead_letter: str | None = None,
                      passive: bool = False, timeout: float | None = None) -> dict:
        options = declare_options(ttl, message_ttl, max_length, max_bytes, overflow, dead_letter, passive)
        return await self._request(Cmd.DECLARE, mailbox, options, timeout=timeout)

    async def delete(self, mailbox: str, timeout: float | None = None) -> None:
        await self._request(Cmd.DELETE, mailbox, timeout=timeout)

    async def status(self, timeout: float | None = None) -> dict:
        return await self._request(Cmd.STATUS, timeout=timeout)

    async def send(self, mailbox: str, body: Any, headers: dict | None = None, ttl: float | None = None,
                   timeout: float | None = None) -> bytes:
        """Send and wait until the relay has stored it durably; returns the id."""
        return await self._wait(self.send_nowait(mailbox, body, headers, ttl), timeout)

    def send_nowait(self, mailbox: str, body: Any, headers: dict | None = None,
                    ttl: float | None = None) -> asyncio.Future:
        """Queue a send; the future resolves to the id once stored."""
        self._start()
        record = build_record(mailbox, body, headers, ttl, time.time(), self._max_size)
        future = asyncio.get_running_loop().create_future()
        self._outgoing.append((record, future))
        self._schedule_flush()
        return future

    async def send_many(self, messages: Iterable[tuple], timeout: float | None = None) -> list[bytes]:
        """Pipelined send of (mailbox, body[, headers[, ttl]]) tuples; returns
        the ids once all are stored (or raises the first error)."""
        self._start()
        records = build_records(messages, time.time(), self._max_size)
        future = asyncio.get_running_loop().create_future()
        group = SendGroup(future, [r[0] for r in records])
        self._outgoing.extend((r, group) for r in records)
        self._schedule_flush()
        return await self._wait(future, timeout)

    async def consume(self, mailbox: str, prefetch: int = DEFAULT_PREFETCH,
                      timeout: float | None = None) -> "AsyncConsumer":
        check_name(mailbox)
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a whole number >= 1, got {prefetch!r}")
        self._start()
        consumer = AsyncConsumer(self, mailbox)
        cid, req = self._core.consume(mailbox, prefetch)
        consumer.cid = cid
        self._dispatch.sinks[cid] = consumer._feed
        future = self._dispatch.requests[req] = asyncio.get_running_loop().create_future()
        self._flush()
        try:
            await self._wait(future, timeout)
        except BaseException:
            consumer.cancel()  # else a consumer nobody reads would take messages later
            raise
        return consumer

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        if self._sock is not None:
            self._core.close()  # after this only acks and BYE go out
            self._flush(force=True)
            close_relay_socket(self._sock, self._monitor, linger=500)
        error = NodeClosed(f"node {self.name} is closed")
        self._dispatch.fail_all(error)
        for _, future in self._outgoing:
            if not future.done():
                future.set_exception(error)
        self._outgoing.clear()

    # --- plumbing ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise NodeClosed(f"node {self.name} is closed")
        if self._reader is None:
            self._connect()
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _request(self, cmd: Cmd, *fields: Any, timeout: float | None) -> Any:
        self._start()
        req = self._core.request(cmd, *fields)
        future = self._dispatch.requests[req] = asyncio.get_running_loop().create_future()
        self._flush()
        return await self._wait(future, timeout)

    async def _wait(self, awaitable, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(awaitable), timeout)
        except asyncio.TimeoutError:
            raise RelayUnavailable(
                f"no answer from relay {self.relay} within {timeout}s (the node keeps trying "
                "until it is closed)"
            ) from None

    def _settle(self, message: Message, how: str, requeue: bool) -> None:
        if self._closed:
            return
        self._core.settle(message, how, requeue)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self, force: bool = False) -> None:
        """Move queued sends into SEND commands and write what the core has."""
        self._flush_scheduled = False
        if self._closed and not force:
            return
        while self._core.state == State.READY and self._core.unconfirmed < MAX_IN_FLIGHT_BATCHES:
            records, futures = take_batch(self._outgoing, self._core.max_message_size)
            if not records:
                break
            req = self._core.send(records)
            self._dispatch.sends[req] = [(f, r[0]) for f, r in zip(futures, records)]
        self._core.flush_acks()
        out = self._core.drain()
        for frames in out:
            # HWM 0: never blocks, and pyzmq keeps queued sends in order.
            self._sock.send_multipart(frames)
        if out:
            self._core.sent(time.time())

    def _connect(self) -> None:
        self._sock = relay_socket(self._context, self.relay, self._curve)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.asyncio.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._core.connection_made(time.time())

    async def _read_loop(self) -> None:
        try:
            while True:
                self._flush()
                wait = max(0.0, self._core.next_deadline() - time.time())
                sock = self._sock
                ready = dict(await self._poller.poll(int(min(wait, 1.0) * 1000) + 1))
                now = time.time()
                events = []
                while sock in ready and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = await sock.recv_multipart()
                    try:
                        events.extend(self._core.receive(frames, now))
                    except Exception as exc:
                        log.warning("node %s: bad command from relay dropped: %s", self.name, exc)
                if self._monitor in ready:
                    await self._monitor.recv_multipart()
                    events.append(RelayLost("connection to the relay dropped"))
                events.extend(self._core.tick(now))
                lost = self._dispatch.apply(events)
                if lost is not None:
                    log.info("node %s reconnecting: %s", self.name, lost.reason)
                    close_relay_socket(sock, self._monitor)
                    self._connect()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("node %s reader failed", self.name)
            raise


class AsyncConsumer:
    """Messages of one mailbox for an AsyncNode: `async for msg in consumer`."""

    def __init__(self, node: AsyncNode, mailbox: str):
        self.node = node
        self.mailbox = mailbox
        self.cid = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = False

    def _feed(self, messages: list[Message]) -> None:
        for m in messages:
            m._settle = self.node._settle
            self._queue.put_nowait(m)

    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds."""
        if self._cancelled:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while not self._cancelled and not self.node._closed:
            m = await self.get(timeout=0.5)
            if m is not None:
                yield m

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self.node._core.cancel(self.cid)
            self.node._dispatch.sinks.pop(self.cid, None)
            self.node._schedule_flush()
