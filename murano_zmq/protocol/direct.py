"""Direct delivery between nodes, with no I/O: the sending and receiving ends.

A consuming node binds a ROUTER; a sender keeps one DirectLink (a DEALER) per
peer endpoint.  The dialog is the relay's: HELLO / WELCOME, then SEND /
CONFIRM and HEARTBEAT, and BYE.  The difference: a peer CONFIRMs a SEND only
when application code has acked every message in it, so a confirmed direct
send is as done as a relay send that was consumed.  A record the peer cannot
take (no consumer there any more) comes back in CONFIRM as 404, and the
sender gives it to the relay.

With CURVE, the receiving end learns the sending key's name on every
command (the node's driver maps the ZAP User-Id): a command from a key no
longer authorized gets ERROR 403, and, when the node has a permissions
table, a record the key may not `send` to its mailbox comes back in CONFIRM
as 403, so the sender hands it to the relay, whose own check then applies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .constants import (  # noqa: F401 (DEFAULT_WINDOW, DEFAULT_DIRECT_TIMEOUT re-exported)
    DEFAULT_DIRECT_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_WINDOW,
    DIRECT_WINDOW_BYTES,
    HEARTBEAT_LIVENESS,
    MAX_HEARTBEAT,
    MIN_HEARTBEAT,
)
from .errors import RemoteProtocolError
from .frames import Cmd, decode, encode
from .message import records_size


# ZeroMQ's transports (zmq_bind(3)).
TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "ws", "wss", "tipc", "vmci")


def tcp_parts(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a tcp://HOST:PORT endpoint as written ('' for a
    part left out), or None for another transport."""
    if not endpoint.startswith("tcp://"):
        return None
    host, colon, port = endpoint[6:].rpartition(":")
    return (host, port) if colon else (endpoint[6:], "")


def tcp_port(endpoint: str) -> int | None:
    """The port number of a tcp://HOST:PORT endpoint, or None (another
    transport, a wildcard port).  ZeroMQ takes any number, and binds or
    connects to it modulo 65536: its callers refuse one out of range."""
    parts = tcp_parts(endpoint)
    return int(parts[1]) if parts is not None and parts[1].isdigit() else None


def bind_problem(endpoint) -> str | None:
    """Why `endpoint` is not one a node's direct ROUTER could bind (a
    transport, "://", an address; for tcp a port or "*", at most 65535),
    or None.  What the bind itself would refuse later (an address of
    another host, a port in use) it leaves to the bind."""
    if not isinstance(endpoint, str):
        return f"an endpoint is text, got {endpoint!r}"
    scheme, sep, rest = endpoint.partition("://")
    if scheme == "inproc":
        return f"inproc:// cannot be reached by another process, and the relay refuses it: {endpoint!r}"
    if sep and scheme in TRANSPORTS and rest:
        if scheme != "tcp":
            return None
        host, port = tcp_parts(endpoint)
        if host and (port == "*" or (port.isdigit() and int(port) < 65536)):
            return None
    return f"not an endpoint to bind (e.g. tcp://127.0.0.1:*, ipc://PATH): {endpoint!r}"


def endpoint_problem(endpoint) -> str | None:
    """Why `endpoint`, offered by a consumer for its direct path (CONSUME;
    the relay hands it to senders by LOOKUP), is not a ZeroMQ endpoint a
    node could have bound, or None.  A node offers its ROUTER's
    LAST_ENDPOINT: a transport, "://" and an address; for tcp a host (no
    wildcard) and a port 1-65535; not inproc, which another process cannot
    reach (a sender would connect inside itself, to whatever it binds
    there).  Only the form: a sender whose connect fails sends through the
    relay (node/sockets.py _open_link)."""
    if type(endpoint) is not str or not endpoint.isprintable():
        return f"not an endpoint: {endpoint!r}"
    scheme, _, rest = endpoint.partition("://")
    if scheme in TRANSPORTS and rest and scheme not in ("tcp", "inproc"):
        return None
    if scheme == "tcp":
        host, port = tcp_parts(endpoint)
        if host and "*" not in host and port.isdigit() and 0 < int(port) < 65536:
            return None
    return f"not an endpoint a node binds (e.g. tcp://HOST:PORT, ipc://PATH): {endpoint!r}"


@dataclass(frozen=True, slots=True)
class LinkReady:
    endpoint: str
    peer: str


@dataclass(frozen=True, slots=True)
class DirectConfirmed:
    """`done` records were acked by the peer's application."""

    endpoint: str
    req: int
    done: list


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """The peer went silent, said BYE, or a send timed out: `records` (every
    unconfirmed one on the link, oldest first) go to the relay."""

    endpoint: str
    reason: str
    records: list


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"


class DirectLink:
    """The sending end of one node-to-node link."""

    def __init__(self, endpoint: str, node_name: str, instance: bytes, now: float,
                 heartbeat: float = DEFAULT_HEARTBEAT, timeout: float = DEFAULT_DIRECT_TIMEOUT,
                 window: int = DEFAULT_WINDOW, window_bytes: int = DIRECT_WINDOW_BYTES):
        self.endpoint = endpoint
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.window = window
        self.window_bytes = window_bytes
        self.state = LinkState.CONNECTING
        self.peer: str | None = None
        self._next_req = 1
        self._in_flight: dict[int, tuple[float, list]] = {}  # req -> (sent at, records), in order
        self._count = 0
        self.bytes_out = 0  # body and header bytes of the unconfirmed records
        self._outbox = [encode(Cmd.HELLO, node_name, instance, heartbeat)]
        self._last_heard = self._last_sent = now
        self._last_progress = now  # last CONFIRM: a slow consumer that acks is not a dead one
        self._resent = False  # the unconfirmed SENDs went out once more since the last CONFIRM

    @property
    def in_flight(self) -> int:
        """Unconfirmed records on the link."""
        return self._count

    @property
    def last_progress(self) -> float:
        """When the last CONFIRM came (or the link was made)."""
        return self._last_progress

    @property
    def sends(self) -> int:
        """SENDs put on the link so far."""
        return self._next_req - 1

    def room(self) -> int:
        """Records the window takes now (none once its bytes are out)."""
        if self.state == LinkState.FAILED or self.bytes_out >= self.window_bytes:
            return 0
        return max(0, self.window - self._count)

    def unconfirmed(self) -> list:
        """Every unconfirmed record, in the order sent."""
        return [r for _, rs in self._in_flight.values() for r in rs]

    def drain(self) -> list[list[bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def sent(self, now: float) -> None:
        self._last_sent = now

    def send(self, records: list, now: float) -> int:
        req = self._next_req
        self._next_req += 1
        self._in_flight[req] = (now, records)
        self._count += len(records)
        self.bytes_out += records_size(records)
        self._outbox.append(encode(Cmd.SEND, req, records))
        return req

    def receive(self, frames: list[bytes], now: float) -> list:
        command = decode(frames)
        self._last_heard = now
        if command.cmd == Cmd.WELCOME:
            self.state = LinkState.READY
            self.peer = command.fields[0]
            return [LinkReady(self.endpoint, self.peer)]
        if command.cmd == Cmd.CONFIRM:
            req, errors = command.fields
            entry = self._in_flight.pop(req, None)
            if entry is None:
                return []
            self._last_progress = now
            self._resent = False
            records = entry[1]
            self._count -= len(records)
            self.bytes_out -= records_size(records)
            refused = [e for e in errors if isinstance(e, list) and e and isinstance(e[0], int)]
            refused_at = {e[0] for e in refused}
            done = DirectConfirmed(self.endpoint, req, [r for i, r in enumerate(records) if i not in refused_at])
            if not refused_at:
                return [done]
            # The peer stopped consuming (404), or will not take these from
            # this key (403): what it refused and everything still unconfirmed
            # go to the relay, in the order they were sent.
            self._in_flight[req] = (entry[0], [r for i, r in enumerate(records) if i in refused_at])
            self._in_flight = dict(sorted(self._in_flight.items()))
            self._count += len(refused_at)
            self.bytes_out += records_size(self._in_flight[req][1])
            first = refused[0]
            why = " ".join(str(x)[:200] for x in first[1:3]) if len(first) > 1 else "refused"
            return [done, self.fail(f"peer refused ({why})")]
        if command.cmd in (Cmd.BYE, Cmd.ERROR):
            return [self.fail(f"peer said {command.cmd.name}: {command.fields[-1]}")]
        if command.cmd == Cmd.HEARTBEAT:
            return []
        raise RemoteProtocolError(f"a peer does not send {command.cmd.name} on a direct link")

    def next_deadline(self) -> float:
        if self.state == LinkState.FAILED:
            return float("inf")
        deadlines = [self._last_sent + self.heartbeat, self._last_heard + self.heartbeat * HEARTBEAT_LIVENESS]
        if self._in_flight:
            deadlines.append(self.stalled_since() + self.timeout)
        return min(deadlines)

    def stalled_since(self) -> float | None:
        """Since when unconfirmed records have made no progress (None: none out)."""
        if not self._in_flight:
            return None
        return max(next(iter(self._in_flight.values()))[0], self._last_progress)

    def tick(self, now: float) -> list:
        if self.state == LinkState.FAILED:
            return []
        if now - self._last_heard > self.heartbeat * HEARTBEAT_LIVENESS:
            return [self.fail(f"peer silent for {now - self._last_heard:.1f}s")]
        if self._in_flight and now - self.stalled_since() > self.timeout:
            if not self._resent and now - self._last_heard < self.heartbeat * 2:
                # The peer is alive: its CONFIRM may have been lost with a
                # connection that dropped (ZeroMQ reconnects silently).  Send
                # the unconfirmed SENDs again, same req: the peer's dedup
                # confirms at once what its application settled already, and
                # holds the rest as before.  No answer in another timeout: fail.
                self._resent = True
                self._last_progress = now
                self._outbox.extend(encode(Cmd.SEND, req, records) for req, (_, records) in self._in_flight.items())
                return []
            return [self.fail(f"no direct ack within {2 * self.timeout}s")]
        if now - self._last_sent >= self.heartbeat:
            self._outbox.append(encode(Cmd.HEARTBEAT))
        return []

    def fail(self, reason: str) -> LinkFailed:
        """Give up on the link: every unconfirmed record goes back to the caller."""
        records = self.unconfirmed()
        self._in_flight.clear()
        self._count = self.bytes_out = 0
        self.state = LinkState.FAILED
        return LinkFailed(self.endpoint, reason, records)

    def close(self) -> None:
        if self.state != LinkState.FAILED:
            self._outbox.append(encode(Cmd.BYE, "node closing"))
