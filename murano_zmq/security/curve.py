"""CURVE options for any socket of the fabric: the one hook every socket uses.

A socket that accepts connections (the relay's ROUTER, a node's ROUTER for
direct peers, a PUB or a forwarder that binds) is a CURVE *server*; a socket
that connects out (a node's DEALER, a SUB) is a CURVE *client* and must know
the public key of the server it connects to.  Apply the options before
bind()/connect():

    server = CurveServer(load_secret_key("keys/relay.key_secret"))
    server.apply(router)                 # plus start_authenticator() on its context

    client = CurveClient(load_secret_key("keys/agent-e1-u7.key_secret"),
                         load_public_key("keys/relay.key"))
    client.apply(dealer)
    client.for_server(peer_public_key).apply(peer_dealer)  # same key, another peer

A server socket gets ZAP_DOMAIN and ZAP_ENFORCE_DOMAIN, so a server whose
context has no ZAP handler running refuses every client (fail closed)
instead of admitting any key.  Discovery may tell a node *where* a peer is,
never *which key* to trust: a peer key must come from configuration or be
checked against a trusted list before for_server() is called with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq

from .keys import KeyPair, load_public_key, load_secret_key

# The ZAP domain of every murano-zmq server socket (the authenticator answers
# only for it).
ZAP_DOMAIN = "murano-zmq"


@dataclass(frozen=True, slots=True)
class CurveServer:
    """CURVE server options: this side's key pair, and the ZAP domain whose
    handler admits clients (serve_domain() / start_authenticator())."""

    key: KeyPair
    domain: str = ZAP_DOMAIN

    def __post_init__(self) -> None:
        if self.key.secret is None:
            raise ValueError("a CURVE server needs a secret key")

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.key.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.key.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


@dataclass(frozen=True, slots=True)
class CurveClient:
    """CURVE client options: this side's key pair and the server's public key."""

    key: KeyPair
    server_key: bytes  # z85

    def __post_init__(self) -> None:
        if self.key.secret is None:
            raise ValueError("a CURVE client needs a secret key")

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.key.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.key.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)

    def for_server(self, server_key: "bytes | str | KeyPair") -> "CurveClient":
        """The same own key, for a connection to another (trusted) server."""
        return CurveClient(self.key, load_public_key(server_key))


def apply_curve_server(sock: zmq.Socket, key: KeyPair) -> None:
    CurveServer(key).apply(sock)


def apply_curve_client(sock: zmq.Socket, key: KeyPair, server_key: "bytes | str | KeyPair") -> None:
    CurveClient(key, load_public_key(server_key)).apply(sock)


def client_curve(curve_key: "KeyPair | str | os.PathLike | None" = None,
                 relay_key: "KeyPair | bytes | str | os.PathLike | None" = None,
                 key_dir: "str | os.PathLike | None" = None) -> CurveClient | None:
    """A node's CURVE client options from its arguments, or None for plain TCP.

    curve_key: the node's key pair (KeyPair, a .key_secret path, or a NAME in
    key_dir); relay_key: the relay's public key (z85 text, KeyPair, a .key
    path, or a NAME in key_dir).  Both or neither: a node never falls back to
    plain TCP when one is given.
    """
    if curve_key is None and relay_key is None:
        return None
    if curve_key is None or relay_key is None:
        raise ValueError("CURVE needs both the node's key pair (curve_key) and the relay's "
                         "public key (relay_key)")
    return CurveClient(load_secret_key(curve_key, key_dir), load_public_key(relay_key, key_dir))
