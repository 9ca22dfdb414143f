"""Messages read and written at pyzmq's Cython layer, for the hot paths of
the relay loop (relay/wire.py) and the node's sockets (node/sockets.py,
node/topics.py).

zmq.Socket's send_multipart and recv_multipart are Python wrappers: per
frame a type check, IntFlag arithmetic and a super() call, and a
getsockopt(RCVMORE); and a read that finds nothing raises zmq.Again, whose
construction costs more than asking ZMQ_EVENTS first.  On a lone send
those add up to several microseconds on each side of the wire.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import zmq

from .protocol.constants import READ_BATCH

__all__ = ["EVENTS", "LAST", "MORE", "POLLIN", "ZERO_COPY_FROM", "input_probe", "read_message", "ready_frames",
           "send_message"]

# pyzmq flags as plain ints: IntFlag arithmetic per frame costs more than the send.
MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
LAST = int(zmq.NOBLOCK)
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# pyzmq's own send: zmq.Socket.send wraps it (a frame and a super() call per frame sent).
_SEND = zmq.backend.Socket.send
# Frames this long and longer are sent without a copy (pyzmq's threshold for
# copy=False; its default send, copy=True, always copies).  A copy of 64 KiB
# costs the sending thread ~28 µs here, a zero-copy send ~8 µs (the buffer is
# freed later by pyzmq's garbage-collector thread): docs/performance.md.
ZERO_COPY_FROM = zmq.COPY_THRESHOLD
# ... but a node copies frames up to this long: a lone send's frame, whose
# zero-copy send wakes the collector thread while the caller waits for its
# confirm (64 KiB lone sends through Node p50 -11 to -26 µs side by side;
# docs/performance.md, "Session 18").  A send_many's frames (up to 1 MiB of
# bodies each) mostly pass it, and go zero-copy as before.
NODE_ZERO_COPY_FROM = 256 * 1024


def read_message(recv) -> list[bytes] | None:
    """One message's frames off a socket's bound `recv`, without blocking;
    None if none was there.  A Frame says if more follow: no
    getsockopt(RCVMORE) per frame."""
    try:
        frame = recv(LAST, copy=False)
    except zmq.Again:
        return None
    frames = [frame.bytes]
    while frame.more:
        frame = recv(LAST, copy=False)
        frames.append(frame.bytes)
    return frames


def send_message(sock: zmq.Socket, frames: list, zero_copy_from: int = ZERO_COPY_FROM) -> None:
    """Write one message's frames without blocking (zmq.Again if the socket
    cannot take it: on a DEALER, or a ROUTER's first frame, nothing went).
    A last frame of `zero_copy_from` bytes or more goes zero-copy."""
    send = _SEND
    for frame in frames[:-1]:
        send(sock, frame, MORE)
    last = frames[-1]
    send(sock, last, LAST, len(last) < zero_copy_from)


def input_probe(sock: zmq.Socket) -> Callable[[], list]:
    """A call whose answer is true when `sock` has a message to read now:
    its ZMQ_EVENTS, asked through zmq_poll with no wait, which re-arms its
    FD as sock.get(EVENTS) does for two thirds of the cost (pyzmq's get()
    makes a SocketOption enum on every call).  Only while `sock` is open:
    pyzmq gives a closed socket no handle, and zmq_poll would then poll
    file descriptor 0 instead of raising as get() does."""
    return partial(zmq.zmq_poll, [(sock, zmq.POLLIN)], 0)


def ready_frames(sock: zmq.Socket, copy: bool = True, has_input: Callable[[], list] | None = None):
    """The messages `sock` has now (up to READ_BATCH), without blocking.
    ZMQ_EVENTS before each read but the first (which a poll answered): a
    read that finds nothing raises zmq.Again, which costs more than asking.
    `has_input`: the socket's input_probe(), if kept."""
    recv = sock.recv
    for n in range(READ_BATCH):
        if n:
            if has_input is None:
                has_input = input_probe(sock)
            if not has_input():
                return
        if copy:
            frames = read_message(recv)
            if frames is None:
                return
        else:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
        yield frames
