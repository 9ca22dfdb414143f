"""Messages handed to oslo.messaging servers: settle through the mailbox,
and (RPC) reply to the caller's reply mailbox."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from oslo_messaging._drivers import base
from oslo_messaging._drivers import common as rpc_common

from .. import Message
from .codec import Notification, Reply, Request

log = logging.getLogger("murano_zmq.oslo")

# send_reply(mailbox, reply, ttl): hands a reply to the relay, or raises.
SendReply = Callable[[str, Reply, "float | None"], None]


class RpcIncoming(base.RpcIncomingMessage):
    """A call, cast or fanout taken from a mailbox.

    acknowledge() acks it (the RPC server does so before it dispatches, as
    with rabbit: a server that dies while handling a call does not get it
    again); requeue() gives it back to the mailbox.
    """

    def __init__(self, raw: Message, request: Request, send_reply: SendReply):
        super().__init__(request.ctxt, request.message, request.msg_id)
        self.client_timeout = request.monitor
        self._raw = raw
        self._request = request
        self._send_reply = send_reply

    def acknowledge(self) -> None:
        self._raw.ack()

    def requeue(self) -> None:
        self._raw.nack(requeue=True)

    def reply(self, reply=None, failure=None) -> None:
        request = self._request
        if not (request.msg_id and request.reply_to):
            return  # a cast: nobody waits
        failure_text = rpc_common.serialize_remote_exception(failure) if failure else None
        self._send(Reply(request.msg_id, reply, failure_text, ending=True))

    def heartbeat(self) -> None:
        """Tell a caller with a call monitor that the call is still running."""
        if self._request.msg_id and self._request.reply_to:
            self._send(Reply(self._request.msg_id, ending=False))

    def _send(self, reply: Reply) -> None:
        request = self._request
        try:
            self._send_reply(request.reply_to, reply, request.reply_ttl)
        except Exception:
            if reply.ending and reply.failure is None:
                # The result could not be sent (not JSON-able, too large...):
                # tell the caller why rather than let it time out.
                log.exception("cannot send the reply to %s; sending the error instead", request.msg_id)
                error = Reply(request.msg_id, None, rpc_common.serialize_remote_exception(sys.exc_info()))
                try:
                    self._send_reply(request.reply_to, error, request.reply_ttl)
                    return
                except Exception:
                    pass
            log.exception("cannot send a reply to %s (mailbox %s)", request.msg_id, request.reply_to)


class NotificationIncoming(base.IncomingMessage):
    """A notification taken from a mailbox: ack or requeue it."""

    def __init__(self, raw: Message, notification: Notification):
        super().__init__(notification.ctxt, notification.message)
        self._raw = raw

    def acknowledge(self) -> None:
        self._raw.ack()

    def requeue(self) -> None:
        self._raw.nack(requeue=True)
