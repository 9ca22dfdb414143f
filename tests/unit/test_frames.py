"""The frame codec and the wire records: pure tests, no sockets.

The invariant the fuzz tests hold (as h11's fuzz harness does): any list of
byte strings either decodes to a Command or raises RemoteProtocolError,
never anything else.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from murano_zmq.protocol.constants import SIGNATURE
from murano_zmq.protocol.errors import RemoteProtocolError, VersionMismatch
from murano_zmq.protocol.frames import SCHEMAS, Cmd, Command, check_fields, decode, encode
from murano_zmq.protocol.message import (
    ID_SIZE,
    IncomingSend,
    Message,
    parse_delivery,
    parse_send_record,
    send_record,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------------------

# Values that survive a msgpack round trip unchanged (no tuples, no NaN).
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), children, max_size=4),
    ),
    max_leaves=12,
)

_KIND_STRATEGIES = {
    "int": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "num": st.one_of(st.integers(-(2**31), 2**31), st.floats(allow_nan=False)),
    "str": st.text(max_size=30),
    "bin": st.binary(max_size=30),
    "bool": st.booleans(),
    "map": st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4),
    "list": st.lists(msgpack_values, max_size=4),
    "any": msgpack_values,
}


def field_strategy(kind: str):
    if kind.endswith("?"):
        return st.one_of(st.none(), _KIND_STRATEGIES[kind[:-1]])
    return _KIND_STRATEGIES[kind]


@st.composite
def valid_commands(draw, cmd=None):
    cmd = cmd if cmd is not None else draw(st.sampled_from(list(Cmd)))
    fields = tuple(draw(field_strategy(kind)) for kind in SCHEMAS[cmd])
    return cmd, fields


def assert_decodes_or_protocol_error(frames):
    try:
        result = decode(frames)
    except RemoteProtocolError:
        return None
    # Anything else escaping decode() fails the test with its traceback.
    assert isinstance(result, Command)
    assert isinstance(result.cmd, Cmd)
    assert isinstance(result.fields, tuple)
    assert len(result.fields) == len(SCHEMAS[result.cmd])
    return result


# --- round trip ------------------------------------------------------------------------

# One hand-written example per command, so a schema change shows up by name.
EXAMPLES = {
    Cmd.HELLO: ("node-1", b"\x01" * 16, 1.5),
    Cmd.WELCOME: ("relay", 1.0, 16 * 1024 * 1024),
    Cmd.DECLARE: (7, "agent.env.unit", {"ttl": 60, "dead_letter": "dlq"}),
    Cmd.SEND: (8, [send_record(b"\x02" * 16, "conductor", {"k": "v"}, b"\xa3abc", 1.0, None)]),
    Cmd.CONFIRM: (8, [[0, 429, "mailbox full"]]),
    Cmd.CONSUME: (9, 1, "conductor", 100, None, 1 << 20),
    Cmd.CANCEL: (0, 1),
    Cmd.DELIVER: (1, [[5, b"\x02" * 16, "conductor", b"", b"\xc0", 1.0, None, 1]]),
    Cmd.ACK: ([1, 2, 3],),
    Cmd.NACK: ([4], True),
    Cmd.HEARTBEAT: (),
    Cmd.STATUS: (10,),
    Cmd.REPLY: (10, {"relay": "r", "mailboxes": []}),
    Cmd.ERROR: (None, 409, "say HELLO first"),
    Cmd.BYE: ("node closing",),
    Cmd.DELETE: (11, "agent.env.unit"),
    Cmd.LOOKUP: (12, "conductor"),
    Cmd.PURGE: (13, "dead"),
    Cmd.MOVE: (14, "dead", "work", None),
    Cmd.PEEK: (15, "work", 10),
}


def test_consume_may_leave_out_prefetch_bytes():
    # CONSUME's last field came later: a node that does not send it gets nil.
    assert decode(encode(Cmd.CONSUME, 9, 1, "conductor", 100, None)).fields == (9, 1, "conductor", 100, None, None)
    with pytest.raises(RemoteProtocolError):
        decode(encode(Cmd.CONSUME, 9, 1, "conductor", 100))


def test_every_command_has_an_example():
    assert set(EXAMPLES) == set(Cmd)


@pytest.mark.parametrize("cmd", list(EXAMPLES), ids=lambda c: c.name)
def test_round_trip_example(cmd):
    fields = EXAMPLES[cmd]
    frames = encode(cmd, *fields)
    assert len(frames) == 3
    assert frames[0] == SIGNATURE
    assert frames[1] == bytes([cmd])
    decoded = decode(frames)
    assert decoded.cmd is cmd
    assert decoded.fields == fields


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_round_trip_any_valid_fields(cmd, data):
    _, fields = data.draw(valid_commands(cmd))
    decoded = decode(encode(cmd, *fields))
    assert decoded == Command(cmd, fields)


def test_error_with_integer_request():
    assert decode(encode(Cmd.ERROR, 5, 404, "no such mailbox")).fields == (5, 404, "no such mailbox")


def test_frames_are_bytes():
    for frame in encode(Cmd.STATUS, 1):
        assert isinstance(frame, bytes)


# --- rejections, one by one --------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_wrong_frame_count(count):
    frames = (encode(Cmd.STATUS, 1) + [b"extra", b"extra"])[:count]
    with pytest.raises(RemoteProtocolError, match="3 frames"):
        decode(frames)


def test_bad_signature():
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode([b"AMQP", bytes([Cmd.STATUS]), msgpack.packb([1])])


def test_other_version_is_named():
    with pytest.raises(VersionMismatch, match="version 1") as info:
        decode([b"MZQ\x01", bytes([Cmd.STATUS]), msgpack.packb([1])])
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.code == 426


@pytest.mark.parametrize("cmd_frame", [b"", b"\x0c\x0c", b"\x00", b"\x11", b"\xff"])
def test_bad_command_frame(cmd_frame):
    with pytest.raises(RemoteProtocolError):
        decode([SIGNATURE, cmd_frame, msgpack.packb([1])])


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", msgpack.packb([1]) + b"\x00"])
def test_bad_msgpack(payload):
    with pytest.raises(RemoteProtocolError, match="msgpack"):
        decode([SIGNATURE, bytes([Cmd.STATUS]), payload])


@pytest.mark.parametrize(
    "cmd, fields",
    [
        (Cmd.STATUS, ()),  # too few
        (Cmd.STATUS, (1, 2)),  # too many
        (Cmd.STATUS, ("1",)),  # str for int
        (Cmd.STATUS, (True,)),  # bool is not an int on the wire
        (Cmd.STATUS, (1.0,)),  # float is not an int
        (Cmd.HELLO, ("n", "not-bin", 1.0)),
        (Cmd.HELLO, ("n", b"i", False)),  # bool is not a num
        (Cmd.HELLO, ("n", b"i", None)),  # nil only where the schema says "?"
        (Cmd.DECLARE, (1, "mb", [])),
        (Cmd.SEND, (1, {})),
        (Cmd.NACK, ([1], 1)),
        (Cmd.ERROR, ("x", 400, "t")),
        (Cmd.BYE, (b"bytes",)),
        (Cmd.CONSUME, (1, 1, "mb", 10, b"tcp://bin")),  # endpoint is str or nil
        (Cmd.LOOKUP, (1, None)),
    ],
)
def test_field_type_errors(cmd, fields):
    with pytest.raises(RemoteProtocolError):
        decode(encode(cmd, *fields))


@pytest.mark.parametrize("payload", [msgpack.packb({"a": 1}), msgpack.packb(5), msgpack.packb(None),
                                     msgpack.packb("str"), msgpack.packb(b"bin")])
def test_payload_not_an_array(payload):
    with pytest.raises(RemoteProtocolError):
        decode([SIGNATURE, bytes([Cmd.HEARTBEAT]), payload])


def test_check_fields_rejects_non_sequences():
    with pytest.raises(RemoteProtocolError):
        check_fields(Cmd.STATUS, {"req": 1})


# --- fuzz: decodes or RemoteProtocolError, nothing else --------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=6))
@example([])
@example([SIGNATURE, b"\x0b", b"\x90"])
def test_fuzz_any_frames(frames):
    assert_decodes_or_protocol_error(frames)


@FUZZ
@given(cmd=st.integers(0, 255), payload=st.binary(max_size=80))
@example(cmd=Cmd.SEND, payload=b"\xdd\xff\xff\xff\xff")  # array of 2**32-1 items, no data
@example(cmd=Cmd.SEND, payload=b"\x91" * 2000 + b"\x00")  # nesting deeper than msgpack's stack
@example(cmd=Cmd.REPLY, payload=b"\x92\x01\xd6\xff\x00\x00\x00\x00")  # timestamp ext
@example(cmd=Cmd.REPLY, payload=b"\x92\x01\xc7\x01\xff\x00")  # malformed timestamp ext
@example(cmd=Cmd.DECLARE, payload=b"\x93\x01\xa1x\x81\x90\x00")  # map with a list key
@example(cmd=Cmd.BYE, payload=b"\x91\xa2\xed\xa0")  # UTF-8 surrogate in a str
def test_fuzz_valid_signature_random_payload(cmd, payload):
    assert_decodes_or_protocol_error([SIGNATURE, bytes([cmd]), payload])


@FUZZ
@given(cmd=st.sampled_from(list(Cmd)), value=msgpack_values)
def test_fuzz_valid_msgpack_wrong_shape(cmd, value):
    assert_decodes_or_protocol_error([SIGNATURE, bytes([cmd]), msgpack.packb(value)])


@FUZZ
@given(cmd=st.sampled_from(list(Cmd)), data=st.data())
def test_fuzz_right_count_random_fields(cmd, data):
    fields = data.draw(st.lists(msgpack_values, min_size=len(SCHEMAS[cmd]), max_size=len(SCHEMAS[cmd])))
    assert_decodes_or_protocol_error(encode(cmd, *fields))


@FUZZ
@given(valid=valid_commands(), data=st.data())
def test_fuzz_one_field_replaced(valid, data):
    cmd, fields = valid
    if not fields:
        return
    index = data.draw(st.integers(0, len(fields) - 1))
    garbage = data.draw(msgpack_values)
    mutated = list(fields)
    mutated[index] = garbage
    result = assert_decodes_or_protocol_error(encode(cmd, *mutated))
    if result is not None:
        assert result.fields == tuple(mutated)


@FUZZ
@given(valid=valid_commands(), data=st.data())
def test_fuzz_truncated_and_flipped_payload(valid, data):
    cmd, fields = valid
    frames = encode(cmd, *fields)
    payload = frames[2]
    cut = data.draw(st.integers(0, len(payload)))
    assert_decodes_or_protocol_error([frames[0], frames[1], payload[:cut]])
    if payload:
        pos = data.draw(st.integers(0, len(payload) - 1))
        byte = data.draw(st.integers(0, 255))
        flipped = payload[:pos] + bytes([byte]) + payload[pos + 1:]
        assert_decodes_or_protocol_error([frames[0], frames[1], flipped])


@FUZZ
@given(valid=valid_commands(), frame=st.integers(0, 2), junk=st.binary(max_size=8))
def test_fuzz_frame_replaced(valid, frame, junk):
    frames = encode(*valid[:1], *valid[1])
    frames[frame] = junk
    assert_decodes_or_protocol_error(frames)


# --- SEND records ---------------------------------------------------------------------


def good_send_record():
    return [b"\x07" * ID_SIZE, "agent.env-1.unit_2", msgpack.packb({"reply-to": "conductor"}), b"\xa2hi",
            12.5, 30, False]


def test_parse_send_record_good():
    parsed = parse_send_record(good_send_record())
    headers = msgpack.packb({"reply-to": "conductor"})
    assert parsed == IncomingSend(b"\x07" * ID_SIZE, "agent.env-1.unit_2", headers,
                                  b"\xa2hi", 12.5, 30, False, 3 + len(headers))
    assert isinstance(parsed.created, float)


def test_parse_send_record_from_send_record():
    record = send_record(b"\x01" * ID_SIZE, "mb", None, b"\xc0", 1, None)
    parsed = parse_send_record(record)
    assert parsed.headers == b"" and parsed.ttl is None and parsed.retry is False
    assert parsed.size == 1  # no headers: the body alone


def test_headers_are_packed_once_and_travel_as_bin():
    record = send_record(b"\x01" * ID_SIZE, "mb", {"k": "v"}, b"\xc0", 1, None)
    assert record[2] == msgpack.packb({"k": "v"})
    assert send_record(b"\x01" * ID_SIZE, "mb", record[2], b"\xc0", 1, None) == record
    parsed = parse_send_record(decode(encode(Cmd.SEND, 1, [record])).fields[1][0])
    assert parsed.headers == record[2] and parsed.size == 1 + len(record[2])


def test_parse_send_record_survives_the_wire():
    record = good_send_record()
    decoded = decode(encode(Cmd.SEND, 1, [record]))
    assert parse_send_record(decoded.fields[1][0]) == parse_send_record(record)


BAD_SEND_FIELDS = [
    (0, b"\x07" * (ID_SIZE - 1)),
    (0, b"\x07" * (ID_SIZE + 1)),
    (0, "7" * ID_SIZE),
    (0, None),
    (1, ""),
    (1, "has space"),
    (1, "slash/name"),
    (1, "x" * 256),
    (1, b"mb"),
    (1, 5),
    (2, None),
    (2, []),
    (2, {}),
    (2, {"k": "a map, not packed"}),
    (2, msgpack.packb({1: "int key"})),
    (2, msgpack.packb({b"bin": "bin key"})),
    (2, msgpack.packb([1, 2])),
    (2, b"\xc1"),
    (2, msgpack.packb({"k": 1}) + b"\x00"),
    (3, "str body"),
    (3, None),
    (3, 5),
    (4, "now"),
    (4, None),
    (4, True),
    (5, 0),
    (5, -1),
    (5, -0.5),
    (5, "10"),
    (5, True),
    (6, None),
    (6, 0),
    (6, "yes"),
]


@pytest.mark.parametrize("index, value", BAD_SEND_FIELDS)
def test_parse_send_record_rejects_bad_field(index, value):
    record = good_send_record()
    record[index] = value
    with pytest.raises(RemoteProtocolError):
        parse_send_record(record)


@pytest.mark.parametrize("value", [None, 5, "rec", {}, (), [], good_send_record()[:6],
                                   good_send_record() + [None], tuple(good_send_record())])
def test_parse_send_record_rejects_bad_shape(value):
    with pytest.raises(RemoteProtocolError):
        parse_send_record(value)


@pytest.mark.parametrize("index", [4, 5])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_parse_send_record_rejects_non_finite_times(index, value):
    # NaN <= 0 is False: a NaN ttl would pass a naive check and stop the
    # relay's expiry timers.
    record = good_send_record()
    record[index] = value
    with pytest.raises(RemoteProtocolError):
        parse_send_record(record)


@FUZZ
@given(value=msgpack_values)
def test_fuzz_parse_send_record(value):
    try:
        parsed = parse_send_record(value)
    except RemoteProtocolError:
        return
    assert isinstance(parsed, IncomingSend)


@FUZZ
@given(index=st.integers(0, 6), value=msgpack_values)
def test_fuzz_parse_send_record_one_field(index, value):
    record = good_send_record()
    record[index] = value
    try:
        parsed = parse_send_record(record)
    except RemoteProtocolError:
        return
    assert isinstance(parsed.msg_id, bytes) and len(parsed.msg_id) == ID_SIZE
    assert isinstance(parsed.body, bytes)
    assert isinstance(parsed.headers, bytes)
    assert isinstance(parsed.retry, bool)


# --- DELIVER records ---------------------------------------------------------------------


def good_delivery():
    return [42, b"\x09" * ID_SIZE, "conductor", msgpack.packb({"x": 1}), msgpack.packb({"task": 1}), 3.0, None, 2]


def test_parse_delivery_good():
    m = parse_delivery(good_delivery())
    assert isinstance(m, Message)
    assert (m.tag, m.id, m.mailbox, m.headers) == (42, b"\x09" * ID_SIZE, "conductor", {"x": 1})
    assert m.body == {"task": 1}
    assert m.created_at == 3.0 and m.expires_at is None
    assert m.delivery_count == 2 and m.redelivered
    assert not m.settled


def test_parse_delivery_first_delivery_not_redelivered():
    record = good_delivery()
    record[7] = 1
    record[6] = 99.5
    m = parse_delivery(record)
    assert not m.redelivered and m.expires_at == 99.5


BAD_DELIVERY_FIELDS = [
    (0, "42"),
    (0, None),
    (1, "id"),
    (1, None),
    (2, b"conductor"),
    (3, []),
    (3, None),
    (3, {"x": 1}),
    (3, b"\xc1"),
    (4, "body"),
    (5, "created"),
    (5, None),
    (6, "never"),
    (7, None),
    (7, 1.0),
]


@pytest.mark.parametrize("index, value", BAD_DELIVERY_FIELDS)
def test_parse_delivery_rejects_bad_field(index, value):
    record = good_delivery()
    record[index] = value
    with pytest.raises(RemoteProtocolError):
        parse_delivery(record)


@pytest.mark.parametrize("value", [None, 1, {}, [], good_delivery()[:7], good_delivery() + [0],
                                   tuple(good_delivery())])
def test_parse_delivery_rejects_bad_shape(value):
    with pytest.raises(RemoteProtocolError):
        parse_delivery(value)


@FUZZ
@given(index=st.integers(0, 7), value=msgpack_values)
def test_fuzz_parse_delivery_one_field(index, value):
    record = good_delivery()
    record[index] = value
    try:
        m = parse_delivery(record)
    except RemoteProtocolError:
        return
    assert isinstance(m, Message)


@FUZZ
@given(value=msgpack_values)
def test_fuzz_parse_delivery(value):
    try:
        parse_delivery(value)
    except RemoteProtocolError:
        pass
