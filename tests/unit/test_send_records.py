"""send_many's records (node/common.py build_records) and the confirm of a
send_many's batch (Dispatcher): the short ways for the usual shapes must
give what the general ones give, and fail the same way."""

from __future__ import annotations

import concurrent.futures

import pytest

from murano_zmq.node.common import Dispatcher, SendGroup, build_record, build_records
from murano_zmq.protocol import message
from murano_zmq.protocol.client import Confirmed, Failed
from murano_zmq.protocol.constants import ID_CLOCK_BYTES, ID_SIZE, KEPT_PACKER_BUFFER
from murano_zmq.protocol.errors import LocalProtocolError, MessageTooLarge, RelayError

pytestmark = pytest.mark.timeout(30)

NOW = 1_700_000_000.25


def test_usual_pairs_give_build_records_records():
    bodies = [b"x" * 10, {"a": 1}, "text", 7, None]
    records = build_records([("m.one", b) for b in bodies], NOW, 1 << 20)
    for record, body in zip(records, bodies):
        general = build_record("m.one", body, None, None, NOW, 1 << 20)
        assert record[1:] == general[1:]
        assert type(record[0]) is bytes and len(record[0]) == ID_SIZE
        assert record[0][:ID_CLOCK_BYTES] == general[0][:ID_CLOCK_BYTES]  # the same clock
    assert len({r[0] for r in records}) == len(records)


def test_other_shapes_keep_their_order_and_options():
    records = build_records([("a", 1), ("b", 2, {"h": "v"}), ("c", 3, None, 5.0), ("d", 4)], NOW, None)
    assert [r[1] for r in records] == ["a", "b", "c", "d"]
    assert records[1][2] == message.pack_headers({"h": "v"})
    assert records[2][5] == 5.0 and records[3][5] is None


@pytest.mark.parametrize("messages, error, text", [
    ([("ok", 1), ("bad name!", 2)], LocalProtocolError, "invalid mailbox name"),
    ([("ok", 1), ("ok", object())], LocalProtocolError, "not msgpack-serialisable"),
    ([("ok", 1), ["ok", 2]], LocalProtocolError, "tuples"),
    ([("ok", 1), ("ok",)], LocalProtocolError, "tuples"),
    ([("ok", b"x" * 10), ("ok", b"x" * 200)], MessageTooLarge, "over the relay's limit of 100"),
])
def test_a_bad_message_fails_the_call_and_leaves_the_packers_sound(messages, error, text):
    with pytest.raises(error, match=text):
        build_records(messages, NOW, 100)
    assert message.pack_body([1, 2]) == b"\x92\x01\x02"  # the kept Packers still pack
    assert build_records([("ok", 3)], NOW, 100)[0][3] == b"\x03"


def test_a_packer_grown_past_the_kept_size_is_not_kept():
    before = len(message._free_packers)
    build_records([("big", b"x" * (KEPT_PACKER_BUFFER + 1))], NOW, None)
    assert len(message._free_packers) <= before  # taken, and not given back
    build_records([("small", b"x")], NOW, None)
    assert len(message._free_packers) >= 1


def test_new_message_ids_are_unique_and_share_the_clock():
    ids = message.new_message_ids(NOW, 1000)
    assert len(set(ids)) == 1000
    assert {i[:ID_CLOCK_BYTES] for i in ids} == {message.new_message_id(NOW)[:ID_CLOCK_BYTES]}


def _group(n: int):
    future = concurrent.futures.Future()
    records = build_records([("m", i) for i in range(n)], NOW, None)
    return future, SendGroup(future, [r[0] for r in records]), records


def test_a_batch_of_one_send_many_is_confirmed_at_once():
    future, group, records = _group(5)
    dispatch = Dispatcher()
    dispatch.sends[1] = ([group] * 3, records[:3])
    dispatch.sends[2] = ([group] * 2, records[3:])
    dispatch.apply([Confirmed(1, {})])
    assert not future.done()
    dispatch.apply([Confirmed(2, {})])
    assert future.result(0) == [r[0] for r in records]
    assert dispatch.sends == {}


def test_a_batch_with_an_error_or_mixed_waiters_goes_record_by_record():
    future, group, records = _group(3)
    single = concurrent.futures.Future()
    dispatch = Dispatcher()
    dispatch.sends[1] = ([group, group, single], records)
    error = RelayError("refused")
    dispatch.apply([Confirmed(1, {1: error})])
    assert future.exception(0) is error
    assert single.result(0) == records[2][0]

    future, group, records = _group(2)
    dispatch.sends[2] = ([group, group], records)
    dispatch.apply([Failed(2, error)])
    assert future.exception(0) is error


def test_take_batch_fails_a_record_over_the_relay_limit_and_sends_the_rest():
    from collections import deque

    from murano_zmq.node.common import take_batch

    records = build_records([("m", b"x" * 10), ("m", b"x" * 500), ("m", b"x" * 20)], NOW, None)
    futures = [concurrent.futures.Future() for _ in records]
    queue = deque(zip(records, futures))
    dropped: list = []
    sent, waiters = take_batch(queue, 100, dropped)
    assert sent == [records[0], records[2]] and waiters == [futures[0], futures[2]]
    assert dropped == [records[1]] and not queue
    with pytest.raises(MessageTooLarge, match="over the relay's limit of 100"):
        futures[1].result(0)
