"""The driver's settings, read from the transport URL.

    zmqrelay://relay-a:5570,relay-b:5570/vhost?prefetch=50&transient_ttl=600

Hosts are relays (``tcp://host:port``; the port defaults to 5570).  With
no host the node's default applies: $MURANO_ZMQ_RELAY, else
tcp://127.0.0.1:5570.  The virtual host, if any, namespaces the mailbox
names.  Query parameters are the fields of `DriverOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .. import DEFAULT_RELAY_ENDPOINT

DEFAULT_PORT = int(DEFAULT_RELAY_ENDPOINT.rsplit(":", 1)[1])


@dataclass(frozen=True)
class DriverOptions:
    """What a transport URL's query may set.

    prefetch: messages a listener's consumer holds unacknowledged (credit).
    transient_ttl: seconds a reply or fanout mailbox outlives its last use.
    relay_timeout: seconds a send or declare waits for the relay before it
      fails (MessageDeliveryFailure; MessagingTimeout for a call).
    notification_ttl: seconds a notification waits for a listener, or
      None: until one comes.
    directory_cache: seconds a listing of fanout / pool mailboxes is reused
      (0: list on every fanout and notification).
    heartbeat: seconds between the node's heartbeats to the relay.
    name: prefix of the node names this driver shows the relay.
    """

    prefetch: int = 100
    transient_ttl: float = 1800.0
    relay_timeout: float = 30.0
    notification_ttl: float | None = None
    directory_cache: float = 0.0
    heartbeat: float = 1.0
    name: str = "oslo"

    @classmethod
    def from_query(cls, query: dict) -> "DriverOptions":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(query) - set(known))
        if unknown:
            raise ValueError(f"unknown zmqrelay URL option(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        values = {}
        for key, text in query.items():
            values[key] = _convert(key, text, cls.__dataclass_fields__[key].default)
        options = cls(**values)
        options._check()
        return options

    def _check(self) -> None:
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        for name in ("transient_ttl", "relay_timeout", "heartbeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.notification_ttl is not None and self.notification_ttl <= 0:
            raise ValueError(f"notification_ttl must be > 0, got {self.notification_ttl}")
        if self.directory_cache < 0:
            raise ValueError(f"directory_cache must be >= 0, got {self.directory_cache}")


def _convert(key: str, text: str, default):
    try:
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or default is None:
            if default is None and text.lower() in ("", "none", "0"):
                return None
            return float(text)
    except ValueError:
        raise ValueError(f"zmqrelay URL option {key}={text!r} is not a number") from None
    return text


def relay_endpoints(hosts) -> list[str | None]:
    """ZeroMQ endpoints of the URL's hosts, sorted so that every process
    with the same hosts maps a mailbox to the same relay; [None] (the
    node's default) when there is none."""
    endpoints = set()
    for host in hosts:
        hostname = host.hostname or "127.0.0.1"
        if ":" in hostname:
            hostname = f"[{hostname}]"
        endpoints.add(f"tcp://{hostname}:{host.port or DEFAULT_PORT}")
    return sorted(endpoints) if endpoints else [None]
