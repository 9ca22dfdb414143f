"""A PollStyleListener over several mailboxes.

Each consumer gets a pump thread that moves its messages, turned into
IncomingMessages, into one inbox; poll() takes batches from the inbox.

Stopping keeps every message either handled or given back, never both:

- stop(): pumps stop handing messages over (one they take from now on is
  requeued), poll() returns what the inbox still holds, then None;
- cleanup(), after the server has handled what poll() returned: pumps are
  joined, what is left in the inbox is requeued, and the consumers are
  cancelled, which gives the relay back what they held but never handed
  over.  Acks of handled messages reach the relay before the cancel.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from oslo_messaging._drivers import base

from .. import Consumer, Message

log = logging.getLogger("murano_zmq.oslo")

# Seconds a pump waits for a message before it looks whether to stop.
_WAKE = 0.2

MakeIncoming = Callable[[Message], base.IncomingMessage]

_WAKE_UP = object()


class MailboxListener(base.PollStyleListener):
    def __init__(self, consumers: list[Consumer], make_incoming: MakeIncoming,
                 transport_closed: threading.Event):
        super().__init__()
        self._consumers = consumers
        self._make_incoming = make_incoming
        self._transport_closed = transport_closed
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._cleaned = False
        self._pumps = [
            threading.Thread(target=self._pump, args=(c,), name=f"oslo-listener-{c.mailbox}", daemon=True)
            for c in consumers
        ]
        for pump in self._pumps:
            pump.start()

    @property
    def mailboxes(self) -> list[str]:
        return [c.mailbox for c in self._consumers]

    def poll(self, timeout: float | None = None, batch_size: int = 1,
             batch_timeout: float | None = None) -> list[base.IncomingMessage]:
        """Up to `batch_size` messages: waits up to `timeout` seconds (None:
        until stop()) for the first, then up to `batch_timeout` seconds from
        the first for the rest (none: takes only what is there already).

        The batch timer starts at the first message, as PollStyleListener
        documents, so a batch listener gets full batches of messages that
        come in a burst, whenever the burst starts."""
        first = self._take(timeout)
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + batch_timeout if batch_timeout else None
        while len(batch) < batch_size:
            left = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
            incoming = self._take(left)
            if incoming is None:
                break
            batch.append(incoming)
        return batch

    def _take(self, timeout: float | None) -> base.IncomingMessage | None:
        """The next message, or None after `timeout` seconds or once stopped
        and the inbox is empty."""
        while True:
            try:
                if self._stopped.is_set() or timeout == 0:
                    item = self._inbox.get_nowait()
                else:
                    item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                return None
            if item is not _WAKE_UP:
                return item
            # stop() woke us: from now on only what is already in the inbox

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._inbox.put(_WAKE_UP)

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self.stop()
        for pump in self._pumps:
            pump.join(_WAKE * 10)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _WAKE_UP:
                item.requeue()
        for consumer in self._consumers:
            consumer.cancel()

    def _pump(self, consumer: Consumer) -> None:
        while not (self._stopped.is_set() or self._transport_closed.is_set()):
            message = consumer.get(timeout=_WAKE)
            if message is None:
                continue
            log.debug("took %s from %s (delivery %d)", message.id.hex(), consumer.mailbox, message.delivery_count)
            if self._stopped.is_set():
                message.nack(requeue=True)
                break
            try:
                incoming = self._make_incoming(message)
            except ValueError as exc:  # (BadEnvelope, or a body that is not msgpack)
                log.error("dropped a message that is not oslo.messaging's from mailbox %s: %s",
                          consumer.mailbox, exc)
                message.ack()
                continue
            except Exception:  # a message this pump cannot take must not end it (it would come back first)
                log.exception("dropped a message of mailbox %s that could not be read", consumer.mailbox)
                message.ack()
                continue
            self._inbox.put(incoming)
