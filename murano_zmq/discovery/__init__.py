"""Discovery: zeroconf (DNS-SD _murano-zmq._tcp) adverts of relays and nodes,
and static endpoints where multicast cannot go."""

from .zeroconf import (
    INTERFACES_ENV,
    SERVICE_TYPE,
    Advert,
    AsyncDiscovery,
    Discovery,
    auto_pattern,
    find_relay,
    parse_interfaces,
    relay_endpoints,
)

__all__ = ["Advert", "AsyncDiscovery", "Discovery", "auto_pattern", "find_relay", "relay_endpoints",
           "parse_interfaces", "SERVICE_TYPE", "INTERFACES_ENV"]
