"""The pub/sub forwarder device: XSUB (publishers connect) -> XPUB
(subscribers connect), for peers that cannot reach each other directly.

It stores nothing: topic events stay cheap and lossy.

With a key (--key, --authorized-keys) both sockets are CURVE servers with
the forwarder's key pair, admitting only the authorized keys (ZAP, the
directory reloaded on change): publishers connect their PUB to the XSUB and
subscribers their SUB to the XPUB as CURVE clients that know the
forwarder's public key.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import zmq

from .protocol.constants import DEFAULT_MAX_MESSAGE_SIZE, FRAME_HEADROOM, MAX_SUBSCRIPTION_SIZE
from .sdnotify import notify

log = logging.getLogger("murano_zmq.forwarder")

# Events queued per peer (ZeroMQ's high-water marks): past it a slow
# subscriber loses events, as topics do (they are lossy by design).
EVENT_QUEUE = 1000


def forwarder_security(key=None, key_dir=None, authorized_keys=None):
    """(key pair, AuthorizedKeys) from the forwarder's options, or (None, None)
    without a key; ValueError for a combination that does not make sense."""
    from .security.auth import AuthorizedKeys
    from .security.keys import KeyFileError, load_secret_key

    if not key:
        if authorized_keys:
            raise ValueError("--authorized-keys needs the forwarder's own key (--key): without CURVE "
                             "there is no key to check")
        return None, None
    if not authorized_keys:
        raise ValueError("the forwarder has a key but no --authorized-keys DIR: refusing to let any "
                         "key publish and subscribe; add --authorized-keys DIR")
    try:
        return load_secret_key(key, key_dir or None), AuthorizedKeys(authorized_keys)
    except KeyFileError as exc:
        raise ValueError(str(exc)) from None


def run_forwarder(xsub: str, xpub: str, context: zmq.Context | None = None, key=None,
                  authorized_keys=None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> int:
    """Forward until SIGTERM/SIGINT; returns the exit code.

    key: the forwarder's KeyPair and authorized_keys an AuthorizedKeys
    (forwarder_security()) for CURVE on both sockets; None: plain TCP.
    max_message_size: the largest event passed on (a peer's larger frame
    drops its connection), so that events queued for a slow subscriber,
    up to EVENT_QUEUE of them, hold a bounded amount of memory.

    The proxy runs in a thread (a blocking C call would never see a Python
    signal handler); the main thread waits for a signal, then steers the
    proxy to TERMINATE over an inproc pipe.
    """
    from .security.auth import KeyCheck, Watcher, serve_domain
    from .security.curve import ZAP_DOMAIN, CurveServer

    ctx = context or zmq.Context.instance()
    frontend = ctx.socket(zmq.XSUB)
    backend = ctx.socket(zmq.XPUB)
    control = ctx.socket(zmq.PAIR)
    stopper = ctx.socket(zmq.PAIR)
    stop = threading.Event()
    lease = watcher = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Events come in on the XSUB; only subscriptions on the XPUB.
        frontend.setsockopt(zmq.MAXMSGSIZE, max_message_size + FRAME_HEADROOM)
        backend.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_SIZE)
        for sock in (frontend, backend):
            sock.setsockopt(zmq.SNDHWM, EVENT_QUEUE)
            sock.setsockopt(zmq.RCVHWM, EVENT_QUEUE)
        if key is not None:
            lease = serve_domain(ctx, ZAP_DOMAIN, KeyCheck(authorized_keys))
            for sock in (frontend, backend):
                CurveServer(key).apply(sock)
            watcher = Watcher(lambda forced: authorized_keys.reload() if forced
                              else authorized_keys.reload_if_changed())
            signal.signal(signal.SIGHUP, lambda *_: watcher.poke())
            log.info("forwarder security: CURVE (public key %s); %d authorized key(s) in %s",
                     key.public.decode(), len(authorized_keys), authorized_keys.directory)
        for sock, endpoint in ((frontend, xsub), (backend, xpub)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot bind {endpoint}: {exc}") from None
        control.bind("inproc://murano-zmq-forwarder-control")
        stopper.connect("inproc://murano-zmq-forwarder-control")
        proxy = threading.Thread(target=zmq.proxy_steerable, args=(frontend, backend, None, control),
                                 name="forwarder", daemon=True)
        proxy.start()
        log.info("forwarder: publishers -> %s, subscribers -> %s", xsub, xpub)
        notify(f"READY=1\nSTATUS=forwarding {xsub} -> {xpub}")  # systemd Type=notify
        while not stop.wait(0.5) and proxy.is_alive():
            pass
        stopper.send(b"TERMINATE")
        proxy.join(5)
        log.info("forwarder stopped")
        return 0
    finally:
        for s in (frontend, backend, control, stopper):
            s.close(0)
        if watcher is not None:
            watcher.close()
        if lease is not None:
            lease.stop()


def add_forwarder_arguments(p: argparse.ArgumentParser) -> None:
    from .argtypes import endpoint, given, message_size

    p.add_argument("--xsub", type=endpoint, default="tcp://127.0.0.1:5571", help="where publishers connect (default %(default)s)")
    p.add_argument("--xpub", type=endpoint, default="tcp://127.0.0.1:5572", help="where subscribers connect (default %(default)s)")
    p.add_argument("--max-message-size", type=message_size, default=DEFAULT_MAX_MESSAGE_SIZE,
                   help="largest event passed on, in bytes (a publisher sending a larger one is "
                        f"disconnected); with up to {EVENT_QUEUE} queued per slow subscriber, it bounds "
                        "the forwarder's memory (default %(default)s)")
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--key", type=given, metavar="NAME|FILE",
                   help="the forwarder's CURVE key pair: a .key_secret file, or NAME in --key-dir; "
                        "XSUB and XPUB become CURVE servers")
    g.add_argument("--key-dir", type=given, metavar="DIR", help="where a --key NAME is looked up")
    g.add_argument("--authorized-keys", type=given, metavar="DIR",
                   help="public keys (NAME.key) that may publish or subscribe; reloaded on change and SIGHUP")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the forwarder the parsed options describe; one line and 1 if it cannot start."""
    try:
        key, authorized = forwarder_security(args.key, args.key_dir, args.authorized_keys)
        return run_forwarder(args.xsub, args.xpub, key=key, authorized_keys=authorized,
                             max_message_size=args.max_message_size)
    except (ValueError, zmq.ZMQError) as exc:
        print(f"murano-zmq forwarder: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`python -m devices.forwarder`: the forwarder device on its own."""
    parser = argparse.ArgumentParser(prog=prog, description="Pub/sub forwarder: XSUB -> XPUB; stores nothing.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default %(default)s)")
    add_forwarder_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args)
