"""The frame codec: commands to ZeroMQ frames and back.

Every command is three frames: the signature (b"MZQ" + version byte), one
command byte, and one msgpack array of the command's fields.  The ROUTER
identity frame is the I/O layer's business and never reaches this module.

decode() either returns a Command or raises RemoteProtocolError; it never
trusts the peer: frame count, signature, command byte, msgpack and the type of
every field are checked before anything else sees them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from .constants import PROTOCOL_VERSION, SIGNATURE
from .errors import RemoteProtocolError, VersionMismatch


class Cmd(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    DECLARE = 0x03
    SEND = 0x04
    CONFIRM = 0x05
    CONSUME = 0x06
    CANCEL = 0x07
    DELIVER = 0x08
    ACK = 0x09
    NACK = 0x0A
    HEARTBEAT = 0x0B
    STATUS = 0x0C
    REPLY = 0x0D
    ERROR = 0x0E
    BYE = 0x0F
    DELETE = 0x10
    LOOKUP = 0x11
    # Admin commands (relay/admin.py), numbered apart from the core's.
    PURGE = 0x20
    MOVE = 0x21
    PEEK = 0x22


_CMD_BYTES = {c: bytes([c]) for c in Cmd}
_CMD_OF_INT: list[Cmd | None] = [None] * 256  # command byte -> Cmd (a list: no enum call per decode)
for _c in Cmd:
    _CMD_OF_INT[_c] = _c

# Field types per command, checked on decode.  "?" suffix: may be nil.
# Kinds: int, num (int or float), str, bin, bool, map, list, any.
SCHEMAS: dict[Cmd, tuple[str, ...]] = {
    Cmd.HELLO: ("str", "bin", "num"),  # node name, instance id, heartbeat s
    Cmd.WELCOME: ("str", "num", "int"),  # relay name, heartbeat s, max size
    Cmd.DECLARE: ("int", "str", "map"),  # req, mailbox, options
    Cmd.SEND: ("int", "list"),  # req, [message...]
    Cmd.CONFIRM: ("int", "list"),  # req, [[index, code, text]...]
    # req, consumer, mailbox, prefetch, direct endpoint, prefetch_bytes (may be left out)
    Cmd.CONSUME: ("int", "int", "str", "int", "str?", "int?"),
    Cmd.CANCEL: ("int", "int"),  # req, consumer
    Cmd.DELIVER: ("int", "list"),  # consumer, [delivery...]
    Cmd.ACK: ("list",),  # [tag...]
    Cmd.NACK: ("list", "bool"),  # [tag...], requeue
    Cmd.HEARTBEAT: (),
    Cmd.STATUS: ("int",),  # req
    Cmd.REPLY: ("int", "any"),  # req, result
    Cmd.ERROR: ("int?", "int", "str"),  # req or nil, code, text
    Cmd.BYE: ("str",),  # reason
    Cmd.DELETE: ("int", "str"),  # req, mailbox
    Cmd.LOOKUP: ("int", "str"),  # req, mailbox
    Cmd.PURGE: ("int", "str"),  # req, mailbox
    Cmd.MOVE: ("int", "str", "str", "int?"),  # req, mailbox, target mailbox, most messages (nil: all)
    Cmd.PEEK: ("int", "str", "int"),  # req, mailbox, count
}

# Trailing fields a sender may leave out (added in a later revision; read as nil).
OPTIONAL_TAIL: dict[Cmd, int] = {Cmd.CONSUME: 1}

_KIND_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "num": (int, float),
    "str": (str,),
    "bin": (bytes,),
    "bool": (bool,),
    "map": (dict,),
    "list": (list,),
}


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded command: its code and its positional fields."""

    cmd: Cmd
    fields: tuple

    def __repr__(self) -> str:
        return f"Command({self.cmd.name}, {len(self.fields)} fields)"


def encode(cmd: Cmd, *fields: Any) -> list[bytes]:
    """The frames that carry `cmd` with `fields`."""
    return [SIGNATURE, _CMD_BYTES[cmd], msgpack.packb(fields, use_bin_type=True)]


def encoder() -> Callable[..., list[bytes]]:
    """encode() for one thread: it keeps its own msgpack Packer (packb()
    makes and drops one per call).  Not to be shared between threads."""
    pack = msgpack.Packer(use_bin_type=True).pack
    cmd_bytes = _CMD_BYTES

    def encode_one(cmd: Cmd, *fields: Any) -> list[bytes]:
        return [SIGNATURE, cmd_bytes[cmd], pack(fields)]

    return encode_one


# Hot commands whose fields are (int, list): SEND on the relay, CONFIRM and
# DELIVER on a node.
_INT_LIST = frozenset({Cmd.SEND, Cmd.CONFIRM, Cmd.DELIVER})
assert all(SCHEMAS[c] == ("int", "list") for c in _INT_LIST)


def check_fields(cmd: Cmd, fields: Any) -> tuple:
    """`fields` as a tuple if it fits the command's schema, else raise."""
    # The hot commands in their usual shape first (the same rules: exact
    # int and list types, so a bool is no int).
    if type(fields) is list:
        if cmd in _INT_LIST:
            if len(fields) == 2 and type(fields[0]) is int and type(fields[1]) is list:
                return tuple(fields)
        elif cmd is Cmd.ACK:
            if len(fields) == 1 and type(fields[0]) is list:
                return tuple(fields)
    schema = SCHEMAS[cmd]
    fewest = len(schema) - OPTIONAL_TAIL.get(cmd, 0)
    if not isinstance(fields, (list, tuple)) or not fewest <= len(fields) <= len(schema):
        raise RemoteProtocolError(
            f"{cmd.name} takes {len(schema)} fields, got "
            f"{len(fields) if isinstance(fields, (list, tuple)) else type(fields).__name__}"
        )
    if len(fields) < len(schema):
        fields = [*fields, *([None] * (len(schema) - len(fields)))]
    for i, (kind, value) in enumerate(zip(schema, fields)):
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        if kind == "any":
            continue
        types = _KIND_TYPES[kind]
        # bool is an int in Python; keep "int" fields honest.
        if not isinstance(value, types) or (kind in ("int", "num") and isinstance(value, bool)):
            raise RemoteProtocolError(
                f"{cmd.name} field {i} must be {kind}, got {type(value).__name__}"
            )
    return tuple(fields)


def decode(frames: list[bytes]) -> Command:
    """Parse one command's frames or raise RemoteProtocolError."""
    if len(frames) != 3:
        raise RemoteProtocolError(f"a command has 3 frames, got {len(frames)}")
    signature, cmd_byte, payload = frames
    if signature != SIGNATURE:
        if len(signature) == 4 and signature[:3] == SIGNATURE[:3]:
            raise VersionMismatch(f"unsupported protocol version {signature[3]} (this side speaks {PROTOCOL_VERSION})")
        raise RemoteProtocolError("bad signature frame")
    if len(cmd_byte) != 1:
        raise RemoteProtocolError("command frame must be one byte")
    cmd = _CMD_OF_INT[cmd_byte[0]]
    if cmd is None:
        raise RemoteProtocolError(f"unknown command 0x{cmd_byte[0]:02x}")
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"{cmd.name}: bad msgpack: {exc}") from None
    return Command(cmd, check_fields(cmd, fields))
