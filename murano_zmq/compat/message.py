"""What both flavours' Message share: a settable id and body, and, on a
received message, reply_to, signature, redelivered and ack().  Each flavour
says only how the received text becomes `.body` (`_body_from`)."""

from __future__ import annotations

from .common import received_fields


class BaseMessage:
    def __init__(self, connection=None, message_handle=None):
        self._body = None
        self._connection = connection
        self._message_handle = message_handle
        self._reply_to = self._signature = None
        if message_handle is None:
            self.id = None
            return
        self.id, self._reply_to, self._signature, text = received_fields(message_handle)
        self.body = self._body_from(text)

    def _body_from(self, text):
        return text

    @property
    def body(self):
        return self._body

    @body.setter
    def body(self, value):
        self._body = value

    @property
    def id(self):
        return self._id

    @id.setter
    def id(self, value):
        self._id = value or ''

    @property
    def reply_to(self):
        return self._reply_to

    @property
    def signature(self):
        return self._signature

    @property
    def redelivered(self) -> bool:
        """True when an earlier delivery was not acked (its consumer died)."""
        return self._message_handle is not None and self._message_handle.redelivered

    def ack(self):
        if self._message_handle is None:
            raise RuntimeError("this message was not received: there is nothing to ack")
        self._message_handle.ack()
