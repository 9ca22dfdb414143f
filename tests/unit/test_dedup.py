"""DedupWindow's batch calls (a DELIVER's offers, a burst's acks) leave the
window exactly as the one-key calls would, its bound included."""

import random

from murano_zmq.protocol.dedup import DedupWindow


def state(w: DedupWindow) -> tuple:
    return dict(w._in_app), list(w._settled)


def test_offer_many_and_settle_done_are_the_one_key_calls_in_order():
    rnd = random.Random(3)
    for _ in range(500):
        one, many = DedupWindow(size=5), DedupWindow(size=5)
        for _ in range(6):
            keys = [("m", bytes([rnd.randrange(12)])) for _ in range(rnd.randint(0, 8))]
            owner = rnd.randrange(3)
            assert many.offer_many(keys, owner) == [one.offer(k, owner) for k in keys]
            assert state(many) == state(one)
            done = rnd.sample(keys, rnd.randint(0, len(keys))) + [("m", bytes([rnd.randrange(12)]))]
            for k in done:
                one.settle(k, True)
            many.settle_done(done)
            assert state(many) == state(one)
