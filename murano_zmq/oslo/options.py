"""The driver's settings: the [oslo_messaging_zmqrelay] options of the
service's configuration, each of which the transport URL's query may
override (as the rabbit driver does with [oslo_messaging_rabbit]).

    zmqrelay://relay-a:5570,relay-b:5570/vhost?prefetch=50&transient_ttl=600

Hosts are relays (``tcp://host:port``; the port defaults to 5570).  With
no host the node's default applies: $MURANO_ZMQ_RELAY, else
tcp://127.0.0.1:5570.  The virtual host, if any, namespaces the mailbox
names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oslo_config import cfg

from .. import DEFAULT_RELAY_ENDPOINT
from ..protocol.constants import MAX_HEARTBEAT, MAX_PREFETCH, MAX_SECONDS, MIN_HEARTBEAT
from ..protocol.direct import bind_problem

GROUP = "oslo_messaging_zmqrelay"
DEFAULT_PORT = int(DEFAULT_RELAY_ENDPOINT.rsplit(":", 1)[1])

OPTS = [
    cfg.IntOpt("prefetch", default=100, min=1, max=MAX_PREFETCH,
               help="Messages a listener's consumer may hold unacknowledged (its credit); "
                    "raised to the batch size of batch listeners."),
    cfg.FloatOpt("transient_ttl", default=1800.0, min=0.001, max=MAX_SECONDS,
                 help="Seconds a reply or fanout mailbox outlives its last consumer."),
    cfg.FloatOpt("relay_timeout", default=30.0, min=0.001, max=MAX_SECONDS,
                 help="Seconds a send, declare or listing waits for the relay before it fails "
                      "(MessageDeliveryFailure; MessagingTimeout for a call)."),
    cfg.FloatOpt("notification_ttl", default=0.0, min=0.0, max=MAX_SECONDS,
                 help="Seconds a notification waits for a listener; 0: until one comes."),
    cfg.FloatOpt("directory_cache", default=0.0, min=0.0, max=MAX_SECONDS,
                 help="Seconds a listing of the relay's fanout and pool mailboxes is reused; "
                      "0: list on every fanout and notification."),
    cfg.FloatOpt("heartbeat", default=1.0, min=MIN_HEARTBEAT, max=MAX_HEARTBEAT,
                 help="Seconds between a node's heartbeats to its relay."),
    cfg.StrOpt("name", default="oslo",
               help="Prefix of the node names this service shows the relays."),
    cfg.BoolOpt("direct", default=False,
                help="Deliver peer to peer when the consumer is reachable (murano-zmq direct "
                     "delivery).  A direct send returns once the consuming application acked "
                     "it, not once the relay stored it; see docs/oslo.md."),
    cfg.StrOpt("direct_bind", default="",
               help="Where a node takes direct deliveries, e.g. tcp://10.0.0.5:* "
                    "(empty: the node's default, loopback only)."),
    cfg.StrOpt("curve_key", default="",
               help="This service's CURVE key pair: a .key_secret file (murano-zmq keygen). "
                    "With relay_key: encrypted, authenticated connections to the relays "
                    "(this service then receives through the relay only)."),
    cfg.StrOpt("relay_key", default="",
               help="The relays' CURVE public key: a .key file or its 40-character z85 text."),
]


def list_opts() -> list:
    """For oslo-config-generator."""
    return [(GROUP, OPTS)]


@dataclass(frozen=True)
class DriverOptions:
    """The settings in force for one transport (OPTS says what each means)."""

    prefetch: int = 100
    transient_ttl: float = 1800.0
    relay_timeout: float = 30.0
    notification_ttl: float | None = None
    directory_cache: float = 0.0
    heartbeat: float = 1.0
    name: str = "oslo"
    direct: bool = False
    direct_bind: str = ""
    curve_key: str = ""
    relay_key: str = ""

    @classmethod
    def load(cls, conf: cfg.ConfigOpts, query: dict) -> "DriverOptions":
        """The configuration's values, overridden by the URL's `query`;
        ValueError names an unknown or bad query parameter."""
        conf.register_opts(OPTS, group=GROUP)
        known = {opt.dest: opt for opt in OPTS}
        unknown = sorted(set(query) - set(known))
        if unknown:
            raise ValueError(f"unknown zmqrelay URL option(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        group = conf[GROUP]
        values = {}
        for name, opt in known.items():
            if name in query:
                try:
                    values[name] = opt.type(query[name])
                except ValueError as exc:
                    raise ValueError(f"zmqrelay URL option {name}={query[name]!r}: {exc}") from None
            else:
                values[name] = getattr(group, name)
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):  # (min= and max= let nan pass)
                raise ValueError(f"zmqrelay option {name} must be a finite number, got {value!r}")
        if values["direct_bind"] and (problem := bind_problem(values["direct_bind"])) is not None:
            raise ValueError(f"zmqrelay option direct_bind: {problem}")  # (else every send failed)
        values["notification_ttl"] = values["notification_ttl"] or None
        return cls(**values)


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
