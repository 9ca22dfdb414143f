"""Security: CURVE keys, ZAP authentication, per-identity permissions.

    keys.py         key pairs on disk (zmq.auth certificate format), loading
    curve.py        CurveServer / CurveClient: CURVE options for any socket
                    (the hook for every socket of the fabric)
    auth.py         authorized-keys directory (reloaded on change), pyzmq's
                    ZAP authenticator, refused-handshake logging
    permissions.py  the permissions file: identity + operation + mailbox -> yes/no
    relay.py        the relay's options -> a secured ROUTER and an identity per command
    node.py         a keyed node's direct ROUTER/DEALERs, PUB/SUBs: ZAP with its
                    authorized keys, pinning of discovered keys, permissions

See docs/security.md for the threat model and the setup.
"""

from .auth import AuthorizedKeys, HandshakeLog, KeyCheck, serve_domain, start_authenticator
from .curve import ZAP_DOMAIN, CurveClient, CurveServer, apply_curve_client, apply_curve_server, client_curve
from .keys import (
    KeyFileError,
    KeyPair,
    create_key_pair,
    load_authorized_keys,
    load_key_file,
    load_public_key,
    load_secret_key,
)
from .permissions import OPERATIONS, Permissions, PermissionsError

__all__ = [
    "AuthorizedKeys", "HandshakeLog", "KeyCheck", "serve_domain", "start_authenticator",
    "ZAP_DOMAIN", "CurveClient", "CurveServer", "apply_curve_client", "apply_curve_server", "client_curve",
    "KeyFileError", "KeyPair", "create_key_pair", "load_authorized_keys", "load_key_file",
    "load_public_key", "load_secret_key",
    "OPERATIONS", "Permissions", "PermissionsError",
]
