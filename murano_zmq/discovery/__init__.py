"""Discovery: zeroconf (DNS-SD _murano-zmq._tcp) adverts of relays and nodes,
and static endpoints where multicast cannot go."""

from .zeroconf import (
    INTERFACES_ENV,
    SERVICE_TYPE,
    Advert,
    AsyncDiscovery,
    Discovery,
    find_relay,
    parse_interfaces,
)

__all__ = ["Advert", "AsyncDiscovery", "Discovery", "find_relay", "parse_interfaces", "SERVICE_TYPE",
           "INTERFACES_ENV"]
