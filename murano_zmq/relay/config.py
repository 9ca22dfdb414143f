"""What a relay is told to do: RelayConfig, filled by relay/main.py's options
or by a program that embeds a relay (the demo, tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..protocol.constants import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_RELAY_ENDPOINT
from ..protocol.message import check_peer_name
from ..store.open import check_store_url, is_sqlite


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "murano-zmq")


@dataclass
class RelayConfig:
    bind: str = DEFAULT_RELAY_ENDPOINT
    data_dir: str = ""
    # '' (SQLite in data_dir) or a postgresql:// URL (docs/scale-out.md).
    store: str = ""
    # PostgreSQL: wait for the relay running on the store to end, then take
    # over (bind and serve).
    standby: bool = False
    # PostgreSQL: one of several relays serving from the store at once,
    # each its own nodes (docs/scale-out.md, "Several relays").
    shared: bool = False
    name: str = "relay"
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    # Zeroconf: interfaces to advertise the relay on ("" = do not advertise).
    discovery_interfaces: str = ""
    # Prometheus metrics on HOST:PORT ("" = none; relay/metrics.py).
    metrics: str = ""

    # Security (docs/security.md): the relay's CURVE key (a .key_secret path,
    # or a NAME in key_dir), the authorized-keys directory, the permissions
    # file; allow_all lets a keyed relay run without a permissions file.
    key: str = ""
    key_dir: str = ""
    authorized_keys: str = ""
    permissions: str = ""
    allow_all: bool = False
    # Create missing parents of data_dir (the default directory); a data_dir
    # given explicitly must have an existing parent, so a typo fails loudly.
    create_parents: bool = False

    def __post_init__(self) -> None:
        if not self.data_dir:
            self.data_dir = default_data_dir()
            self.create_parents = True
        check_peer_name(self.name, "relay")
        if self.max_message_size <= 0:
            raise ValueError("max_message_size must be > 0")
        check_store_url(self.store)
        if self.standby and is_sqlite(self.store):
            raise ValueError("--standby needs --store postgresql://...")
        if self.shared and is_sqlite(self.store):
            raise ValueError("--shared needs --store postgresql://... (a SQLite file serves one relay)")
        if self.shared and self.standby:
            raise ValueError("--shared and --standby exclude each other: a shared relay serves at once")
