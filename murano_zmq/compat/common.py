"""What both Murano flavours share: AMQP names and settings mapped onto a Node.

The engine's ``murano.common.messaging`` and the agent's
``muranoagent.common.messaging`` have the same client and subscription; they
differ in the message (decoded JSON vs the exact text) and in a few details
the flavour modules set.  docs/murano.md gives the mapping in full.

- host/port: the relay, ``tcp://host:port``.
- login: the node's name (what ``murano-zmq status`` shows); the relay
  knows a client by its CURVE key, not by this name.
- virtual_host: a namespace in mailbox names, ``murano[.VHOST]:QUEUE``.
- ssl: CURVE.  ca_certs is the relay's public key (a ``.key`` file or its
  z85 text); password names this machine's key pair (a ``.key_secret``
  file, or the 40-character z85 secret); with no key pair there, a fresh
  one, which only a relay that admits any key lets in.
- exchanges: AMQP's default and direct exchanges deliver routing key K to
  queue K (the only bindings this API makes), so the mailbox is K's.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from .. import Node  # the public name: node internals may move
from ..protocol.constants import MAX_NAME_LENGTH, MAX_PREFETCH
from ..protocol.message import check_peer_name, is_whole
from ..security.keys import KeyFileError, KeyPair, is_z85_key, load_public_key, load_secret_key

log = logging.getLogger("murano_zmq.compat")

NOT_CONNECTED = "Not connected to the murano-zmq relay"

# AMQP's prefetch_count=0 means "no limit"; the relay caps credit at this.
UNLIMITED_PREFETCH = MAX_PREFETCH
# Mailbox names: 1-255 of letters, digits and _ . : @ -  (protocol/message.py).
_MAX_NAME = MAX_NAME_LENGTH
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]")
_clients = itertools.count(1)
# Longest single wait of get_message(), s, before it looks whether its client closed.
_WAIT_SLICE = 0.5


def escape(text: str) -> str:
    """`text` in letters, digits and ``_ . -``; any other character (``:``
    and ``@`` included) as ``@`` and two hex digits per UTF-8 byte."""
    return "".join(ch if _PLAIN.fullmatch(ch) else "".join(f"@{b:02x}" for b in ch.encode("utf-8"))
                   for ch in text)


def namespace(virtual_host: Any) -> str:
    """The mailbox prefix of a virtual host: ``murano`` for AMQP's default
    vhost ``/`` (or none), ``murano.VHOST`` for any other."""
    vhost = "" if virtual_host is None else str(virtual_host)
    return "murano" if vhost in ("", "/") else "murano." + escape(vhost)


def mailbox_name(virtual_host: Any, queue: Any) -> str:
    """The mailbox that holds AMQP queue `queue` of `virtual_host`."""
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"a queue name must be a non-empty string, got {queue!r}")
    name = f"{namespace(virtual_host)}:{escape(queue)}"
    if len(name) > _MAX_NAME:
        raise ValueError(f"queue name {queue[:40]!r}... is too long for a mailbox "
                         f"({len(name)} characters once escaped, at most {_MAX_NAME})")
    return name


def relay_endpoint(host: Any, port: Any) -> str:
    """The relay of the original's host and port; no host is this host's
    (kombu takes an empty one for localhost)."""
    host = "127.0.0.1" if host is None or not str(host).strip() else str(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"tcp://{host}:{port}"


def curve_keys(ssl: bool, password: Any, ca_certs: Any, insecure: bool) -> tuple[KeyPair, bytes] | None:
    """(this client's key pair, the relay's public key) for ssl=True, else None.

    CURVE always authenticates the relay: `insecure` cannot skip its key.
    """
    if not ssl:
        return None
    if not ca_certs:
        raise RuntimeError("ssl=True needs the relay's CURVE public key in ca_certs (its .key file "
                           "or the 40-character z85 text)" +
                           ("; insecure=True cannot skip it: CURVE always checks the relay's key"
                            if insecure else ""))
    try:
        relay_key = load_public_key(str(ca_certs).strip())
    except KeyFileError as exc:
        raise RuntimeError(f"ca_certs: {exc}") from None
    return own_key_pair(password), relay_key


def own_key_pair(password: Any) -> KeyPair:
    """This machine's CURVE key pair, from `password`: a ``.key_secret``
    file, or a z85 secret key; else a fresh pair (logged)."""
    text = "" if password is None else str(password).strip()
    if text and Path(text).is_file():
        try:
            return load_secret_key(text)
        except KeyFileError as exc:
            raise RuntimeError(f"password names a key file that cannot be used: {exc}") from None
    if is_z85_key(text):
        secret = text.encode("ascii")
        try:
            return KeyPair(zmq.curve_public(secret), secret, "password")
        except zmq.ZMQError as exc:
            raise RuntimeError(f"password is not a CURVE secret key: {exc}") from None
    public, secret = zmq.curve_keypair()
    log.warning("no CURVE key pair in password (neither a .key_secret file here nor a z85 secret "
                "key): using a fresh one, which only a relay that admits any key lets in")
    return KeyPair(public, secret, "fresh")


def cooperate_with_eventlet() -> None:
    """Murano's engine and agent run monkey-patched by eventlet: make the
    Node's I/O thread wait through eventlet's hub (murano_zmq.oslo.green)."""
    if "eventlet" not in sys.modules:
        return
    from eventlet import patcher

    if not patcher.is_monkey_patched("thread"):
        return  # eventlet imported, nothing patched: OS threads as usual
    try:
        from ..oslo.green import cooperate_if_patched
    except ImportError:  # the oslo extra is not installed (a tenant VM): load green.py alone
        cooperate_if_patched = _green_without_oslo().cooperate_if_patched
    cooperate_if_patched()


def _green_without_oslo():
    import importlib.util

    name = "murano_zmq.oslo.green"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "oslo" / "green.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    return max(0.0, float(timeout))


class BaseSubscription:
    """A consumer of one queue: ``with client.open(queue) as s: s.get_message(5)``."""

    message_class: type = None  # set by the flavour

    def __init__(self, client: "BaseMqClient", queue: str, prefetch_count: int = 1):
        self._client = client
        self._queue = queue
        self._mailbox = client.mailbox(queue)
        self._prefetch = prefetch_count or UNLIMITED_PREFETCH
        self._consumer = None

    def __enter__(self) -> "BaseSubscription":
        self._client._check_connected()
        if self._consumer is not None:  # (a second consumer would leave the first's messages stranded)
            raise RuntimeError(f"subscription to {self._queue!r} is open already: enter it once")
        self._consumer = self._client._node.consume(self._mailbox, prefetch=self._prefetch,
                                                    direct=False)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> bool:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.cancel()  # what was taken and not acked goes back to the queue
        return False

    def get_message(self, timeout: float | None = None):
        """The next message, or None after `timeout` seconds (None: wait)."""
        timeout = check_timeout(timeout)
        self._client._check_connected()
        if self._consumer is None:
            raise RuntimeError(f"subscription to {self._queue!r} is not open: "
                               "use it as a context manager (with client.open(queue) as s: ...)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # In slices, so that a close() from another thread ends the wait.
            left = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
            consumer = self._consumer
            if consumer is not None and consumer.node is not self._client._node:
                # (the client was closed and connected again: this consumer's node is gone, and
                # it would return nothing for ever, the queue's messages notwithstanding)
                self._consumer = None  # (so that entering it again opens it again)
                raise RuntimeError(f"subscription to {self._queue!r} was closed with its client: open it again")
            handle = consumer.get(max(0.0, left)) if consumer is not None else None
            if handle is not None:
                return self.message_class(self._client, handle)
            self._client._check_connected()
            if self._consumer is None:
                raise RuntimeError(f"subscription to {self._queue!r} was closed")
            if deadline is not None and time.monotonic() >= deadline:
                return None


class BaseMqClient:
    """MqClient: a Node to one relay, with the AMQP wrapper's methods."""

    subscription_class: type = BaseSubscription  # set by the flavour
    #: seconds a call waits for the relay before RelayUnavailable
    timeout = 30.0

    def __init__(self, login, password, host, port, virtual_host,
                 ssl=False, ssl_version=None, ca_certs=None, insecure=False):
        self._relay = relay_endpoint(host, port)
        self._virtual_host = virtual_host
        self._name = check_peer_name(f"{login or 'murano'}@{socket.gethostname()}-{os.getpid()}-{next(_clients)}",
                                     "node (login@host-pid-n)")
        # ssl_version has no CURVE equivalent (CURVE has one version): ignored.
        self._curve = curve_keys(ssl, password, ca_certs, insecure)
        self._node: Node | None = None
        self._connected = False

    @property
    def relay(self) -> str:
        return self._relay

    def mailbox(self, queue: str) -> str:
        """The mailbox name of AMQP queue (or routing key) `queue`."""
        return mailbox_name(self._virtual_host, queue)

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> bool:
        self.close()
        return False

    def connect(self) -> None:
        """Start the node.  It connects in the background and keeps
        reconnecting; a relay that is down shows as RelayUnavailable from
        the first call that needs it, after `timeout`."""
        if self._node is None:
            cooperate_with_eventlet()
            keys = self._curve or (None, None)
            self._node = Node(self._name, self._relay, timeout=self.timeout, direct=False,
                              discovery=False, curve_key=keys[0], relay_key=keys[1])
        self._connected = True

    def close(self) -> None:
        """Stop the node: unacked messages go back to their queues."""
        node, self._node = self._node, None
        self._connected = False
        if node is not None:
            node.close()

    def _check_connected(self) -> None:
        if not self._connected or self._node is None:
            raise RuntimeError(NOT_CONNECTED)

    def declare(self, queue, exchange='', enable_ha=False, ttl=0):
        """A durable queue; `ttl` in milliseconds, AMQP x-expires: deleted
        after that long unused.  `exchange` and `enable_ha` change nothing
        (docs/murano.md)."""
        self._check_connected()
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl != ttl:
            raise ValueError(f"ttl must be a number of milliseconds, got {ttl!r}")
        _check_exchange(exchange)
        self._node.declare(self.mailbox(queue), ttl=ttl / 1000 if ttl > 0 else None)

    def send(self, message, key, exchange='', signing_func=None):
        """Publish ``json.dumps(message.body)`` to routing key `key`; returns
        once the relay stored it (fsync'd)."""
        self._check_connected()
        _check_exchange(exchange)
        data = self._dumps(message.body)
        headers = {"message_id": str(message.id)}
        if signing_func:
            headers["signature"] = signing_func(data)
        reply_to = getattr(message, "reply_to", None)
        if reply_to:
            headers["reply_to"] = str(reply_to)
        self._node.send(self.mailbox(str(key)), data, headers=headers)

    def open(self, queue, prefetch_count=1):
        """A Subscription to `queue` (it consumes once entered)."""
        self._check_connected()
        if not is_whole(prefetch_count) or prefetch_count < 0:
            raise ValueError(f"prefetch_count must be a whole number >= 0, got {prefetch_count!r}")
        return self.subscription_class(self, queue, prefetch_count)

    @staticmethod
    def _dumps(body: Any) -> str:
        import json

        return json.dumps(body)


def _check_exchange(exchange: Any) -> None:
    if not isinstance(exchange, str):
        raise ValueError(f"exchange must be a string, got {exchange!r}")


def received_fields(handle) -> tuple[str, Any, Any, Any]:
    """(message id, reply_to, signature, text body) of a delivered message.
    A body that is not msgpack (a raw client's) is its bytes, as AMQP's
    are: a message that cannot be read must still reach the application,
    which acks it, or it would come back first for ever."""
    headers = handle.headers
    try:
        body = handle.body
    except ValueError:
        body = handle.packed_body
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return headers.get("message_id"), headers.get("reply_to"), headers.get("signature"), body
