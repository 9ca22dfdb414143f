"""The engine's Message: `.body` is the decoded JSON of what was sent."""

from __future__ import annotations

import json
import logging

from ..message import BaseMessage

LOG = logging.getLogger("murano_zmq.compat.murano")


class Message(BaseMessage):
    """Settable `.id` (None becomes '') and `.body`; a received one also
    has `.reply_to`, `.signature`, `.redelivered` and `.ack()`.  A received
    body that is not JSON gives None and a logged error."""

    def _body_from(self, text):
        try:
            if not isinstance(text, (str, bytes)):
                raise ValueError(f"the body is a {type(text).__name__}, not JSON text")
            return json.loads(text)
        except (ValueError, RecursionError) as exc:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
            LOG.error("message %r: body is not JSON: %s: %s", self.id, type(exc).__name__, exc)
            return None
