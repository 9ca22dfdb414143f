"""The engine's Subscription: messages of one queue, decoded."""

from __future__ import annotations

from ..common import BaseSubscription
from .message import Message


class Subscription(BaseSubscription):
    message_class = Message
