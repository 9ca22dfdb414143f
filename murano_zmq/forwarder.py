"""The pub/sub forwarder device: XSUB (publishers connect) -> XPUB
(subscribers connect), for peers that cannot reach each other directly.

It stores nothing: topic events stay cheap and lossy.
"""

from __future__ import annotations

import logging
import signal
import threading

import zmq

log = logging.getLogger("murano_zmq.forwarder")


def run_forwarder(xsub: str, xpub: str, context: zmq.Context | None = None) -> int:
    """Forward until SIGTERM/SIGINT; returns the exit code.

    The proxy runs in a thread (a blocking C call would never see a Python
    signal handler); the main thread waits for a signal, then steers the
    proxy to TERMINATE over an inproc pipe.
    """
    ctx = context or zmq.Context.instance()
    frontend = ctx.socket(zmq.XSUB)
    backend = ctx.socket(zmq.XPUB)
    control = ctx.socket(zmq.PAIR)
    stopper = ctx.socket(zmq.PAIR)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        frontend.bind(xsub)
        backend.bind(xpub)
        control.bind("inproc://murano-zmq-forwarder-control")
        stopper.connect("inproc://murano-zmq-forwarder-control")
        proxy = threading.Thread(target=zmq.proxy_steerable, args=(frontend, backend, None, control),
                                 name="forwarder", daemon=True)
        proxy.start()
        log.info("forwarder: publishers -> %s, subscribers -> %s", xsub, xpub)
        while not stop.wait(0.5) and proxy.is_alive():
            pass
        stopper.send(b"TERMINATE")
        proxy.join(5)
        log.info("forwarder stopped")
        return 0
    finally:
        for s in (frontend, backend, control, stopper):
            s.close(0)
