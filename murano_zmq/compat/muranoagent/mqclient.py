"""The agent's MqClient: relay only (a tenant VM behind NAT), plain json."""

from __future__ import annotations

from ..common import BaseMqClient
from .subscription import Subscription


class MqClient(BaseMqClient):
    subscription_class = Subscription
