"""ZmqRelayDriver: oslo.messaging over murano-zmq's durable mailboxes.

Loaded by oslo.messaging for ``zmqrelay://`` transport URLs through the
``oslo.messaging.drivers`` entry point.  What maps to what (names.py has the
mailbox names):

- cast / call to a topic: one message to the topic's mailbox, which every
  server of the topic consumes (they compete: one server gets it);
- to a server: the server's own mailbox;
- fanout: a copy to the fanout mailbox of every listening server of the
  topic that is consuming now (one per listener: the workers of a service
  that share a server name each have one; the relay's listing, filtered by
  prefix);
- a call's reply: to the caller's reply mailbox, which one thread of the
  caller's transport consumes and routes to the waiting call by msg_id;
- notification: a copy to the ``<topic>.<priority>`` mailbox, which
  listeners without a pool share, and one to the mailbox of each pool
  (every pool gets every notification; a pool's listeners compete).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import oslo_messaging
from oslo_messaging import transport as om_transport
from oslo_messaging._drivers import base

from .. import MuranoZmqError, Node, RelayUnavailable
from ..protocol.constants import MAX_PREFETCH, MAX_SECONDS
from ..security import KeyFileError, client_curve
from . import green
from .codec import CALL, CAST, FANOUT, Notification, Reply, Request
from .incoming import NotificationIncoming, RpcIncoming
from .listener import MailboxListener
from .names import MailboxNames, shard_key
from .options import DriverOptions, relay_endpoints
from .relays import Directory, Relays, declare
from .replies import ReplyRouter

log = logging.getLogger("murano_zmq.oslo")


class ZmqRelayListenError(base.TransportDriverError):
    """A listener could not consume its mailboxes."""


class ZmqRelayDriver(base.BaseDriver):
    """The ``zmqrelay`` transport driver."""

    def __init__(self, conf, url, default_exchange=None, allowed_remote_exmods=None):
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        try:
            self.options = DriverOptions.load(conf, url.query)
        except ValueError as exc:
            raise om_transport.InvalidTransportURL(str(url), str(exc)) from None
        green.cooperate_if_patched()
        self.names = MailboxNames(url.virtual_host)
        node_options = dict(timeout=self.options.relay_timeout, heartbeat=self.options.heartbeat,
                            direct=self.options.direct)
        if self.options.direct_bind:
            node_options["bind"] = self.options.direct_bind
        if self.options.curve_key or self.options.relay_key:
            try:  # fail now, not at the first send
                client_curve(self.options.curve_key or None, self.options.relay_key or None)
            except (ValueError, OSError, KeyFileError) as exc:
                raise om_transport.InvalidTransportURL(str(url), f"zmqrelay CURVE keys: {exc}") from None
            node_options.update(curve_key=self.options.curve_key, relay_key=self.options.relay_key)
        try:
            self.relays = Relays(relay_endpoints(url.hosts), self.options.name, **node_options)
        except ValueError as exc:  # (a name too long or not printable)
            raise om_transport.InvalidTransportURL(str(url), f"zmqrelay option name: {exc}") from None
        self.directory = Directory(self.options.directory_cache)
        self._replies: ReplyRouter | None = None
        self._replies_lock = threading.Lock()
        self._closed = threading.Event()

    def require_features(self, requeue: bool = False) -> None:
        """Requeue is supported (a nack that gives the message back)."""

    # --- RPC: the client side ------------------------------------------------------

    def send(self, target, ctxt, message, wait_for_reply=None, timeout=None,
             call_monitor_timeout=None, retry=None, transport_options=None):
        exchange = self._exchange(target)
        node = self.relays.node(shard_key(exchange, target.topic))
        if target.fanout:
            if wait_for_reply:
                raise oslo_messaging.InvalidTarget("A call cannot be used with fanout", target)
            return self._fanout(node, exchange, target.topic, Request(ctxt, message))
        if target.server:
            mailbox = self.names.server(exchange, target.topic, target.server)
        else:
            mailbox = self.names.topic(exchange, target.topic)
        call = _CallClock(timeout if wait_for_reply else None, self.options.relay_timeout, mailbox)
        if transport_options is not None and getattr(transport_options, "at_least_once", False):
            self._check_consumed(node, exchange, mailbox, message, call.relay_wait())
        if not wait_for_reply:
            body, headers = Request(ctxt, message).encode(CAST)
            self._deliver(node, [(mailbox, body, headers)])
            return None
        return self._call(node, mailbox, ctxt, message, call, call_monitor_timeout)

    def _call(self, node: Node, mailbox: str, ctxt, message, call: "_CallClock", monitor):
        replies = self._reply_router(call.relay_wait())
        msg_id = uuid.uuid4().hex
        request = Request(ctxt, message, msg_id, replies.mailbox, call.timeout, monitor)
        body, headers = request.encode(CALL)
        replies.expect(msg_id)
        try:
            try:
                # The request expires with the call, counted from this send
                # (the node takes off the time it held it while no relay
                # answered): a server that comes later does not run it.
                node.send(mailbox, body, headers, ttl=call.ttl(), timeout=call.relay_wait())
            except RelayUnavailable as exc:
                raise oslo_messaging.MessagingTimeout(f"no relay confirmed the call to {mailbox} in time: "
                                                      f"{exc}") from None
            except MuranoZmqError as exc:
                raise oslo_messaging.MessageDeliveryFailure(f"call to {mailbox} refused: {exc}") from None
            return replies.wait(msg_id, call.left(), monitor)
        finally:
            replies.forget(msg_id)

    def _check_consumed(self, node: Node, exchange: str, mailbox: str, message, wait: float) -> None:
        """at_least_once (rabbit's mandatory flag): refuse at once, rather than
        store, a message that no server consumes now."""
        try:
            consumed = self.directory.consumed(node, mailbox, timeout=wait)
        except MuranoZmqError as exc:
            raise oslo_messaging.MessageDeliveryFailure(f"cannot look up {mailbox}: {exc}") from None
        if not consumed:
            raise oslo_messaging.MessageUndeliverable(
                oslo_messaging.MessageDeliveryFailure(f"no server consumes {mailbox}"),
                exchange, mailbox, message)

    def _fanout(self, node: Node, exchange: str, topic: str, request: Request) -> None:
        prefix = self.names.fanout_prefix(exchange, topic)
        try:
            mailboxes = self.directory.find(node, prefix, consumed_only=True, timeout=self.options.relay_timeout)
        except MuranoZmqError as exc:
            raise oslo_messaging.MessageDeliveryFailure(f"cannot list the servers of {topic}: {exc}") from None
        if not mailboxes:
            log.debug("fanout to %s: no server is listening", topic)
            return
        body, headers = request.encode(FANOUT)
        self._deliver(node, [(mb, body, headers) for mb in mailboxes])

    def _deliver(self, node: Node, messages: list[tuple]) -> None:
        try:
            node.send_many(messages, timeout=self.options.relay_timeout)
        except MuranoZmqError as exc:
            names = ", ".join(sorted({m[0] for m in messages}))
            raise oslo_messaging.MessageDeliveryFailure(f"send to {names} failed: {exc}") from None

    def _reply_router(self, wait: float) -> ReplyRouter:
        with self._replies_lock:
            if self._closed.is_set():
                raise oslo_messaging.MessageDeliveryFailure("the transport was cleaned up")
            if self._replies is None:
                mailbox = self.names.reply(uuid.uuid4().hex)
                try:
                    self._replies = ReplyRouter(self.relays.node(mailbox), mailbox, self.options.transient_ttl,
                                                self._allowed_remote_exmods, wait)
                except RelayUnavailable as exc:
                    raise oslo_messaging.MessagingTimeout(f"cannot open reply mailbox {mailbox}: {exc}") from None
                except MuranoZmqError as exc:
                    raise oslo_messaging.MessageDeliveryFailure(
                        f"cannot open reply mailbox {mailbox}: {exc}") from None
            return self._replies

    def _send_reply(self, mailbox: str, reply: Reply, ttl: float | None) -> None:
        body, headers = reply.encode()
        self.relays.node(mailbox).send(mailbox, body, headers, ttl=ttl or None,
                                       timeout=self.options.relay_timeout)

    # --- RPC: the server side -----------------------------------------------------------

    def listen(self, target, batch_size, batch_timeout):
        exchange = self._exchange(target)
        node = self.relays.node(shard_key(exchange, target.topic))
        fanout = self.names.fanout(exchange, target.topic, target.server, uuid.uuid4().hex[:12])
        mailboxes = [
            self.names.topic(exchange, target.topic),
            self.names.server(exchange, target.topic, target.server),
            fanout,
        ]

        # (the fanout mailbox goes `transient_ttl` seconds after the server stops consuming it)
        consumers = self._consume([(node, mb) for mb in mailboxes], max(self.options.prefetch, batch_size),
                                  transient=(node, fanout))

        def make_incoming(message) -> RpcIncoming:
            return RpcIncoming(message, Request.decode(message.body), self._send_reply)

        listener = MailboxListener(consumers, make_incoming, self._closed)
        return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

    # --- notifications ----------------------------------------------------------------------

    def send_notification(self, target, ctxt, message, version, retry=None):
        exchange = self._exchange(target)
        node = self.relays.node(shard_key(exchange, target.topic))
        try:
            pools = self.directory.find(node, self.names.pool_prefix(exchange, target.topic),
                                        consumed_only=False, timeout=self.options.relay_timeout)
        except MuranoZmqError as exc:
            raise oslo_messaging.MessageDeliveryFailure(
                f"cannot list the pools of {target.topic}: {exc}") from None
        body, headers = Notification(ctxt, message).encode()
        ttl = self.options.notification_ttl
        mailboxes = [self.names.notifications(exchange, target.topic), *pools]
        self._deliver(node, [(mb, body, headers, ttl) for mb in mailboxes])

    def listen_for_notifications(self, targets_and_priorities, pool, batch_size, batch_timeout):
        wanted = []
        for target, priority in targets_and_priorities:
            exchange = self._exchange(target)
            topic = f"{target.topic}.{priority}"
            node = self.relays.node(shard_key(exchange, topic))
            if pool:
                wanted.append((node, self.names.pool(exchange, topic, pool)))
            else:
                wanted.append((node, self.names.notifications(exchange, topic)))
        wanted = list(dict.fromkeys(wanted))
        consumers = self._consume(wanted, max(self.options.prefetch, batch_size))

        def make_incoming(message) -> NotificationIncoming:
            return NotificationIncoming(message, Notification.decode(message.body))

        listener = MailboxListener(consumers, make_incoming, self._closed)
        return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

    # --- both ----------------------------------------------------------------------------------

    def _consume(self, wanted: list[tuple[Node, str]], prefetch: int,
                 transient: tuple[Node, str] | None = None) -> list:
        """Consumers of the `wanted` mailboxes, `transient` (one of them)
        declared first with ttl=transient_ttl; a relay's window is at most
        MAX_PREFETCH (a larger batch_size takes what comes in its
        batch_timeout)."""
        consumers = []
        prefetch = min(prefetch, MAX_PREFETCH)
        doing, mailbox = "declare", None
        try:
            if transient is not None:
                node, mailbox = transient
                declare(node, mailbox, ttl=self.options.transient_ttl, timeout=self.options.relay_timeout)
            doing = "consume"
            for node, mailbox in wanted:
                consumers.append(node.consume(mailbox, prefetch=prefetch, timeout=self.options.relay_timeout))
        except (MuranoZmqError, ValueError) as exc:
            for consumer in consumers:
                consumer.cancel()
            raise ZmqRelayListenError(f"cannot {doing} {mailbox}: {exc}") from None
        return consumers

    def _exchange(self, target) -> str:
        return target.exchange or self._default_exchange or "openstack"

    def cleanup(self) -> None:
        self._closed.set()
        with self._replies_lock:
            replies, self._replies = self._replies, None
        if replies is not None:
            replies.stop()
        self.relays.close()


class _CallClock:
    """A call's time: `timeout` (None: wait for ever) bounds all of it, the
    opening of the reply mailbox and the lookups included, each of which
    also waits no longer than relay_timeout.  A call whose timeout is not
    > 0 times out before anything is sent (a request stored with no TTL
    would run late; rabbit's expires at once)."""

    def __init__(self, timeout: float | None, relay_timeout: float, mailbox: str):
        if timeout is not None and not timeout > 0:
            raise oslo_messaging.MessagingTimeout(f"call to {mailbox} with timeout={timeout!r}: nothing was sent")
        self.timeout = timeout
        self._relay_timeout = relay_timeout
        self._mailbox = mailbox
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def ttl(self) -> float | None:
        return None if self.timeout is None else min(self.timeout, MAX_SECONDS)

    def left(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def relay_wait(self) -> float:
        """How long the next exchange with the relay may wait."""
        left = self.left()
        if left is None:
            return self._relay_timeout
        if left <= 0:
            raise oslo_messaging.MessagingTimeout(f"call to {self._mailbox}: its timeout of {self.timeout}s passed")
        return min(left, self._relay_timeout)
