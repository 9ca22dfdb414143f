"""The engine's MqClient: sends with oslo_serialization's jsonutils, as
murano.common.messaging does (plain json where oslo is not installed)."""

from __future__ import annotations

from ..common import BaseMqClient
from .subscription import Subscription

try:
    from oslo_serialization import jsonutils as _json
except ImportError:  # pragma: no cover - Murano always has oslo
    import json as _json


class MqClient(BaseMqClient):
    subscription_class = Subscription

    @staticmethod
    def _dumps(body) -> str:
        return _json.dumps(body)
