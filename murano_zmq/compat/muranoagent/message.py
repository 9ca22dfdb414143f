"""The agent's Message: `.body` is the exact JSON text that was sent.

The agent verifies the engine's signature over ``queue name + body`` and
stores the text before it acks, so the body is handed over undecoded.
"""

from __future__ import annotations

from ..message import BaseMessage


class Message(BaseMessage):
    """Settable `.id` (None becomes '') and `.body`; a received one also
    has `.reply_to`, `.signature`, `.redelivered` and `.ack()`."""
