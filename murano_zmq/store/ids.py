"""Which message ids need no lookup: the id index's clock ceiling.

Ids made by new_message_id() start with a 48-bit millisecond clock, so a
new one is nearly always above every stored one and cannot be stored yet.
The store keeps the top clock prefix among stored ids, and the ids with that
very prefix stored since it became the top (ids of one millisecond have
random low bits, so "above the ceiling" alone would send about half of a
fast sender's ids to the index).  Ids whose prefix is past CLOCK_LIMIT are
not clock ids (idempotent_id() hashes mostly are): they never move the
ceiling and are always looked up, so one of them does not make every later
id a lookup.

Deletes and rolled-back inserts only leave ids here that are no longer
stored: a lookup too many, never one too few.
"""

from __future__ import annotations

from ..protocol.constants import ID_CLOCK_BYTES

PREFIX = ID_CLOCK_BYTES  # bytes of clock at the start of a clock id
# Past this (ms since 1970, year 2200) a prefix is not a clock.
CLOCK_LIMIT = (7_258_118_400_000).to_bytes(PREFIX, "big")
# SQL bound: a 16-byte id sorts below this iff its prefix is <= CLOCK_LIMIT.
CLOCK_BOUND = (7_258_118_400_001).to_bytes(PREFIX, "big")
# From this many ids on, min() and max() cost less than a loop over them.
FEW = 8


class IdCeiling:
    __slots__ = ("top", "recent")

    def __init__(self, top_id: bytes | None):
        """`top_id`: the highest stored clock id (None: none stored)."""
        self.top = top_id[:PREFIX] if top_id else b""
        # Ids with prefix `top` stored by this process; None: not known (the
        # top came from the database, whose ids of that millisecond we did not see).
        self.recent: set[bytes] | None = None

    def maybe_stored(self, msg_ids: list[bytes]) -> list[bytes]:
        """The ids that may be stored (the rest surely are not)."""
        top, recent, limit = self.top, self.recent, CLOCK_LIMIT
        # The usual SEND of many: clock ids of one clock, the top's or past
        # it.  (Ids order as their prefixes do, so min() and max() in C
        # tell; an id past the top is never in `recent`.)  A few ids, a lone
        # send's: the loop below costs less than min() and max().
        if len(msg_ids) >= FEW and max(msg_ids)[:PREFIX] <= limit:
            low = min(msg_ids)[:PREFIX]
            if low > top:
                return []
            if low == top and recent is not None:
                return list(filter(recent.__contains__, msg_ids))
        out = []
        for m in msg_ids:
            p = m[:PREFIX]
            if p > top:
                if p <= limit:
                    continue
            elif p == top and recent is not None and m not in recent:
                continue
            out.append(m)
        return out

    def stored(self, msg_ids: list[bytes]) -> None:
        top, recent, limit = self.top, self.recent, CLOCK_LIMIT
        if len(msg_ids) >= FEW and min(msg_ids)[:PREFIX] >= top:  # the usual SEND, as in maybe_stored()
            high = max(msg_ids)[:PREFIX]
            if high == top:
                if recent is not None:
                    recent.update(msg_ids)
                return
            if high <= limit:
                # The new top, and the ids that have it (an id is at least
                # its own prefix, and below any higher one).
                self.top, self.recent = high, set(filter(high.__le__, msg_ids))
                return
        for m in msg_ids:
            p = m[:PREFIX]
            if p > top:
                if p <= limit:
                    top, recent = p, {m}
            elif p == top and recent is not None:
                recent.add(m)
        self.top, self.recent = top, recent
