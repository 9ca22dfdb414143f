"""What a subscription holds for a slow reader is bounded: events past
SUBSCRIPTION_EVENTS or SUBSCRIPTION_BYTES are dropped and counted (a 50 ms
callback on 64 KiB events grew a subscriber by 1 GB in 2 s)."""

from __future__ import annotations

import asyncio
import types

import pytest

from murano_zmq.node import handles
from murano_zmq.node.handles import AsyncSubscription, Subscription
from murano_zmq.protocol.topics import TopicEvent


def event(i: int, size: int = 10) -> TopicEvent:
    return TopicEvent("progress.x", "pub", bytes([i % 256]) * size, float(i))


@pytest.fixture
def small_bounds(monkeypatch):
    monkeypatch.setattr(handles, "SUBSCRIPTION_EVENTS", 5)
    monkeypatch.setattr(handles, "SUBSCRIPTION_BYTES", 100)


def test_a_subscription_drops_the_events_past_its_count_and_takes_again_once_read(small_bounds, caplog):
    sub = Subscription(types.SimpleNamespace(), 1, "progress.")
    sub._feed([event(i) for i in range(8)])
    assert sub.dropped == 3
    assert "new events dropped" in caplog.text
    assert [sub.get(timeout=0).created for _ in range(2)] == [0.0, 1.0]
    sub._feed([event(i) for i in range(8, 11)])  # room for two
    assert sub.dropped == 4
    assert [sub.get(timeout=0).created for _ in range(5)] == [2.0, 3.0, 4.0, 8.0, 9.0]
    assert sub.get(timeout=0) is None


def test_a_subscription_drops_the_events_past_its_bytes(small_bounds):
    sub = Subscription(types.SimpleNamespace(), 1, "progress.")
    sub._feed([event(0, 60), event(1, 60), event(2, 40), event(3, 1)])
    assert sub.dropped == 2  # 60 + 60 did not fit in 100, 60 + 40 did, then one more byte did not
    assert [sub.get(timeout=0).created for _ in range(2)] == [0.0, 2.0]
    assert sub.get(timeout=0) is None


def test_an_async_subscription_drops_alike(small_bounds):
    async def main():
        sub = AsyncSubscription(types.SimpleNamespace(_closed=False), 1, "progress.")
        sub._feed([event(i) for i in range(8)])
        got = [(await sub.get(timeout=0.1)).created for _ in range(5)]
        sub._feed([event(9)])
        return sub.dropped, got, (await sub.get(timeout=0.1)).created

    assert asyncio.run(main()) == (3, [0.0, 1.0, 2.0, 3.0, 4.0], 9.0)
