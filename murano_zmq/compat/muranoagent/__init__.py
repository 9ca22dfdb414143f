"""Drop-in for murano-agent's ``muranoagent.common.messaging`` (docs/murano.md).

Same names as the original: `MqClient`, `Subscription`, `Message` (a
received message's `.body` is the exact JSON text sent).  The agent needs
only the relay's address and public key: its node connects out to the relay
and takes every message from it (``direct=False``).  Either change the
import, or call `install()` before the agent imports its messaging package.
"""

from __future__ import annotations

import sys

from . import message, mqclient, subscription  # noqa: F401  (the original layout: mqclient.MqClient, ...)
from .message import Message
from .mqclient import MqClient
from .subscription import Subscription

ORIGINAL = "muranoagent.common.messaging"

__all__ = ["Message", "Subscription", "MqClient", "install"]


def install() -> None:
    """Make ``import muranoagent.common.messaging[...]`` give this package."""
    sys.modules[ORIGINAL] = sys.modules[__name__]
    for name in ("mqclient", "message", "subscription"):
        sys.modules[f"{ORIGINAL}.{name}"] = sys.modules[f"{__name__}.{name}"]
