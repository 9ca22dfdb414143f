"""Hypothesis strategies for hostile frames: random bytes, and commands that are
well-formed up to the point where they are not (valid signature and command
byte, msgpack fields of random types and sizes)."""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

from murano_zmq.protocol.constants import SIGNATURE
from murano_zmq.protocol.frames import SCHEMAS, Cmd, encode

# Any msgpack value: the field a hostile peer would put anywhere.
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=10) | st.integers(min_value=-(2**63), max_value=2**64 - 1),
                      children, max_size=6),
    max_leaves=25,
)

# Values that fit a schema kind, so decoding gets past the type checks and
# the handlers see hostile *contents*.
_KIND = {
    "int": st.integers(min_value=0, max_value=3) | st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "num": st.integers(min_value=-(2**31), max_value=2**31) | st.floats(allow_nan=True),
    "str": st.text(max_size=40) | st.sampled_from(["keep", "agent.e1.u1", "x" * 300, "", "a b"]),
    "bin": st.binary(max_size=40),
    "bool": st.booleans(),
    "map": st.dictionaries(st.text(max_size=12) | st.sampled_from(["ttl", "max_length", "overflow",
                                                                   "dead_letter", "passive"]),
                           values, max_size=5),
    # records: SEND has 7 fields, DELIVER 8, CONFIRM entries 3
    "list": st.lists(values, max_size=6) | st.lists(
        st.integers(min_value=3, max_value=8).flatmap(lambda n: st.lists(values, min_size=n, max_size=n))
        | st.tuples(st.integers(0, 3), values, values).map(list), max_size=4),
    "any": values,
}


def _field(kind: str):
    optional = kind.endswith("?")
    s = _KIND[kind.rstrip("?")]
    return st.none() | s if optional else s


@st.composite
def typed_command(draw, commands=tuple(Cmd)):
    """A command whose fields fit its schema (so it decodes) with hostile contents."""
    cmd = draw(st.sampled_from(commands))
    fields = [draw(_field(kind)) for kind in SCHEMAS[cmd]]
    return encode(cmd, *fields)


@st.composite
def loose_command(draw):
    """A signature and command byte that may be right, and any msgpack payload."""
    sig = draw(st.sampled_from([SIGNATURE, b"MZQ\x01", b"MZQ", b""]) | st.binary(max_size=6))
    cmd = draw(st.sampled_from([bytes([c]) for c in Cmd]) | st.binary(max_size=3))
    payload = draw(st.builds(lambda v: msgpack.packb(v, use_bin_type=True), values) | st.binary(max_size=60))
    return [sig, cmd, payload]


raw_frames = st.lists(st.binary(max_size=64), min_size=0, max_size=5)

hostile_frames = st.one_of(raw_frames, loose_command(), typed_command())
