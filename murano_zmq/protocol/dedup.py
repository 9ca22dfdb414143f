"""The node's dedup window: each (mailbox, message id) reaches application
code once while the node lives, whichever path (relay or direct) brought it.

Keys of settled messages are remembered in a bounded window; keys of
messages still with the application are remembered until they settle.
"""

from __future__ import annotations

from collections import OrderedDict

from .constants import DEDUP_WINDOW

FRESH = "fresh"  # hand it to the application
ACKED = "acked"  # seen and settled: settle the copy quietly
IN_APP = "in-app"  # the application has it now: drop the copy


class DedupWindow:
    def __init__(self, size: int = DEDUP_WINDOW):
        self._size = size
        self._in_app: dict[tuple, object] = {}  # key -> owner (a consumer id)
        self._settled: OrderedDict[tuple, None] = OrderedDict()

    def offer(self, key: tuple, owner: object) -> str:
        """FRESH (and now held by `owner`), ACKED or IN_APP."""
        if key in self._settled:
            return ACKED
        if key in self._in_app:
            return IN_APP
        self._in_app[key] = owner
        return FRESH

    def settle(self, key: tuple, done: bool) -> None:
        """The application acked (done) or requeued (not done) the message."""
        self._in_app.pop(key, None)
        if done:
            self._settled[key] = None
            if len(self._settled) > self._size:
                self._settled.popitem(last=False)

    def release(self, owner: object) -> None:
        """Forget what `owner` held but did not settle (it may come again)."""
        for key in [k for k, o in self._in_app.items() if o == owner]:
            del self._in_app[key]
