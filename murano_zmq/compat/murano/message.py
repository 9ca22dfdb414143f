"""The engine's Message: `.body` is the decoded JSON of what was sent."""

from __future__ import annotations

import json
import logging

from ..common import received_fields

LOG = logging.getLogger("murano_zmq.compat.murano")


class Message:
    """Settable `.id` (None becomes '') and `.body`; a received one also
    has `.reply_to`, `.signature`, `.redelivered` and `.ack()`."""

    def __init__(self, connection=None, message_handle=None):
        self._body = None
        self._connection = connection
        self._message_handle = message_handle
        self._reply_to = self._signature = None
        if message_handle is None:
            self.id = None
            return
        self.id, self._reply_to, self._signature, text = received_fields(message_handle)
        try:
            if not isinstance(text, (str, bytes)):
                raise ValueError(f"the body is a {type(text).__name__}, not JSON text")
            self.body = json.loads(text)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
            self.body = None
            LOG.error("message %r: body is not JSON: %s", self.id, exc)

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
        """True when an earlier delivery was not acked (a consumer died)."""
        return self._message_handle is not None and self._message_handle.redelivered

    def ack(self):
        if self._message_handle is None:
            raise RuntimeError("this message was not received: there is nothing to ack")
        self._message_handle.ack()
