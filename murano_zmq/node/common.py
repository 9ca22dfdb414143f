"""What Node and AsyncNode share: argument checks, record building, batching,
and turning the core's events into completed futures.

Futures are concurrent.futures.Future for Node and asyncio.Future for
AsyncNode; both have done(), set_result() and set_exception().
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterable

from ..protocol.client import (
    Confirmed,
    Delivered,
    Failed,
    RelayLost,
    RelayProblem,
    Replied,
    Welcomed,
)
from ..protocol.constants import MAX_SECONDS, SEND_BATCH, SEND_BATCH_BYTES  # noqa: F401 (SEND_BATCH_BYTES re-exported)
from ..protocol.errors import LocalProtocolError, MessageTooLarge
from ..protocol.frames import Cmd
from ..protocol.message import (ID_SIZE, PACK_ERRORS, check_name, count_down_ttl, give_packer, is_number,
                                new_message_id, new_message_ids, pack_body, pack_headers, take_packer, ttl_passed,
                                unpackable_body)
from ..protocol.options import MailboxOptions

log = logging.getLogger("murano_zmq.node")

# Requests dropped when their caller's wait times out: reads nobody waits
# for any more (a status poll during an outage piled up, to be replayed all
# at once).  A DECLARE or DELETE stays pending, replayed after a reconnect.
FORGOTTEN_ON_TIMEOUT = frozenset({Cmd.STATUS})


def check_wait(value: Any, what: str = "timeout") -> float:
    """`value` if it is a number of seconds to wait, else ValueError: nan
    waited for ever, 0 or less failed at once after the send went out."""
    if not is_number(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"{what} must be a number of seconds > 0 and <= {MAX_SECONDS:g}, got {value!r}")
    return value


def declare_options(ttl=None, message_ttl=None, max_length=None, max_bytes=None,
                    overflow="reject", dead_letter=None, passive=False, delivery_limit=None) -> dict:
    """The DECLARE options map; ValueError names a bad argument."""
    options = MailboxOptions(ttl, message_ttl, max_length, max_bytes, overflow, dead_letter,
                             delivery_limit).to_map()
    if passive:
        options["passive"] = True
    return options


def build_record(mailbox: str, body: Any, headers: dict | None, ttl: float | None, now: float,
                 max_size: int | None, msg_id: bytes | None = None) -> list:
    """A SEND record for one message, checked before it leaves the node.
    `msg_id`: the caller's own id (an idempotency key, see idempotent_id())."""
    if msg_id is not None and (not isinstance(msg_id, bytes) or len(msg_id) != ID_SIZE):
        raise LocalProtocolError(f"msg_id must be {ID_SIZE} bytes")
    check_name(mailbox)
    if headers is not None and not isinstance(headers, dict):
        raise LocalProtocolError("headers must be a dict with str keys")
    if ttl is not None and not (is_number(ttl) and ttl > 0):
        raise LocalProtocolError(f"ttl must be a positive number of seconds, got {ttl!r}")
    packed = pack_body(body)
    packed_headers = pack_headers(headers) if headers else b""  # once: they travel and are stored packed
    check_size(len(packed) + len(packed_headers), max_size)
    # send_record()'s list, made here: a call less on every send
    return [msg_id or new_message_id(now), mailbox, packed_headers, packed, now, ttl, False]


def record_size(record: list) -> int:
    """Body and header bytes of a SEND record (what the relay's limit counts)."""
    return len(record[3]) + len(record[2])


def pairs_size(pairs) -> int:
    """Body and header bytes of the records of (record, waiter) pairs."""
    return sum([len(record[3]) + len(record[2]) for record, _ in pairs])


def check_size(size: int, max_size: int | None) -> None:
    if max_size is not None and size > max_size:
        raise too_large(size, max_size)


def too_large(size: int, max_size: int) -> MessageTooLarge:
    return MessageTooLarge(f"message of {size} bytes is over the relay's limit of {max_size}")


_UNCHECKED = object()


def build_records(messages: Iterable[tuple], now: float, max_size: int | None) -> list[list]:
    """SEND records for send_many's (mailbox, body[, headers[, ttl]]) tuples.
    The usual (mailbox, body) pair takes a short way: build_record()'s
    checks and record, inline, with one kept Packer and one clock for the
    whole call (a third of a pipelined send's client CPU went here)."""
    messages = list(messages)
    records = []
    append = records.append
    ids = iter(new_message_ids(now, len(messages)))
    checked = _UNCHECKED  # the last mailbox name checked
    pack, largest = take_packer(), 0
    try:  # (a failed call drops the Packer: a body that failed may have grown its buffer)
        for m in messages:
            if type(m) is tuple and len(m) == 2:
                mailbox, body = m
                if mailbox is not checked:
                    checked = check_name(mailbox)
                packed = pack(body)
                size = len(packed)
                if size > largest:
                    largest = size
                    check_size(size, max_size)
                append([next(ids), mailbox, b"", packed, now, None, False])
                continue
            if not isinstance(m, tuple) or not 2 <= len(m) <= 4:
                raise LocalProtocolError(
                    f"send_many takes (mailbox, body[, headers[, ttl]]) tuples, got {m!r}"[:200])
            mailbox, body, headers, ttl = (*m, None, None)[:4]
            append(build_record(mailbox, body, headers, ttl, now, max_size))
    except PACK_ERRORS as exc:  # pack()'s: build_record() raises its own kind
        raise unpackable_body(exc) from None
    give_packer(pack, largest)
    return records


def take_batch(queue: deque, max_size: int, dropped: list | None = None,
               now: float = 0.0) -> tuple[list, list]:
    """Pop up to one SEND's worth of (record, future) pairs off `queue`.

    Called once the relay's WELCOME gave its limit: a record over it fails
    here, since a frame over the relay's ZMQ_MAXMSGSIZE would be dropped
    with the connection, silently.  A record's ttl loses the time it
    waited since it was made (`now`, its `created`); one whose ttl passed
    meanwhile fails here too (protocol/message.py ttl_passed).
    """
    records, futures = [], []
    size = 0
    while queue and len(records) < SEND_BATCH:
        record, future = queue[0]
        record_bytes = len(record[3]) + len(record[2])  # record_size(), inline: once per record
        if records and size + record_bytes > SEND_BATCH_BYTES:
            break
        queue.popleft()
        if max_size is not None and record_bytes > max_size:
            _settle_future(future, error=too_large(record_bytes, max_size))
            if dropped is not None:
                dropped.append(record)
            continue
        if record[5] is not None and not count_down_ttl(record, now - record[4]):
            _settle_future(future, error=ttl_passed(record))
            if dropped is not None:
                dropped.append(record)
            continue
        size += record_bytes
        records.append(record)
        futures.append(future)
    return records, futures


class SendGroup:
    """One waiter for all records of a send_many: complete when every record
    is stored, or at the first error.  Cheaper than a future per message.

    It stands where a future would (done / set_result / set_exception) for
    each record; `future` is the caller's single future for the whole group.
    """

    __slots__ = ("future", "ids", "remaining")

    def __init__(self, future, ids: list[bytes]):
        self.future = future
        self.ids = ids
        self.remaining = len(ids)
        if not ids:
            future.set_result([])

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, _msg_id: bytes) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.ids)

    def set_exception(self, error: BaseException) -> None:
        self.future.set_exception(error)

    def confirmed(self, count: int) -> None:
        """`count` of its records stored (set_result() for each, at once)."""
        if self.future.done():
            return  # the caller gave up waiting, or another record failed
        self.remaining -= count
        if self.remaining <= 0:
            self.future.set_result(self.ids)


def _settle_future(future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return  # the caller gave up waiting
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_NO_SENDS: tuple[list, list] = ([], [])


class Dispatcher:
    """Maps request ids to futures and consumer ids to sinks, and applies events."""

    def __init__(self) -> None:
        self.sends: dict[int, tuple[list, list]] = {}  # req -> (futures, records), in record order
        self.requests: dict[int, Any] = {}  # req -> future
        self.sinks: dict[int, Callable[[list], None]] = {}  # consumer id -> sink
        self.welcomed: Callable[[Welcomed], None] | None = None

    def apply(self, events: list) -> RelayLost | None:
        """Complete futures and feed consumers; returns RelayLost if one came."""
        lost = None
        for ev in events:
            if isinstance(ev, Confirmed):
                self.confirmed(ev.req, ev.errors)
            elif isinstance(ev, Delivered):
                sink = self.sinks.get(ev.consumer)
                if sink is not None:
                    sink(ev.messages)
            elif isinstance(ev, Replied):
                future = self.requests.pop(ev.req, None)
                if future is not None:
                    _settle_future(future, ev.result)
            elif isinstance(ev, Failed):
                for future in self.sends.pop(ev.req, _NO_SENDS)[0]:
                    _settle_future(future, error=ev.error)
                future = self.requests.pop(ev.req, None)
                if future is not None:
                    _settle_future(future, error=ev.error)
            elif isinstance(ev, RelayProblem):
                log.warning("relay reported: %s (code %s)", ev.error.text, ev.error.code)
            elif isinstance(ev, Welcomed):
                log.debug("connected to relay %s", ev.relay)
                if self.welcomed is not None:
                    self.welcomed(ev)
            elif isinstance(ev, RelayLost):
                lost = ev
        return lost

    def confirmed(self, req: int, errors: dict | None = None) -> None:
        """SEND `req` is confirmed: each record's waiter gets its id, or its
        error (`errors`: record index -> error)."""
        futures, records = self.sends.pop(req, _NO_SENDS)
        if not errors:
            if len(futures) == 1:  # a lone send (or a send_many of one: SendGroup.set_result)
                future = futures[0]
                if not future.done():
                    future.set_result(records[0][0])
                return
            first = futures[0] if futures else None
            if type(first) is SendGroup and futures.count(first) == len(futures):
                first.confirmed(len(futures))  # a send_many's batch: one call, not one per record
                return
            for future, record in zip(futures, records):  # each record's id, without a call per record
                if not future.done():
                    future.set_result(record[0])
            return
        for index, future in enumerate(futures):
            _settle_future(future, records[index][0], errors.get(index))

    def fail_all(self, error: BaseException) -> None:
        for futures, _ in self.sends.values():
            for future in futures:
                _settle_future(future, error=error)
        for future in self.requests.values():
            _settle_future(future, error=error)
        self.sends.clear()
        self.requests.clear()


class Orphan:
    """A waiter nobody waits on (a send_many that failed elsewhere, a caller
    that gave up): its message is still delivered."""

    __slots__ = ()

    def done(self) -> bool:
        return False

    def set_result(self, _result) -> None:
        pass

    def set_exception(self, _error: BaseException) -> None:
        pass
