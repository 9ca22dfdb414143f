"""Keys, permissions and CURVE relays for the security tests.

Key names follow the Murano roles: a conductor, two agents (env e1, units
u1 and u2), an operator, and a stranger whose key the relay does not know.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from murano_zmq.security import CurveClient, create_key_pair, load_public_key, load_secret_key

NAMES = ("relay", "conductor-1", "agent-e1-u1", "agent-e1-u2", "ops", "stranger")

PERMISSIONS = """
[identity."conductor-*"]
send = ["agent.*", "api.results"]
consume = ["conductor", "conductor.results"]
declare = ["agent.*", "dlx.*"]

[identity."agent-*-*"]
consume = ["agent.{1}.{2}"]
send = ["conductor.results"]

[identity.ops]
admin = ["*"]
"""


class Keys:
    """A key directory with every NAME, and an authorized-keys directory with all but
    the relay's own and the stranger's public keys."""

    def __init__(self, root: Path):
        self.dir = root / "keys"
        self.authorized = root / "authorized"
        self.authorized.mkdir(parents=True)
        for name in NAMES:
            create_key_pair(name, self.dir)
            if name not in ("relay", "stranger"):
                shutil.copy(self.dir / f"{name}.key", self.authorized / f"{name}.key")
        self.permissions = root / "permissions.toml"
        self.permissions.write_text(PERMISSIONS)

    def secret(self, name: str):
        return load_secret_key(self.dir / f"{name}.key_secret")

    def public(self, name: str) -> bytes:
        return load_public_key(self.dir / f"{name}.key")

    def client(self, name: str) -> CurveClient:
        """CURVE options for a client with key NAME talking to the relay."""
        return CurveClient(self.secret(name), self.public("relay"))

    def node_kw(self, name: str) -> dict:
        return {"curve_key": self.secret(name), "relay_key": self.public("relay")}

    def relay_args(self, *extra: str) -> tuple[str, ...]:
        return ("--key", str(self.dir / "relay.key_secret"), "--authorized-keys", str(self.authorized),
                *extra)


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path / "sec")


@pytest.fixture
def secure_relay(relay_factory, keys):
    """A relay with CURVE, the authorized keys and the permissions file; probed as ops."""
    return relay_factory(*keys.relay_args("--permissions", str(keys.permissions)),
                         probe_curve=keys.client("ops"))


def relay_log(relay) -> str:
    relay.log_file.flush()
    return Path(relay.log_file.name).read_text(errors="replace")
