"""The agent's Subscription: messages of its input queue, as sent."""

from __future__ import annotations

from ..common import BaseSubscription
from .message import Message


class Subscription(BaseSubscription):
    message_class = Message
