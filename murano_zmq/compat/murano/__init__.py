"""Drop-in for murano-engine's ``murano.common.messaging`` (docs/murano.md).

Same modules and names as the original: ``mqclient.MqClient``,
``subscription.Subscription``, ``message.Message`` (a received message's
`.body` is the decoded JSON).  Either change the import, or call
`install()` before Murano imports its messaging package.
"""

from __future__ import annotations

import sys

from . import message, mqclient, subscription  # noqa: F401  (the original layout: mqclient.MqClient, ...)
from .message import Message
from .mqclient import MqClient
from .subscription import Subscription

ORIGINAL = "murano.common.messaging"

__all__ = ["Message", "MqClient", "Subscription", "install"]


def install() -> None:
    """Make ``import murano.common.messaging[.mqclient|.message|.subscription]``
    give this package (one set of sys.modules entries)."""
    sys.modules[ORIGINAL] = sys.modules[__name__]
    for name in ("mqclient", "message", "subscription"):
        sys.modules[f"{ORIGINAL}.{name}"] = sys.modules[f"{__name__}.{name}"]
