"""A keyed node's security beyond its relay link: CURVE on its direct ROUTER
and DEALERs, on its PUB and SUBs; ZAP with its own authorized keys; the keys
it trusts for what discovery tells it; the permissions its direct ROUTER
checks.

    authorized_keys  DIR: keys that may connect to this node (its direct ROUTER
                     and its PUB), reloaded on change; the node's own key is
                     always admitted.  Without it the node binds no direct
                     ROUTER (it still sends directly) and publishes only
                     through a forwarder.
    trusted_keys     DIR: keys whose zeroconf adverts the node believes (the
                     pin list); default: the authorized keys.  A key seen in a
                     TXT record is used only if it is here.
    permissions      FILE: the relay's permissions format; a direct SEND from a
                     key that may not `send` to the mailbox is refused (403),
                     and a discovered consumer is believed only for mailboxes
                     its key may `consume`.  Without it every authorized key
                     may send here to every mailbox this node consumes.

Every server socket of a node answers for a ZAP domain of its own
(`murano-zmq.node.<random>`) through the context's shared authenticator, so
several keyed nodes can share zmq.Context.instance().
"""

from __future__ import annotations

import logging
import uuid

import zmq

from .auth import AuthorizedKeys, KeyCheck, Watcher, ZapLease, serve_domain
from .curve import CurveClient, CurveServer
from .keys import KeyFileError, KeyPair, load_public_key

log = logging.getLogger("murano_zmq.security")

def _key_dir(value, what: str) -> AuthorizedKeys | None:
    if value is None or isinstance(value, AuthorizedKeys):
        return value
    try:
        return AuthorizedKeys(value)
    except KeyFileError as exc:
        raise ValueError(f"{what}: {exc}") from None


class NodeSecurity:
    """CURVE and ZAP for a keyed node's sockets other than its relay DEALER."""

    def __init__(self, curve: CurveClient, authorized_keys=None, trusted_keys=None, permissions=None,
                 forwarder_key=None):
        from .relay import PermissionsFile  # the same file format and reload as the relay's
        from .permissions import PermissionsError

        self.curve = curve
        self.key: KeyPair = curve.key
        self.authorized = _key_dir(authorized_keys, "authorized_keys")
        self._own_trusted = trusted_keys is not None
        self.trusted = _key_dir(trusted_keys, "trusted_keys") if trusted_keys is not None else self.authorized
        try:
            self.permissions = (permissions if permissions is None or hasattr(permissions, "allows")
                                else PermissionsFile(permissions))
        except PermissionsError as exc:
            raise ValueError(f"permissions: {exc}") from None
        try:
            self.forwarder_key = load_public_key(forwarder_key) if forwarder_key is not None else None
        except KeyFileError as exc:
            raise ValueError(f"forwarder_key: {exc}") from None
        self.domain = f"murano-zmq.node.{uuid.uuid4().hex}"
        self._lease: ZapLease | None = None
        self._watcher: Watcher | None = None
        self.on_trust_change = None  # called (watcher thread) when the trusted keys changed

    @property
    def accepts(self) -> bool:
        """Has authorized keys: may bind CURVE server sockets (ROUTER, PUB)."""
        return self.authorized is not None

    # --- lifetime -----------------------------------------------------------------

    def start(self, context: zmq.Context) -> None:
        """Serve this node's ZAP domain on `context`; watch the key files."""
        if self.accepts:
            self._lease = serve_domain(context, self.domain, KeyCheck(self.authorized, also=(self.key.public,)))
        if self.authorized is not None or self.trusted is not None or self.permissions is not None:
            self._watcher = Watcher(self._reload)

    def close(self) -> None:
        """Stop watching and the ZAP domain (after the node's sockets are closed)."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._lease is not None:
            self._lease.stop()
            self._lease = None

    def _reload(self, forced: bool) -> None:
        if self.authorized is not None:
            changed = self.authorized.reload() if forced else self.authorized.reload_if_changed()
            if changed and not self._own_trusted and self.on_trust_change is not None:
                self.on_trust_change()
        if self._own_trusted and self.trusted is not None:
            if (self.trusted.reload() if forced else self.trusted.reload_if_changed()) \
                    and self.on_trust_change is not None:
                self.on_trust_change()
        if self.permissions is not None and hasattr(self.permissions, "reload_if_changed"):
            if (self.permissions.reload() if forced else self.permissions.reload_if_changed()) \
                    and self.on_trust_change is not None:
                self.on_trust_change()

    # --- sockets ------------------------------------------------------------------

    def server(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server admitting this node's authorized keys (before bind)."""
        if not self.accepts:
            raise ValueError("a keyed node binds a server socket only with authorized_keys")
        CurveServer(self.key, self.domain).apply(sock)

    def client(self, sock: zmq.Socket, server_key: bytes) -> None:
        """CURVE client options for a connection to a server with `server_key`
        (before connect(); a socket may set another key before each connect)."""
        self.curve.for_server(server_key).apply(sock)

    # --- questions ----------------------------------------------------------------

    def identify(self, user_id: str | bytes | None) -> str | None:
        """The name of an admitted key *now* (a ZAP User-Id), else None: a key
        removed from the directory stops working on open connections too."""
        if user_id is None:
            return None
        raw = user_id.encode("ascii", "replace") if isinstance(user_id, str) else user_id
        if raw == self.key.public:
            return self.key.name or "self"
        return self.authorized.name_of(raw) if self.authorized is not None else None

    def trusted_name(self, key: str | bytes | None) -> str | None:
        """The name of `key` if it is in the pin list (or is this node's own), else None."""
        if not key:
            return None
        raw = key.encode("ascii", "replace") if isinstance(key, str) else key
        if raw == self.key.public:
            return self.key.name or "self"
        return self.trusted.name_of(raw) if self.trusted is not None else None

    def may_consume(self, name: str, mailbox: str) -> bool:
        """May the key `name` consume `mailbox` (so be believed as its consumer)?"""
        return self.permissions is None or self.permissions.allows(name, "consume", mailbox)

    def describe(self) -> str:
        who = (f"{len(self.authorized)} authorized key(s) in {self.authorized.directory}"
               if self.authorized is not None else "no authorized keys (no direct ROUTER, no PUB)")
        pins = (f"adverts pinned to {self.trusted.directory}" if self.trusted is not None
                else "adverts never trusted")
        rules = (f"direct sends checked against {getattr(self.permissions, 'path', 'permissions')}"
                 if self.permissions is not None else "no permissions file")
        return f"CURVE (public key {self.key.public.decode()}); {who}; {pins}; {rules}"


def node_security(curve: CurveClient | None, authorized_keys=None, trusted_keys=None, permissions=None,
                  forwarder_key=None) -> NodeSecurity | None:
    """A node's NodeSecurity from its arguments, or None for a node without keys
    (which must then be given none of the others)."""
    if curve is None:
        given = [n for n, v in (("authorized_keys", authorized_keys), ("trusted_keys", trusted_keys),
                                ("permissions", permissions), ("forwarder_key", forwarder_key))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need CURVE keys (curve_key and relay_key)")
        return None
    return NodeSecurity(curve, authorized_keys, trusted_keys, permissions, forwarder_key)


__all__ = ["NodeSecurity", "node_security"]
