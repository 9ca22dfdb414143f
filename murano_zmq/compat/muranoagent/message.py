"""The agent's Message: `.body` is the exact JSON text that was sent.

The agent verifies the engine's signature over ``queue name + body`` and
stores the text before it acks, so the body is handed over undecoded.
"""

from __future__ import annotations

from ..common import received_fields


class Message:
    """Settable `.id` (None becomes '') and `.body`; a received one also
    has `.reply_to`, `.signature`, `.redelivered` and `.ack()`."""

    def __init__(self, connection=None, message_handle=None):
        self._body = None
        self._connection = connection
        self._message_handle = message_handle
        if message_handle is not None:
            self.id, self._reply_to, self._signature, self.body = received_fields(message_handle)
        else:
            self.id = None
            self._reply_to = self._signature = None
            self.body = None

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
        """True when an earlier delivery was not acked (an agent died)."""
        return self._message_handle is not None and self._message_handle.redelivered

    def ack(self):
        if self._message_handle is None:
            raise RuntimeError("this message was not received: there is nothing to ack")
        self._message_handle.ack()
