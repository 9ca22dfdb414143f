"""IdCeiling: its shortcut for a SEND of many ids of one clock (min and max)
answers as the loop over each id does, and keeps the same ceiling."""

import os
import random

from murano_zmq.store.ids import CLOCK_LIMIT, PREFIX, IdCeiling


class OneByOne(IdCeiling):
    """The rule, one id at a time."""

    def maybe_stored(self, msg_ids):
        out = []
        for m in msg_ids:
            p = m[:PREFIX]
            if p > self.top and p <= CLOCK_LIMIT:
                continue
            if p == self.top and self.recent is not None and m not in self.recent:
                continue
            out.append(m)
        return out

    def stored(self, msg_ids):
        for m in msg_ids:
            p = m[:PREFIX]
            if self.top < p <= CLOCK_LIMIT:
                self.top, self.recent = p, {m}
            elif p == self.top and self.recent is not None:
                self.recent.add(m)


def test_the_shortcut_answers_as_the_loop():
    rnd = random.Random(11)

    def clock_id(clock: int) -> bytes:
        return clock.to_bytes(PREFIX, "big") + os.urandom(10)

    for _ in range(2000):
        start = rnd.choice([None, clock_id(1000), b"\xff" * 16])
        fast, slow = IdCeiling(start), OneByOne(start)
        clock, seen = 1000, []
        for _ in range(8):
            ids = []
            for _ in range(rnd.choice([0, 1, 3, 8, 9, 20])):
                r = rnd.random()
                if r < 0.05:
                    ids.append(os.urandom(16) if rnd.random() < 0.5 else b"\xff" * 16)  # not clock ids
                elif r < 0.15 and seen:
                    ids.append(rnd.choice(seen))  # one stored before
                else:
                    ids.append(clock_id(clock + rnd.choice([0, 0, 0, 0, 1, -1, 2])))
            clock += rnd.randint(0, 1)
            assert fast.maybe_stored(ids) == slow.maybe_stored(ids)
            if rnd.random() < 0.7:
                fast.stored(ids)
                slow.stored(ids)
                seen += ids
                assert (fast.top, fast.recent) == (slow.top, slow.recent)
