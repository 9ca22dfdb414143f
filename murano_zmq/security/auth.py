"""ZAP authentication with pyzmq's authenticator and an authorized-keys directory.

- AuthorizedKeys: public key -> key name for every NAME.key in a directory,
  reloaded when the directory changes (reload_if_changed(), polled by a
  Watcher thread) or on demand (SIGHUP).
- start_authenticator(): pyzmq's ThreadAuthenticator (or AsyncioAuthenticator)
  on a context, answering ZAP requests for the murano-zmq domain with a
  credentials callback that admits known keys and logs refused ones.  The
  ZAP User-Id of an admitted peer is its z85 public key (pyzmq's default), so
  a server can ask the *current* AuthorizedKeys for the name on every
  message: a key removed from the directory stops working at once, on
  connections already open too.
- serve_domain(): one authenticator per context shared by several servers,
  each answering for a ZAP domain of its own (the keyed nodes of a process,
  each with its own authorized keys, on zmq.Context.instance()).
- HandshakeLog: logs handshakes a socket refused (no CURVE, wrong server
  key, unknown key) from the socket's monitor, in a thread of its own.

One ZAP handler serves a whole zmq.Context (it binds inproc://zeromq.zap.01):
start one per context that has CURVE server sockets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from .curve import ZAP_DOMAIN
from .keys import load_authorized_keys, public_key_names

log = logging.getLogger("murano_zmq.security")

# Seconds between two looks at the authorized-keys directory (and the
# permissions file) for changes.
RELOAD_INTERVAL = 1.0


class AuthorizedKeys:
    """The keys allowed to connect, by z85 public key, with their names."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._keys: dict[bytes, str] = load_authorized_keys(self.directory)
        self._signature = self._scan()
        self._lock = threading.Lock()  # one reload at a time; readers never wait

    def name_of(self, public_key: bytes | str | None) -> str | None:
        """The key name of an authorized z85 public key, else None."""
        if public_key is None:
            return None
        if isinstance(public_key, str):
            public_key = public_key.encode("ascii", "replace")
        return self._keys.get(public_key)

    def names(self) -> list[str]:
        return sorted(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> bool:
        """Read the directory again; True if the set of keys changed.

        A directory that vanished or cannot be read keeps the keys in force
        (logged): a failed reload must not open or close the door by itself.
        """
        with self._lock:
            signature = self._scan()
            try:
                keys = load_authorized_keys(self.directory)
            except (OSError, ValueError) as exc:
                log.error("authorized keys: reload of %s failed, keeping %d key(s): %s",
                          self.directory, len(self._keys), exc)
                self._signature = signature  # (logged once, not at every poll, until it changes)
                return False
            self._signature = signature
            old = self._keys
            if keys == old:
                return False
            added = sorted(set(keys.values()) - set(old.values()))
            removed = sorted(set(old.values()) - set(keys.values()))
            self._keys = keys  # one reference swap: readers see old or new
            log.warning("authorized keys reloaded from %s: %d key(s); added %s, removed %s",
                        self.directory, len(keys), added or "none", removed or "none")
            return True

    def reload_if_changed(self) -> bool:
        if self._scan() == self._signature:
            return False
        return self.reload()

    def _scan(self) -> tuple:
        """What changes when a key file is added, removed, renamed or edited."""
        try:
            entries = [(self.directory.stat().st_mtime_ns,)]
            for name in public_key_names(self.directory):
                try:
                    st = (self.directory / name).stat()
                except OSError:  # (a dangling link: the others' changes still show)
                    entries.append((name, "unreadable"))
                    continue
                entries.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            return ("unreadable",)
        return tuple(sorted(entries, key=repr))


class KeyCheck:
    """pyzmq's credentials provider: admit a CURVE client whose key is authorized.

    keys=None admits every key (encryption without authentication, the
    relay's --allow-all without --authorized-keys).  `also`: keys admitted
    besides the directory's (a node admits its own key, for its own
    subscriptions and its sends to itself).
    """

    def __init__(self, keys: AuthorizedKeys | None, also: tuple[bytes, ...] = ()):
        self.keys = keys
        self.also = frozenset(also)

    def callback(self, domain: str, key: bytes) -> bool:
        if self.keys is None or key in self.also:
            return True
        name = self.keys.name_of(key)
        if name is None:
            log.warning("refused a CURVE client: key %s is not in %s",
                        key.decode("ascii", "replace"), self.keys.directory)
            return False
        log.debug("authenticated %s", name)
        return True


def start_authenticator(context: zmq.Context, keys: AuthorizedKeys | None, kind: str = "thread"):
    """Start pyzmq's ZAP handler on `context` for the murano-zmq domain.

    kind="thread": zmq.auth.thread.ThreadAuthenticator (any program);
    kind="asyncio": zmq.auth.asyncio.AsyncioAuthenticator (call from the
    running loop; `context` is a zmq.asyncio.Context).  Returns the
    authenticator; call its stop() when the sockets are closed.
    """
    auth = _new_authenticator(context, kind)
    auth.configure_curve_callback(ZAP_DOMAIN, KeyCheck(keys))
    return auth


def _new_authenticator(context: zmq.Context, kind: str = "thread", wait: float = 0.0):
    """pyzmq's authenticator, started, answering for no domain yet (so
    refusing everyone).  `wait`: seconds to keep trying while the ZAP
    endpoint is taken (a handler just stopped releases it asynchronously)."""
    if kind == "thread":
        from zmq.auth.thread import ThreadAuthenticator as cls
    elif kind == "asyncio":
        from zmq.auth.asyncio import AsyncioAuthenticator as cls
    else:
        raise ValueError(f"kind must be 'thread' or 'asyncio', not {kind!r}")
    deadline = time.monotonic() + wait
    while True:
        auth = cls(context, log=logging.getLogger("murano_zmq.security.zap"))
        try:
            auth.start()
            return auth
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
            if getattr(auth, "zap_socket", None) is not None:
                auth.zap_socket.close(0)  # created before the bind failed
            if time.monotonic() >= deadline:
                raise RuntimeError("a ZAP handler already runs in this zmq.Context; "
                                   "use one authenticator per context") from None
            time.sleep(0.01)


class ZapLease:
    """One ZAP domain served by a context's shared authenticator (serve_domain())."""

    def __init__(self, context: zmq.Context, domain: str):
        self.context = context
        self.domain = domain
        self._released = False

    def stop(self) -> None:
        """Stop answering for this domain; the last lease of a context stops its handler."""
        with _shared_lock:
            if self._released:
                return
            self._released = True
            entry = _shared.get(id(self.context))
            if entry is None:
                return
            auth, domains = entry
            domains.discard(self.domain)
            auth.credentials_providers.pop(self.domain, None)
            if not domains:
                del _shared[id(self.context)]
                auth.stop()

    close = stop


# id(context) -> (its ThreadAuthenticator, the domains it answers for)
_shared: dict[int, tuple[object, set[str]]] = {}
_shared_lock = threading.Lock()


def serve_domain(context: zmq.Context, domain: str, check: KeyCheck) -> ZapLease:
    """Answer ZAP requests of `domain` on `context` with `check`, sharing one
    ThreadAuthenticator per context among every server that asks.

    ZeroMQ allows one ZAP handler per context, and a process's nodes usually
    share zmq.Context.instance(): each keyed node serves its own domain (its
    own authorized keys) through the one handler.  Call the lease's stop()
    once the sockets of the domain are closed.  A domain already served on
    the context, or a handler started elsewhere (start_authenticator()), is
    a RuntimeError.
    """
    with _shared_lock:
        entry = _shared.get(id(context))
        if entry is None:
            auth = _new_authenticator(context, wait=2.0)
            entry = _shared[id(context)] = (auth, set())
        auth, domains = entry
        if domain in domains:
            raise RuntimeError(f"ZAP domain {domain!r} is already served in this zmq.Context")
        domains.add(domain)
        auth.configure_curve_callback(domain, check)
    return ZapLease(context, domain)


# Why a handshake failed, for the log: ZMTP protocol error codes by value.
_PROTOCOL_ERRORS = {getattr(zmq, n): n[len("PROTOCOL_ERROR_"):].lower().replace("_", " ")
                    for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}


class HandshakeLog:
    """Log every handshake `sock` refuses, from its monitor, in a thread.

    Create it from the thread that owns `sock` (it calls sock.monitor), and
    close() it from that thread before closing the socket.
    """

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, sock: zmq.Socket, what: str = "relay"):
        self._sock = sock
        self._what = what
        self._endpoint = f"inproc://murano-zmq.handshakes.{id(self):x}"
        self._stop = threading.Event()
        self.refused = 0  # handshakes refused so far
        sock.monitor(self._endpoint, self.EVENTS)
        self._pipe = sock.context.socket(zmq.PAIR)
        self._pipe.connect(self._endpoint)
        self._thread = threading.Thread(target=self._run, name=f"{what}-handshakes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._pipe.poll(200):
                    continue
                event = parse_monitor_message(self._pipe.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                self.refused += 1
                self._log(event)
        finally:
            self._pipe.close(linger=0)

    def _log(self, event: dict) -> None:
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            # The ZAP callback logged the key; this says the door stayed shut.
            log.debug("%s refused a client on %s: not authorized (ZAP status %s)",
                     self._what, event["endpoint"].decode(errors="replace"), value)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            log.warning("%s refused a client on %s: %s (a client without CURVE, or with the wrong "
                        "server key)", self._what, event["endpoint"].decode(errors="replace"),
                        _PROTOCOL_ERRORS.get(value, f"protocol error 0x{value:x}"))
        else:
            log.warning("%s refused a client on %s: handshake failed (errno %s: %s)", self._what,
                        event["endpoint"].decode(errors="replace"), value, os.strerror(value))

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._thread.join(5)


class Watcher:
    """A daemon thread that calls `check()` every `interval` seconds, and
    at once when poke()d (the relay pokes it on SIGHUP)."""

    def __init__(self, check: Callable[[bool], None], interval: float = RELOAD_INTERVAL):
        self._check = check
        self._interval = interval
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="security-reload", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Reload now (safe from a signal handler: it only sets an Event)."""
        self._kick.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            forced = self._kick.wait(self._interval)
            self._kick.clear()
            if self._stop.is_set():
                break
            try:
                self._check(forced)
            except Exception:  # a reload must never kill the watcher
                log.exception("security reload failed")

    def close(self) -> None:
        self._stop.set()
        self._kick.set()
        self._thread.join(5)
