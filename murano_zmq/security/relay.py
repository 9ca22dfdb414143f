"""The relay's security: from its options to a CURVE ROUTER, a ZAP handler,
the identity behind every command, and the permissions to check it against.

Modes (decided once, at start; a bad combination is refused with a message
that says what to add or remove):

    no --key                          open: plain TCP, no identities (development)
    --key --authorized-keys --permissions   CURVE; only authorized keys connect;
                                      each command is checked against the file
    --key --authorized-keys --allow-all     CURVE; only authorized keys connect;
                                      they may do everything
    --key --allow-all                 CURVE encryption, any client key, no
                                      identities (not recommended)

The relay loop asks identify() for every message: the ZAP User-Id of the
connection (the client's public key) is looked up in the authorized keys *in
force now*, so a key removed from the directory loses access on connections
already open, not only on new ones.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq

from .auth import AuthorizedKeys, HandshakeLog, KeyCheck, Watcher, serve_domain
from .curve import ZAP_DOMAIN, CurveServer
from .keys import KeyFileError, KeyPair, load_secret_key
from .permissions import Permissions, PermissionsError

log = logging.getLogger("murano_zmq.security")


class SecurityConfigError(ValueError):
    """The relay's security options do not fit together, or a file is unusable."""


class PermissionsFile:
    """A permissions file in force, reloaded when it changes.

    A reload that fails (bad TOML, unknown operation) keeps the table in
    force and logs why, so a typo never opens or closes everything.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._signature = self._stat()
        self.current = Permissions.load(self.path)

    def allows(self, identity: str | None, op: str, mailbox: str) -> bool:
        return self.current.allows(identity, op, mailbox)

    def may_any(self, identity: str | None, op: str) -> bool:
        return self.current.may_any(identity, op)

    def reload(self) -> bool:
        self._signature = self._stat()
        try:
            self.current = Permissions.load(self.path)
        except PermissionsError as exc:
            log.error("permissions: reload failed, keeping the rules in force: %s", exc)
            return False
        log.warning("permissions reloaded from %s: %d identity table(s)", self.path,
                    len(self.current.rules))
        return True

    def reload_if_changed(self) -> bool:
        return self._stat() != self._signature and self.reload()

    def _stat(self) -> tuple:
        try:
            st = self.path.stat()
        except OSError:
            return ("missing",)
        return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class RelaySecurity:
    key: KeyPair | None = None
    keys: AuthorizedKeys | None = None
    permissions: PermissionsFile | None = None

    def __post_init__(self) -> None:
        self._auth = None
        self._handshakes: HandshakeLog | None = None
        self._watcher: Watcher | None = None
        self._revision = 0  # bumped by every reload that changed the keys
        self._swept = 0

    @property
    def enabled(self) -> bool:
        """CURVE is on: every message carries a User-Id to identify()."""
        return self.key is not None

    @classmethod
    def from_options(cls, key: str = "", key_dir: str = "", authorized_keys: str = "",
                     permissions: str = "", allow_all: bool = False) -> "RelaySecurity":
        if not key:
            if authorized_keys or permissions:
                raise SecurityConfigError(
                    "--authorized-keys and --permissions need the relay's own key (--key): "
                    "without CURVE there is no identity to check")
            if allow_all:
                log.warning("--allow-all without --key changes nothing: the relay is open to every client")
            return cls()
        if permissions and allow_all:
            raise SecurityConfigError("--permissions and --allow-all exclude each other: pick one")
        if permissions and not authorized_keys:
            raise SecurityConfigError("--permissions needs --authorized-keys DIR: identities in the "
                                      "permissions file are the names of authorized keys")
        if not permissions and not allow_all:
            raise SecurityConfigError(
                "the relay has a key but no --permissions FILE: refusing to start with every "
                "authenticated client allowed everything; add --permissions FILE, or --allow-all "
                "to mean it")
        try:
            pair = load_secret_key(key, key_dir or None)
            keys = AuthorizedKeys(authorized_keys) if authorized_keys else None
            rules = PermissionsFile(permissions) if permissions else None
        except (KeyFileError, PermissionsError) as exc:
            raise SecurityConfigError(str(exc)) from None
        return cls(pair, keys, rules)

    def describe(self) -> str:
        if not self.enabled:
            return "open (no CURVE key: plain TCP, no authentication, no permissions)"
        if self.keys is None:
            who = "ANY client key (no --authorized-keys)"
        elif len(self.keys):
            who = f"{len(self.keys)} authorized key(s) in {self.keys.directory}"
        else:  # (an empty directory authorizes no one: it is not the absence of --authorized-keys)
            who = f"no authorized key in {self.keys.directory}: every client is refused"
        what = (f"permissions from {self.permissions.path}" if self.permissions
                else "all operations allowed (--allow-all)")
        return f"CURVE (public key {self.key.public.decode()}); {who}; {what}"

    # --- the socket -----------------------------------------------------------------

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server with ZAP, before it binds.  No-op when open."""
        if not self.enabled:
            return
        # The context's shared ZAP handler: keyed nodes in the same process
        # (tests, the demo) serve their own domains through it.
        self._auth = serve_domain(sock.context, ZAP_DOMAIN, KeyCheck(self.keys))
        CurveServer(self.key).apply(sock)
        self._handshakes = HandshakeLog(sock, "relay")
        if self.keys is not None or self.permissions is not None:
            self._watcher = Watcher(self._reload)
        log.info("relay security: %s", self.describe())

    def identify(self, frame: zmq.Frame) -> tuple[str | None, str | None]:
        """(identity, None) for a message's first frame, or (None, why not).

        The identity is the key name, or None when any key is admitted.
        """
        name, _key, why = self.identify_key(frame)
        return name, why

    def identify_key(self, frame: zmq.Frame) -> tuple[str | None, str | None, str | None]:
        """(identity, public key, None) for a message's first frame, or
        (None, None, why not).  The public key (z85 text, the ZAP User-Id) is
        what LOOKUP hands to senders as the consumer's key for direct links."""
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None, None, "unauthenticated connection"
        if self.keys is None:
            return None, user_id, None
        name = self.keys.name_of(user_id)
        if name is None:
            return None, None, f"key {user_id} is no longer authorized"
        return name, user_id, None

    def reload_soon(self) -> None:
        """Reload keys and permissions now (SIGHUP); safe in a signal handler."""
        if self._watcher is not None:
            self._watcher.poke()

    def sweep(self, engine, now: float) -> None:
        """Drop the engine's sessions of keys removed since the last sweep
        (called by the relay loop every turn; cheap when nothing changed)."""
        if self._swept == self._revision or self.keys is None:
            return
        self._swept = self._revision
        names = set(self.keys.names())
        dropped = engine.drop_sessions(lambda user: user in names, "key no longer authorized", now)
        if dropped:
            log.warning("dropped %d session(s) of keys no longer authorized", dropped)

    def _reload(self, forced: bool) -> None:
        if self.keys is not None:
            if self.keys.reload() if forced else self.keys.reload_if_changed():
                self._revision += 1
        if self.permissions is not None:
            self.permissions.reload() if forced else self.permissions.reload_if_changed()

    def close(self) -> None:
        """Stop the monitor, the watcher and the ZAP handler (before the socket closes)."""
        if self._handshakes is not None:
            self._handshakes.close()
            self._handshakes = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
