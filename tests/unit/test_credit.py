"""Consumer.can_take: count credit and byte credit in one check."""

import itertools

from murano_zmq.relay.state import Consumer, Unacked


def reference(prefetch, prefetch_bytes, out_sizes, size):
    """The rule as two separate checks (has credit; the message fits)."""
    n, out = len(out_sizes), sum(out_sizes)
    has_credit = n < prefetch and (prefetch_bytes is None or out < prefetch_bytes)
    fits = prefetch_bytes is None or n == 0 or out + size <= prefetch_bytes
    return has_credit and fits


def test_can_take_is_count_credit_and_byte_credit():
    for prefetch, limit, sizes, size in itertools.product(
            [1, 2, 3], [None, 1, 5, 10], [[], [0], [3], [5], [3, 2], [10]], [0, 1, 4, 5, 6, 11]):
        c = Consumer(None, 1, None, prefetch, prefetch_bytes=limit)
        for seq, z in enumerate(sizes):
            c.hand_out(Unacked(seq, z, 1, None))
        assert c.can_take(size) == reference(prefetch, limit, sizes, size), (prefetch, limit, sizes, size)


def test_a_message_larger_than_the_byte_credit_goes_alone():
    c = Consumer(None, 1, None, 10, prefetch_bytes=100)
    assert c.can_take(1000)
    c.hand_out(Unacked(1, 1000, 1, None))
    assert not c.can_take(1)
