"""zmqio.send_message: which frames go zero-copy, on a real socket pair."""

import zmq

from murano_zmq import zmqio


def test_the_last_frame_goes_zero_copy_from_the_threshold(monkeypatch):
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://zmqio-test")
    b.connect("inproc://zmqio-test")
    copies = []
    real = zmqio._SEND

    def recording(sock, frame, flags, copy=True):
        copies.append(copy)
        return real(sock, frame, flags, copy)

    monkeypatch.setattr(zmqio, "_SEND", recording)
    try:
        small, large = b"s" * 1000, b"L" * zmqio.NODE_ZERO_COPY_FROM
        zmqio.send_message(a, [b"head", small])
        zmqio.send_message(a, [b"head", large], zero_copy_from=len(large))  # a node's threshold, reached
        zmqio.send_message(a, [b"head", large[:-1]], zero_copy_from=len(large))  # ... not reached
        zmqio.send_message(a, [b"head", large[:-1]])  # the relay's, pyzmq's 64 KiB
        assert copies == [True, True, True, False, True, True, True, False]
        assert [b.recv_multipart() for _ in range(4)] == [[b"head", small], [b"head", large],
                                                        [b"head", large[:-1]], [b"head", large[:-1]]]
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
