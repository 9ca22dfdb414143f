"""The relay's socket I/O: commands read off the ROUTER into the engine (a
turn's worth), replies written frame by frame.  A mixin of Relay
(relay/server.py), which owns the socket, the security and the loop."""

from __future__ import annotations

import logging

import zmq

from ..protocol.constants import TURN_BYTES, TURN_COMMANDS
from ..zmqio import read_message, send_message
from .engine import RelayEngine

log = logging.getLogger("murano_zmq.relay")

__all__ = ["Wire"]


class Wire:
    """Relay's reads and writes (it sets `_recv`, `_has_input`, `security` and
    `_stalled`)."""

    def _read_one(self, sock: zmq.Socket) -> list[bytes] | None:
        """One message's frames (without CURVE), or None if none was there."""
        return read_message(self._recv)

    def _read(self, sock: zmq.Socket, engine: RelayEngine, now: float, readable: bool,
              first: list[bytes] | None = None) -> tuple[int, bool]:
        """Hand the engine one turn's worth of commands (TURN_COMMANDS,
        TURN_BYTES); returns how many were read, and whether input is still
        waiting (a budget ended the turn).  `readable`: the poll saw input;
        `first`: a message already read (without CURVE)."""
        budget = TURN_BYTES
        try:
            secure = self.security.enabled
            has_input = self._has_input
            n = 0
            if first is not None:
                n = 1
                readable = False
                if len(first) >= 2:
                    engine.receive(first[0], first[1:], now)
                    budget -= len(first[-1])
            # ZMQ_EVENTS before each read (but the first, which the poll
            # answered): a recv that finds nothing raises zmq.Again, whose
            # construction costs more than the check.
            while readable or has_input():
                readable = False
                if n == TURN_COMMANDS or budget <= 0:
                    return n, True
                n += 1
                if secure:  # Frames: their metadata names the connection's key
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        frames = None
                else:
                    frames = self._read_one(sock)
                if frames is None:  # the poll's word was stale: nothing to read after all
                    return n - 1, False
                user = key = None
                if secure:  # the connection's identity rides on every message
                    user, key, refusal = self.security.identify_key(frames[0])
                    frames = [f.bytes for f in frames]
                    if refusal is not None:
                        engine.refuse(frames[0], frames[1:], refusal, now)
                        continue
                if len(frames) < 2:
                    continue
                engine.receive(frames[0], frames[1:], now, user, key)
                budget -= len(frames[-1])
            return n, False
        finally:
            self.bytes_read += TURN_BYTES - budget  # (Relay's look at its disk's free space)

    def _send(self, sock: zmq.Socket, out: list) -> None:
        # Frame by frame with int flags: send_multipart's per-frame type
        # checks and IntFlag arithmetic cost more than the sends themselves.
        # A ROUTER fails (Again, EHOSTUNREACH) on the identity frame or not at all.
        for identity, frames in out:
            try:
                send_message(sock, [identity, *frames])
            except zmq.Again:
                if identity not in self._stalled:
                    log.warning("send to %s would block: dropping its session; the node will resync",
                                identity.hex())
                self._stalled.add(identity)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:  # unreachable: the peer is gone already
                    log.warning("send to %s failed: %s", identity.hex(), exc)
