"""The caller's side of a call: one reply mailbox per transport, one thread
that routes replies to the waiting callers by msg_id."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import oslo_messaging
from oslo_messaging._drivers import common as rpc_common

from .. import Node
from ..protocol.constants import MAX_SECONDS
from .codec import Reply
from .relays import declare

log = logging.getLogger("murano_zmq.oslo")

# Seconds the routing thread waits for a reply before it looks whether it
# should stop (bounds how long stop() takes).
_WAKE = 0.25

# Replies the relay may hand the router before it acks them.
_PREFETCH = 1000

_CLOSED = object()


class ReplyRouter:
    """Receives every reply sent to `mailbox` and hands each to its caller."""

    def __init__(self, node: Node, mailbox: str, ttl: float, allowed_remote_exmods: list[str], wait: float):
        """`wait`: seconds the declare and the consume may each wait for the relay."""
        self.mailbox = mailbox
        self._allowed = allowed_remote_exmods
        # The mailbox outlives this process by `ttl` seconds, then goes.
        declare(node, mailbox, ttl=ttl, timeout=wait)
        self._consumer = node.consume(mailbox, prefetch=_PREFETCH, timeout=wait)
        self._waiters: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._route, name=f"oslo-replies-{mailbox}", daemon=True)
        self._thread.start()

    def expect(self, msg_id: str) -> None:
        """Register a caller before its request leaves, so no reply is missed."""
        with self._lock:
            if self._stopped.is_set():
                raise oslo_messaging.MessageDeliveryFailure("the transport was cleaned up")
            self._waiters[msg_id] = queue.Queue()

    def forget(self, msg_id: str) -> None:
        with self._lock:
            self._waiters.pop(msg_id, None)

    def wait(self, msg_id: str, timeout: float | None, monitor: float | None) -> Any:
        """The result of call `msg_id`, or raise its remote exception, or
        MessagingTimeout after `timeout` seconds (or `monitor` seconds
        without a heartbeat from the server)."""
        with self._lock:
            waiter = self._waiters[msg_id]
        deadline = None if timeout is None else time.monotonic() + timeout
        monitor_deadline = None if not monitor else time.monotonic() + monitor
        while True:
            limits = [d for d in (deadline, monitor_deadline) if d is not None]
            # (clamped: a wait past threading.TIMEOUT_MAX raises OverflowError; the loop waits on)
            wait = MAX_SECONDS if not limits else min(MAX_SECONDS, max(0.0, min(limits) - time.monotonic()))
            try:
                reply = waiter.get(timeout=wait)
            except queue.Empty:
                if not limits or min(limits) > time.monotonic():
                    continue
                raise oslo_messaging.MessagingTimeout(
                    f"Timed out waiting for a reply to message ID {msg_id} in {self.mailbox}"
                ) from None
            if reply is _CLOSED:
                raise oslo_messaging.MessagingException(
                    f"the transport was cleaned up while message ID {msg_id} waited for its reply")
            if not reply.ending:  # a heartbeat: the server still works on it
                if monitor:
                    monitor_deadline = time.monotonic() + monitor
                continue
            if reply.failure:
                raise rpc_common.deserialize_remote_exception(reply.failure, self._allowed)
            return reply.result

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            waiters = list(self._waiters.values())
        for waiter in waiters:
            waiter.put(_CLOSED)
        if self._thread is not threading.current_thread():
            self._thread.join(_WAKE * 8)
        self._consumer.cancel()

    def _route(self) -> None:
        while not self._stopped.is_set():
            message = self._consumer.get(timeout=_WAKE)
            if message is None:
                continue
            message.ack()  # at most once: a reply nobody takes now is useless later
            try:
                reply = Reply.decode(message.body)
            except ValueError as exc:  # (BadEnvelope, or a body that is not msgpack)
                log.error("dropped a message in reply mailbox %s: %s", self.mailbox, exc)
                continue
            except Exception:  # (this thread serves every call of the transport: it must go on)
                log.exception("dropped a message in reply mailbox %s that could not be read", self.mailbox)
                continue
            with self._lock:
                waiter = self._waiters.get(reply.msg_id)
            if waiter is None:
                log.info("reply to message ID %s came after its caller stopped waiting", reply.msg_id)
            else:
                waiter.put(reply)
