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


def test_input_probe_says_what_zmq_events_says_and_rearms_the_fd():
    """input_probe(): true only with a message queued, and (as ZMQ_EVENTS)
    asking re-arms the socket's ZMQ_FD: a message that comes later makes it
    readable, which a poll on the FD then sees."""
    import select

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://zmqio-probe")
    b.connect("inproc://zmqio-probe")
    try:
        probe = zmqio.input_probe(b)
        assert not probe()
        fd = select.poll()
        fd.register(b.getsockopt(zmq.FD), select.POLLIN)
        fd.poll(0)  # (whatever the edge said before: asked again below)
        assert not probe()
        a.send(b"one")
        assert fd.poll(5000), "the FD fired for a message that came after the probe"
        assert probe() and b.get(zmq.EVENTS) & zmq.POLLIN
        assert list(zmqio.ready_frames(b, has_input=probe)) == [[b"one"]]
        assert not probe()
        a.send(b"two")
        a.send(b"three")
        assert fd.poll(5000)
        assert list(zmqio.ready_frames(b)) == [[b"two"], [b"three"]], "read dry with a probe of its own"
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
