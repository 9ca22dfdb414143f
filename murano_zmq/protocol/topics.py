"""Topic events (PUB/SUB): the frames of one published event, and back.

    frame 0: the topic, UTF-8 (subscriptions match its prefix)
    frame 1: the signature, b"MZQ" + version byte
    frame 2: msgpack [publisher name, body (packed msgpack value), created]

Topics are cheap and lossy by design (see docs/architecture.md): no ack, no
store, a slow subscriber loses what overflows its high-water mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .constants import MAX_NAME_LENGTH, SIGNATURE
from .errors import LocalProtocolError, RemoteProtocolError
from .message import is_number, unpack_body


@dataclass(frozen=True, slots=True)
class TopicEvent:
    topic: str
    publisher: str
    packed_body: bytes
    created: float

    @property
    def body(self) -> Any:
        return unpack_body(self.packed_body)


def check_topic(topic: Any) -> bytes:
    if not isinstance(topic, str) or not topic or len(topic) > MAX_NAME_LENGTH:
        raise LocalProtocolError(f"a topic is 1-{MAX_NAME_LENGTH} characters, got {topic!r}"[:200])
    return topic.encode("utf-8")


def encode_event(topic: str, publisher: str, packed_body: bytes, created: float) -> list[bytes]:
    return [check_topic(topic), SIGNATURE, msgpack.packb([publisher, packed_body, created], use_bin_type=True)]


def decode_event(frames: list[bytes]) -> TopicEvent:
    if len(frames) != 3 or frames[1] != SIGNATURE:
        raise RemoteProtocolError("a topic event is 3 frames: topic, signature, payload")
    try:
        topic = frames[0].decode("utf-8")
        publisher, body, created = msgpack.unpackb(frames[2], raw=False)
    except Exception as exc:
        raise RemoteProtocolError(f"bad topic event: {exc}") from None
    if not (isinstance(publisher, str) and isinstance(body, bytes) and is_number(created)):
        raise RemoteProtocolError("bad topic event fields")
    return TopicEvent(topic, publisher, body, float(created))
