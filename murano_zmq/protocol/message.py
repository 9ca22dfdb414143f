"""The message model: ids, bodies, the wire records of SEND and DELIVER.

A body is any msgpack value (bytes included); it travels and is stored
packed, so the relay never decodes it.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from .constants import ID_CLOCK_BYTES, ID_SIZE, KEPT_PACKER_BUFFER, MAX_NAME_LENGTH, MAX_PEER_NAME
from .errors import LocalProtocolError, RelayUnavailable, RemoteProtocolError

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@\-]+\Z")  # (\Z: "$" would let a final newline through)


# The random part of message ids: a generator of this module's own, seeded
# from the OS and again in every forked child (a fork must not repeat its
# parent's ids), so application code seeding `random` cannot make ids
# repeat.  One C call per id, where os.urandom is a system call each.
_id_bits = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _id_bits.seed(os.urandom(32)))
_RANDOM_BITS = (ID_SIZE - ID_CLOCK_BYTES) * 8


def new_message_id(now: float) -> bytes:
    """A unique id that sorts by creation time (48-bit ms clock + 80 random bits).

    Time-ordered ids keep the relay's id index append-mostly.
    """
    return ((int(now * 1000) << _RANDOM_BITS) | _id_bits.getrandbits(_RANDOM_BITS)).to_bytes(ID_SIZE, "big")


def new_message_ids(now: float, count: int) -> list[bytes]:
    """`count` of new_message_id(now), for a batch sent at one `now`."""
    clock, bits = int(now * 1000) << _RANDOM_BITS, _id_bits.getrandbits
    return [(clock | bits(_RANDOM_BITS)).to_bytes(ID_SIZE, "big") for _ in range(count)]


def idempotent_id(key: str) -> bytes:
    """A message id derived from `key`: sending twice with the same key is
    sending the same message, which the relay and the receiving node's dedup
    window hand to application code once (e.g. a task's result, whoever
    finishes the task)."""
    return hashlib.sha256(key.encode("utf-8")).digest()[:ID_SIZE]


# Kept Packers, one per thread packing at a time: msgpack.packb builds one
# per call with a 1 MiB buffer (0.7 µs for a 1 KiB body, 0.2 µs with a kept
# one).  list.pop and append are atomic, so no two threads share one; a
# Packer resets itself when a pack raises.
_free_packers: list[Callable[[Any], bytes]] = []


def take_packer() -> Callable[[Any], bytes]:
    """A kept Packer's pack, for a run of packs (send_many's records); give
    it back with give_packer()."""
    try:
        return _free_packers.pop()
    except IndexError:
        return msgpack.Packer(use_bin_type=True).pack


def give_packer(pack: Callable[[Any], bytes], largest: int) -> None:
    """Keep `pack` for the next caller, unless a pack of `largest` bytes
    grew its buffer past KEPT_PACKER_BUFFER (then that goes with it)."""
    if largest <= KEPT_PACKER_BUFFER:
        _free_packers.append(pack)


# What a Packer raises for a value it cannot pack.
PACK_ERRORS = (TypeError, ValueError, OverflowError)


def unpackable_body(exc: Exception) -> LocalProtocolError:
    return LocalProtocolError(f"body is not msgpack-serialisable: {exc}")


def pack_body(body: Any) -> bytes:
    pack = take_packer()
    try:
        packed = pack(body)
    except PACK_ERRORS as exc:
        give_packer(pack, 0)
        raise unpackable_body(exc) from None
    give_packer(pack, len(packed))
    return packed


def unpack_body(packed: bytes) -> Any:
    """A message's body; ValueError, saying so, if its bytes are not msgpack
    (a raw client's send: the relay keeps bodies opaque)."""
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=False)
    except Exception as exc:  # (msgpack raises several unrelated types, some with no text)
        raise ValueError(f"the message body is not msgpack ({len(packed)} bytes, starting "
                         f"{packed[:8].hex() or 'with nothing'}): {type(exc).__name__} {exc}".rstrip()) from None


def is_whole(value: Any) -> bool:
    """An int, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int msgpack can carry or a finite float (NaN and infinities would
    stop timers; an int past 64 bits cannot be encoded)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)
    return isinstance(value, float) and math.isfinite(value)


_good_names: set[str] = set()  # names checked already (a send checks its mailbox's each time)


def check_name(name: Any, what: str = "mailbox") -> str:
    """`name` if it is a valid mailbox name, else LocalProtocolError."""
    if type(name) is str and name in _good_names:
        return name
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
        shown = repr(name[:MAX_NAME_LENGTH + 1] if isinstance(name, (str, bytes, list, tuple)) else name)
        if len(shown) > MAX_NAME_LENGTH + 2:  # (the error goes on the wire from a relay: not any size)
            shown = shown[:MAX_NAME_LENGTH + 2] + "..."
        raise LocalProtocolError(
            f"invalid {what} name {shown}: 1-{MAX_NAME_LENGTH} characters of letters, digits and _ . : @ -")
    if len(_good_names) >= 4096:
        _good_names.clear()  # bounded: names come and go
    _good_names.add(name)
    return name


def check_peer_name(name: Any, what: str = "node") -> str:
    """`name` if it may name a node or a relay, else ValueError: the name
    goes into logs, STATUS and zeroconf adverts (whose TXT values hold 255
    bytes, and whose readers ignore an advert with an empty name)."""
    if not isinstance(name, str) or not name or name != name.strip() or not name.isprintable():
        raise ValueError(f"{what} name {name!r} must be printable, not empty, without spaces around it")
    if len(name.encode()) > MAX_PEER_NAME:
        raise ValueError(f"{what} name is {len(name.encode())} bytes long, at most {MAX_PEER_NAME}")
    return name


def printable(text: str) -> str:
    """`text` from a peer, as logs and terminals may show it: control
    characters (a newline would forge a log line, an escape sequence would
    reach the terminal) as '?'."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def shown_peer_name(name: str) -> str:
    """A peer's name from its HELLO, WELCOME or advert: printable(), cut to
    MAX_PEER_NAME characters."""
    return printable(name[:MAX_PEER_NAME])


def pack_headers(headers: dict | None) -> bytes:
    """Headers as they travel and are stored: a packed msgpack map, or
    b"" for none.  Packed once, by the sender."""
    if not headers:
        return b""
    if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
        raise LocalProtocolError("headers must be a dict with str keys")
    try:
        return msgpack.packb(headers, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"headers are not msgpack-serialisable: {exc}") from None


def unpack_headers(packed: bytes) -> dict:
    """Packed headers as a dict, or RemoteProtocolError."""
    if not packed:
        return {}
    try:
        headers = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"headers: bad msgpack: {exc}") from None
    if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
        raise RemoteProtocolError("headers must be a map with string keys")
    return headers


# --- SEND records: [id, mailbox, headers, body, created, ttl, retry] ---------


def send_record(
    msg_id: bytes, mailbox: str, headers: dict | bytes | None, body: bytes, created: float, ttl: float | None
) -> list:
    """`headers`: a dict, or already packed (pack_headers())."""
    packed = headers if isinstance(headers, bytes) else pack_headers(headers)
    return [msg_id, mailbox, packed, body, created, ttl, False]


def records_size(records: list) -> int:
    """Body and header bytes of SEND records (what size limits and windows count)."""
    return sum([len(r[3]) + len(r[2]) for r in records])


@dataclass(slots=True)
class IncomingSend:
    """One message of a SEND, as the relay sees it after validation."""

    msg_id: bytes
    mailbox: str
    headers: bytes  # packed, as the sender packed them
    body: bytes
    created: float
    ttl: float | None
    retry: bool
    size: int  # body and header bytes: what a size limit counts
    # The headers as checked (None: none), derived from `headers`: a direct peer hands them on.
    header_map: dict | None = field(default=None, compare=False, repr=False)


def parse_send_record(item: Any) -> IncomingSend:
    """Validate one SEND record from a peer or raise RemoteProtocolError.

    Headers are checked once here, at the edge (a map with string keys),
    and then stored and forwarded as they came."""
    if not isinstance(item, list) or len(item) != 7:
        raise RemoteProtocolError("a SEND message record has 7 fields")
    msg_id, mailbox, headers, body, created, ttl, retry = item
    if not isinstance(msg_id, bytes) or len(msg_id) != ID_SIZE:
        raise RemoteProtocolError(f"message id must be {ID_SIZE} bytes")
    if not isinstance(mailbox, str) or not _NAME_RE.match(mailbox) or len(mailbox) > MAX_NAME_LENGTH:
        raise RemoteProtocolError(f"invalid mailbox name {mailbox!r}"[:300])
    if not isinstance(headers, bytes):
        raise RemoteProtocolError("headers must be bin (a packed map)")
    header_map = unpack_headers(headers) if headers else None
    if not isinstance(body, bytes):
        raise RemoteProtocolError("body must be bin")
    # (the common case first: a finite float)
    if not (type(created) is float and math.isfinite(created)) and not is_number(created):
        raise RemoteProtocolError("created must be a finite number")
    if ttl is not None and not (is_number(ttl) and ttl > 0):
        raise RemoteProtocolError("ttl must be a positive finite number or nil")
    if not isinstance(retry, bool):
        raise RemoteProtocolError("retry must be a bool")
    return IncomingSend(msg_id, mailbox, headers, body, float(created), ttl, retry, len(body) + len(headers),
                        header_map)


# --- DELIVER records: [tag, id, mailbox, headers, body, created, expires, count]


@dataclass(slots=True, eq=False)
class Message:
    """A message handed to application code.

    ack() removes it from its mailbox; nack(requeue=True) gives it back (or,
    with requeue=False, dead-letters it when the mailbox has a dead-letter
    mailbox, else drops it; a message that came direct has no mailbox
    options at hand and is dropped).  A message is settled once; later
    calls are no-ops.
    """

    id: bytes
    mailbox: str
    headers: dict  # (given packed, as bytes, it is unpacked here once)
    packed_body: bytes
    created_at: float
    expires_at: float | None
    delivery_count: int
    tag: int = 0  # the relay's delivery tag (0 for a direct delivery)
    # Which of its node's connections to a relay delivered it (ClientCore.
    # connections): a tag means something only to that connection's relay.
    connection: int = field(default=0, repr=False)
    origin: Any = field(default=None, repr=False)  # direct delivery: who to confirm to
    _settle: Callable[["Message", str, bool], None] | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.headers, bytes):
            self.headers = unpack_headers(self.headers)

    @property
    def body(self) -> Any:
        return unpack_body(self.packed_body)

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def settled(self) -> bool:
        return self._settled

    def ack(self) -> None:
        if not self._settled:  # (_finish, inline: once per consumed message)
            self._settled = True
            if self._settle is not None:
                self._settle(self, "ack", False)

    def nack(self, requeue: bool = True) -> None:
        self._finish("nack", requeue)

    def _finish(self, how: str, requeue: bool) -> None:
        if self._settled:
            return
        self._settled = True
        if self._settle is not None:
            self._settle(self, how, requeue)

    def to_json(self) -> dict:
        """A JSON-friendly view (ids in hex; a bytes body as text or hex; a
        body that is not msgpack as {"not_msgpack": hex})."""
        try:
            body = self.body
        except ValueError:
            body = {"not_msgpack": self.packed_body.hex()}
        if isinstance(body, bytes):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                body = {"hex": body.hex()}
        return {
            "id": self.id.hex(),
            "mailbox": self.mailbox,
            "headers": self.headers,
            "body": body,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "delivery_count": self.delivery_count,
            "redelivered": self.redelivered,
        }


def parse_delivery(item: Any, connection: int = 0) -> Message:
    """One DELIVER record from the relay as a Message, or RemoteProtocolError.
    connection: the receiving node's count of its connections (Message.connection)."""
    if not isinstance(item, list) or len(item) != 8:
        raise RemoteProtocolError("a DELIVER record has 8 fields")
    tag, msg_id, mailbox, headers, body, created, expires, count = item
    if not (type(tag) is int and isinstance(msg_id, bytes) and isinstance(mailbox, str)
            and isinstance(headers, bytes) and isinstance(body, bytes) and type(count) is int
            # (the usual created first: a finite float)
            and ((type(created) is float and created - created == 0.0) or is_number(created))
            and (expires is None or is_number(expires))):
        raise RemoteProtocolError("bad DELIVER record")
    return Message(msg_id, mailbox, unpack_headers(headers) if headers else {}, body, created, expires, count, tag,
                   connection)


# --- a SEND record's ttl while the sender holds it ------------------------------------
# A relay counts a record's ttl from its receipt; the time the sender held
# the record (no relay connected, or a SEND left unconfirmed by a relay
# that went away) is taken off first, so a message is never delivered
# later than its ttl allows counting from the send (an RPC call that timed
# out is not run later by a server that came meanwhile).


def ttl_passed(record: list) -> RelayUnavailable:
    return RelayUnavailable(f"message {record[0].hex()} to {record[1]} not sent: its ttl passed while no "
                            "relay took it")


def count_down_ttl(record: list, elapsed: float) -> bool:
    """Take `elapsed` seconds off a SEND record's ttl; False (the record
    unchanged) if its ttl passed."""
    ttl = record[5]
    if ttl is None or elapsed <= 0:
        return True
    if ttl <= elapsed:
        return False
    record[5] = ttl - elapsed
    return True
