"""The node's dedup window: each (mailbox, message id) reaches application
code once while the node lives, whichever path (relay or direct) brought it.

Keys of settled messages are remembered in a bounded window; keys of
messages still with the application are remembered until they settle.
"""

from __future__ import annotations

from collections import OrderedDict

from .constants import DEDUP_WINDOW

FRESH = "fresh"  # hand it to the application
ACKED = "acked"  # seen and acked: ack the copy quietly
REJECTED = "rejected"  # seen and rejected: reject the copy too (its dead letter)
IN_APP = "in-app"  # the application has it now: drop the copy


class DedupWindow:
    def __init__(self, size: int = DEDUP_WINDOW):
        self._size = size
        self._in_app: dict[tuple, object] = {}  # key -> owner (a consumer id)
        self._settled: OrderedDict[tuple, bool] = OrderedDict()  # key -> rejected?

    def offer(self, key: tuple, owner: object) -> str:
        """FRESH (and now held by `owner`), ACKED, REJECTED or IN_APP."""
        rejected = self._settled.get(key)
        if rejected is not None:
            return REJECTED if rejected else ACKED
        if key in self._in_app:
            return IN_APP
        self._in_app[key] = owner
        return FRESH

    def settle(self, key: tuple, done: bool, rejected: bool = False) -> None:
        """The application acked (done), rejected (done, rejected) or
        requeued (not done) the message.  A rejected one's copies are
        rejected too: a copy that came again after a lost session must still
        reach the mailbox's dead-letter mailbox, not be acked away."""
        self._in_app.pop(key, None)
        if done:
            self._settled[key] = rejected
            if len(self._settled) > self._size:
                self._settled.popitem(last=False)

    def offer_many(self, keys: list[tuple], owner: object) -> list[str]:
        """offer() of each key, in order (a DELIVER's records)."""
        settled, in_app = self._settled, self._in_app
        out = []
        for key in keys:
            rejected = settled.get(key)
            if rejected is not None:
                out.append(REJECTED if rejected else ACKED)
            elif key in in_app:
                out.append(IN_APP)
            else:
                in_app[key] = owner
                out.append(FRESH)
        return out

    def settle_done(self, keys: list[tuple]) -> None:
        """settle(key, True) of each key, in order (a run of acks)."""
        in_app, settled, size = self._in_app, self._settled, self._size
        for key in keys:
            in_app.pop(key, None)
            settled[key] = False
            if len(settled) > size:
                settled.popitem(last=False)

    def release(self, owner: object) -> None:
        """Forget what `owner` held but did not settle (it may come again)."""
        for key in [k for k, o in self._in_app.items() if o == owner]:
            del self._in_app[key]
