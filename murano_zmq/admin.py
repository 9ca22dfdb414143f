"""Admin: an operator's short session with a relay (status, purge, move, peek).

A Node is built for traffic: consumers, confirms, replay after reconnects,
direct links.  An operator's command needs none of that, so Admin speaks
the few commands it needs on one DEALER socket: HELLO, then one request at
a time, each answered by REPLY or ERROR within `timeout`.  The relay's
HEARTBEATs are read and dropped; every request counts as a heartbeat.

    with Admin("tcp://127.0.0.1:5570") as admin:
        admin.purge("dead")
        admin.move("dead", "work")
        for msg in admin.peek("work", 5): ...

With keys on, pass curve_key / relay_key as for a Node; the key's identity
needs the `admin` permission on the mailboxes named (docs/security.md).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import zmq

from .protocol.constants import DEFAULT_RELAY_ENDPOINT, RELAY_ENV
from .protocol.errors import RelayUnavailable, RemoteProtocolError, error_from_code
from .protocol.frames import Cmd, decode, encode
from .protocol.message import parse_delivery, unpack_body


@dataclass(frozen=True)
class PeekedMessage:
    """A copy of a READY message, as PEEK returns it: nothing was taken."""

    seq: int
    msg_id: bytes
    mailbox: str
    headers: dict
    body: Any  # unpacked as a delivery's body is
    created: float
    expires: float | None
    deliveries: int

    def to_json(self) -> dict:
        body = self.body.decode("utf-8", "replace") if isinstance(self.body, bytes) else self.body
        return {"id": self.msg_id.hex(), "mailbox": self.mailbox, "headers": self.headers, "body": body,
                "created": self.created, "expires": self.expires, "deliveries": self.deliveries}


class Admin:
    """One admin session with a relay; use as a context manager."""

    def __init__(self, relay: str | None = None, timeout: float = 10.0, name: str = "admin",
                 curve_key=None, relay_key=None, key_dir: str | None = None,
                 context: zmq.Context | None = None):
        self.relay = relay or os.environ.get(RELAY_ENV) or DEFAULT_RELAY_ENDPOINT
        self.timeout = timeout
        self.name = name
        self._curve = None
        if curve_key is not None or relay_key is not None:
            from .security.curve import client_curve

            self._curve = client_curve(curve_key, relay_key, key_dir)
        self._context = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._req = itertools.count(1)
        self.relay_name = ""

    # --- session ---------------------------------------------------------------------

    def open(self) -> "Admin":
        from .discovery.zeroconf import auto_pattern, find_relay

        pattern = auto_pattern(self.relay)
        if pattern is not None:  # as for a Node: a relay zeroconf advertises
            self.relay = find_relay(pattern=pattern)
        self.relay = self.relay.split(",")[0]  # several relays (a standby): ask the first
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self.relay)
        self._sock = sock
        # A generous heartbeat: a watch asks only every few seconds.
        sock.send_multipart(encode(Cmd.HELLO, self.name, os.urandom(16), max(30.0, self.timeout)))
        welcome = self._wait(lambda c: c.cmd == Cmd.WELCOME, None)
        self.relay_name = welcome.fields[0]
        return self

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.send_multipart(encode(Cmd.BYE, "admin done"), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Admin":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, cmd: Cmd, *fields: Any) -> Any:
        """Send `cmd` (its req is filled in) and return the REPLY's result,
        or raise the error the relay answered with."""
        if self._sock is None:
            self.open()
        req = next(self._req)
        self._sock.send_multipart(encode(cmd, req, *fields))
        return self._wait(lambda c: c.cmd == Cmd.REPLY and c.fields[0] == req, req).fields[1]

    def _wait(self, wanted, req: int | None):
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise RelayUnavailable(f"no answer from the relay at {self.relay} within {self.timeout}s")
                continue
            try:
                command = decode(self._sock.recv_multipart())
            except RemoteProtocolError:
                continue  # not ours to mend: wait for the answer
            if command.cmd == Cmd.ERROR and (command.fields[0] in (req, None)):
                raise error_from_code(command.fields[1], command.fields[2])
            if command.cmd == Cmd.BYE:  # (a relay that reloads its state after a failed write)
                self.close()  # the next request says HELLO again
                raise RelayUnavailable(f"the relay at {self.relay} ended the session ({command.fields[-1]}): "
                                       "what was asked may not have been done; ask again")
            if wanted(command):
                return command

    # --- commands ----------------------------------------------------------------------

    def status(self) -> dict:
        """The relay's STATUS map (mailboxes, counters, peers)."""
        return self.request(Cmd.STATUS)

    def purge(self, mailbox: str) -> int:
        """Drop the mailbox's READY messages; returns how many went.  The
        relay takes a batch per request; this asks until none is left (or
        none went: messages that keep coming are not chased)."""
        purged = 0
        while True:
            result = self.request(Cmd.PURGE, mailbox)
            purged += result["purged"]
            if not result.get("left") or not result["purged"]:
                return purged

    def move(self, mailbox: str, to: str, limit: int | None = None) -> dict:
        """Move READY messages (all, or `limit`) to mailbox `to`, oldest
        first, a batch per request; returns {mailbox, to, moved, left,
        stopped}: `stopped` says why it stopped early (`to` is full)."""
        moved = 0
        while True:
            result = self.request(Cmd.MOVE, mailbox, to, None if limit is None else limit - moved)
            moved += result["moved"]
            if (result["stopped"] or not result["left"] or not result["moved"]
                    or (limit is not None and moved >= limit)):
                return {**result, "moved": moved}

    def peek(self, mailbox: str, count: int = 1) -> list[PeekedMessage]:
        """Copies of the first `count` READY messages; nothing is taken."""
        result = self.request(Cmd.PEEK, mailbox, count)
        peeked = []
        for record in result["messages"]:
            msg = parse_delivery(record)  # the records are DELIVER records
            peeked.append(PeekedMessage(msg.tag, msg.id, msg.mailbox, msg.headers, _unpack(msg.packed_body),
                                        msg.created_at, msg.expires_at, msg.delivery_count))
        return peeked


def _unpack(body: bytes) -> Any:
    """What the sender sent (bodies are stored packed); the bytes if they do not unpack."""
    try:
        return unpack_body(body)
    except Exception:  # msgpack raises several unrelated types
        return body
