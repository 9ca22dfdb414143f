"""The turn: what a relay loop turn sends, now and after its commit.

Replies that promise durability (CONFIRM, DECLARE's and DELETE's REPLY)
are held until the commit that holds the turn's writes has returned;
deliveries and errors go out before it, so a consumer works while the disk
syncs.  A delivery whose commit then never happens is safe: its sender was
not confirmed and sends it again, and the receiving node's dedup absorbs it.
"""

from __future__ import annotations

from typing import Any

from ..protocol.errors import RelayError
from ..protocol.frames import Cmd, encoder
from ..store.base import Store

Output = tuple[bytes, list[bytes]]

# Deletes alone (acks, expiries) are not synced (store/sqlite.py): a crash
# that loses some only delivers those messages again, marked redelivered.
# Their COMMIT still writes every page they touch into the WAL, and a
# consumer's acks, a few per turn, rewrote the same pages turn after turn
# (a quarter of the relay's time under a consumer).  Such a turn leaves
# them to a later commit: any commit, or theirs once they are this many or
# the first of them this old.  Meanwhile the loop runs their statements
# when idle (RelayEngine.write_held_deletes: sealed and written into the
# open transaction), so the commit that takes them has little left to do.
DELETES_HELD_ROWS = 2000
DELETES_HELD_SECONDS = 0.05


class Turn:
    def __init__(self, store: Store):
        self.store = store
        self._encode = encoder()  # the relay loop's thread only
        self._now: list[Output] = []
        self._after_commit: list[Output] = []
        self.deletes_since: float | None = None  # when held deletes began waiting for a commit

    def reply_now(self, identity: bytes, cmd: Cmd, *fields: Any) -> None:
        self._now.append((identity, self._encode(cmd, *fields)))

    def error(self, identity: bytes, req: int | None, exc: RelayError) -> None:
        self._now.append((identity, self._encode(Cmd.ERROR, req, exc.code, exc.text)))

    def reply_after_commit(self, identity: bytes, cmd: Cmd, *fields: Any) -> None:
        self._after_commit.append((identity, self._encode(cmd, *fields)))

    @property
    def idle(self) -> bool:
        """Nothing to send, now or after a commit."""
        return not self._now and not self._after_commit

    def encode(self, cmd: Cmd, *fields: Any) -> list[bytes]:
        return self._encode(cmd, *fields)

    def take_now(self) -> list[Output]:
        out, self._now = self._now, []
        return out

    def hold_deletes(self, now: float) -> bool:
        """True if the writes waiting for a commit (sealed or open) are
        deletes alone, fewer than DELETES_HELD_ROWS and waiting for less
        than DELETES_HELD_SECONDS: no commit this turn."""
        if self._after_commit:
            return False
        deletes = self.store.held_deletes()
        if not deletes or deletes >= DELETES_HELD_ROWS:
            return False
        if self.deletes_since is None:
            self.deletes_since = now
        return now < self.deletes_since + DELETES_HELD_SECONDS

    def prepare_commit(self) -> list[Output]:
        """Seal the turn's writes; return the replies that may go out once
        the store's commit() has returned."""
        self.deletes_since = None
        self.store.seal()
        held, self._after_commit = self._after_commit, []
        return held

    def commit(self) -> None:
        """Seal, commit (here, in this thread) and release the held replies."""
        held = self.prepare_commit()
        self.store.commit()
        self._now.extend(held)
