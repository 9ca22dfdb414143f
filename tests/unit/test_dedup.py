"""DedupWindow's batch calls (a DELIVER's offers, a burst's acks) leave the
window exactly as the one-key calls would, its bound included."""

import random

from murano_zmq.protocol.dedup import ACKED, FRESH, IN_APP, REJECTED, DedupWindow


def state(w: DedupWindow) -> tuple:
    return dict(w._in_app), list(w._settled.items())


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


def test_a_rejected_key_is_offered_as_rejected_an_acked_one_as_acked():
    w = DedupWindow(size=5)
    for key in [("m", b"a"), ("m", b"r"), ("m", b"q")]:
        assert w.offer(key, 1) == FRESH
    w.settle(("m", b"a"), True)
    w.settle(("m", b"r"), True, rejected=True)
    w.settle(("m", b"q"), False)  # requeued: it may come again
    keys = [("m", b"a"), ("m", b"r"), ("m", b"q")]
    assert w.offer_many(keys, 2) == [ACKED, REJECTED, FRESH]
    assert [w.offer(k, 2) for k in keys] == [ACKED, REJECTED, IN_APP]
