"""What a node hands the application: consumers (messages of one mailbox)
and subscriptions (topic events), for Node (blocking) and AsyncNode (async).
They hold a queue the runner feeds from its loop; settling a message and
cancelling go back through the node."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import AsyncIterator, Iterator

from ..protocol.constants import SUBSCRIPTION_BYTES, SUBSCRIPTION_EVENTS
from ..protocol.errors import NodeClosed
from ..protocol.message import Message
from ..protocol.topics import TopicEvent

log = logging.getLogger("murano_zmq.node")

# Seconds a waiting get() or iteration sleeps at most before it looks again
# whether its consumer was cancelled or its node closed (by another thread
# or task: nothing else would wake it).
RECHECK = 0.2


# Seconds between two log lines of one subscription's dropped events.
DROPS_LOGGED_EVERY = 10.0


class _Backlog:
    """What a subscription holds for its reader: at most SUBSCRIPTION_EVENTS
    events and SUBSCRIPTION_BYTES of their bodies.  Past either, a new event
    is dropped, as a full socket would drop it (topics are lossy), counted
    and logged (once per DROPS_LOGGED_EVERY).  The node's loop admits and
    keeps the counts; a reader only appends what it took to a deque (an
    atomic append), which the next admit() takes off: no lock per event (a
    lock cost the fan-out of ten subscribers 12 %)."""

    __slots__ = ("prefix", "events", "nbytes", "dropped", "_taken", "_logged_at")

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.events = self.nbytes = self.dropped = 0
        self._taken: deque[int] = deque()  # sizes of the events readers took since the last admit()
        self._logged_at = float("-inf")

    def admit(self, events: list[TopicEvent]) -> list[TopicEvent]:
        """(the node's loop) Those of `events` that fit, in order."""
        taken = self._taken
        while taken:
            self.events -= 1
            self.nbytes -= taken.popleft()
        held, nbytes = self.events, self.nbytes
        out = []
        for e in events:
            size = len(e.packed_body)
            if held < SUBSCRIPTION_EVENTS and nbytes + size <= SUBSCRIPTION_BYTES:
                held += 1
                nbytes += size
                out.append(e)
        self.events, self.nbytes = held, nbytes
        if len(out) < len(events):
            self.dropped += len(events) - len(out)
            now = time.monotonic()
            if now - self._logged_at >= DROPS_LOGGED_EVERY:
                self._logged_at = now
                log.warning("subscription %r: its reader is behind (%d events, %d bytes held): new events "
                            "dropped, %d so far", self.prefix, held, nbytes, self.dropped)
        return out

    def taken(self, event: TopicEvent) -> None:
        """(a reader) `event` left the subscription's queue."""
        self._taken.append(len(event.packed_body))


class Subscription:
    """Topic events for one prefix; iterate, call get(), or give a callback.
    `dropped`: events this subscription dropped because its reader was
    behind (see _Backlog)."""

    def __init__(self, node, sid: int, prefix: str, callback=None):
        self.node = node
        self.sid = sid
        self.prefix = prefix
        self._backlog = _Backlog(prefix)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = None
        if callback is not None:
            self._thread = threading.Thread(target=self._run_callback, args=(callback,), daemon=True)
            self._thread.start()

    @property
    def dropped(self) -> int:
        return self._backlog.dropped

    def _feed(self, events: list[TopicEvent]) -> None:
        put = self._queue.put
        for e in self._backlog.admit(events):
            put(e)

    def get(self, timeout: float | None = None) -> TopicEvent | None:
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self._backlog.taken(event)
        return event

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


class _MailboxHandle:
    """What both kinds of consumer are: a mailbox, the consumer id the core
    gave it, and a queue the runner feeds (`put` does not block)."""

    def __init__(self, node, mailbox: str, messages, put):
        self.node = node
        self.mailbox = mailbox
        self.cid = 0
        self._queue = messages
        self._put = put
        self._cancelled = False

    def _feed(self, messages: list[Message]) -> None:
        settle, put = self.node._settle, self._put
        for m in messages:
            m._settle = settle  # an ack goes back through the node
            put(m)


class Consumer(_MailboxHandle):
    """Messages of one mailbox for this node; iterate, or call get()."""

    def __init__(self, node, mailbox: str):
        messages: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(node, mailbox, messages, messages.put)

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds (None: until one
        comes), or once this consumer is cancelled or its node closed."""
        if self._cancelled:
            return None
        get = self._queue.get
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = RECHECK if deadline is None else min(RECHECK, deadline - time.monotonic())
            try:
                return get(timeout=max(0.0, wait))
            except queue.Empty:
                if self._cancelled or self.node._closed.is_set() or (
                        deadline is not None and time.monotonic() >= deadline):
                    return None

    def __iter__(self) -> Iterator[Message]:
        get = self._queue.get  # (get(), inline: once per consumed message)
        while not self._cancelled:
            try:
                yield get(timeout=RECHECK)
            except queue.Empty:
                if self.node._closed.is_set():
                    return

    def cancel(self) -> None:
        """Stop consuming; messages not yet acked go back to the mailbox."""
        if self._cancelled:
            return
        self._cancelled = True
        try:
            self.node._cancel(self.cid, self.mailbox)
        except NodeClosed:
            pass


class AsyncConsumer(_MailboxHandle):
    """Messages of one mailbox for an AsyncNode: `async for msg in consumer`.

    Its queue is a deque and an Event set when a DELIVER's messages arrive
    (an asyncio.Queue costs a put and a get in Python per message)."""

    def __init__(self, node, mailbox: str):
        messages: deque[Message] = deque()
        super().__init__(node, mailbox, messages, messages.append)
        self._arrived = asyncio.Event()

    def _feed(self, messages: list[Message]) -> None:
        settle = self.node._settle
        for m in messages:
            m._settle = settle  # an ack goes back through the node
        self._queue.extend(messages)
        self._arrived.set()

    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds (None: until one
        comes), or once this consumer is cancelled or its node closed."""
        ready = self._queue
        if ready and not self._cancelled:  # no task, no yield: acks of a burst go out together
            return ready.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready:
            if self._cancelled or self.node._closed:
                return None
            left = RECHECK if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(RECHECK, left))
            except asyncio.TimeoutError:
                pass
        return None if self._cancelled else ready.popleft()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        ready = self._queue
        while not self._cancelled and not self.node._closed:
            if ready:  # (get(), inline: once per consumed message)
                yield ready.popleft()
                continue
            m = await self.get(timeout=0.5)
            if m is not None:
                yield m

    def cancel(self) -> None:
        """Stop consuming; messages not yet acked go back to the mailbox."""
        if not self._cancelled:
            self._cancelled = True
            self._arrived.set()  # a get() waiting returns None
            self.node._cancel(self.cid, self.mailbox)


class AsyncSubscription:
    """Topic events for one prefix on an AsyncNode."""

    def __init__(self, node, sid: int, prefix: str, callback=None):
        self.node = node
        self.sid = sid
        self.prefix = prefix
        self._callback = callback
        self._backlog = _Backlog(prefix)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = False

    @property
    def dropped(self) -> int:
        """Events dropped because the reader was behind (see Subscription)."""
        return self._backlog.dropped

    def _feed(self, events: list[TopicEvent]) -> None:
        if self._callback is None:
            put = self._queue.put_nowait
            for e in self._backlog.admit(events):
                put(e)
            return
        for e in events:
            try:
                self._callback(e)
            except Exception:
                log.exception("subscription %r: callback failed", self.prefix)

    async def get(self, timeout: float | None = None) -> TopicEvent | None:
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        self._backlog.taken(event)
        return event

    def __aiter__(self) -> AsyncIterator[TopicEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TopicEvent]:
        while not self._cancelled and not self.node._closed:
            e = await self.get(timeout=0.5)
            if e is not None:
                yield e

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self.node._subscriptions.pop(self.sid, None)
            if not self.node._closed:
                self.node._topics.unsubscribe(self.sid)
