"""Zeroconf discovery: relays and nodes advertise themselves as DNS-SD
services of type _murano-zmq._tcp.local. and browse for each other.

AsyncDiscovery runs on an asyncio loop (zeroconf's asyncio API); Discovery
runs one on a loop thread that every Discovery of the process shares, for
threaded code, its methods waiting with a bound.  Interfaces are explicit: loopback unless configured otherwise
(MURANO_ZMQ_DISCOVERY_INTERFACES, --discovery-interfaces, or `interfaces=`).

A TXT record is a claim by whoever sent it: discovery tells a node where to
connect, never whom to trust (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
import ipaddress
import os
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable
from urllib.parse import urlsplit

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..protocol.constants import PROTOCOL_VERSION
from ..protocol.message import printable, shown_peer_name

log = logging.getLogger("murano_zmq.discovery")

SERVICE_TYPE = "_murano-zmq._tcp.local."
INTERFACES_ENV = "MURANO_ZMQ_DISCOVERY_INTERFACES"
DEFAULT_INTERFACES = "127.0.0.1"
# One TXT string is at most 255 bytes; a longer mailbox list is left out
# (senders then learn consumers from the relay's LOOKUP).
MAX_TXT_VALUE = 200
RESOLVE_TRIES = 3  # of 3 s each


def parse_interfaces(value: str | None) -> list[str] | InterfaceChoice:
    """"127.0.0.1,10.0.0.5" -> addresses; "all" -> every interface."""
    value = (value or os.environ.get(INTERFACES_ENV) or DEFAULT_INTERFACES).strip()
    if value == "all":
        return InterfaceChoice.All
    addresses = [a.strip() for a in value.split(",") if a.strip()]
    if not addresses:
        raise ValueError(f"no discovery interface in {value!r}: IPv4 addresses, comma-separated, or 'all'")
    for a in addresses:
        try:
            ipaddress.IPv4Address(a)  # (dotted quads only: inet_aton took "127.1", zeroconf does not)
        except ValueError:
            raise ValueError(f"discovery interface {a!r} is not an IPv4 address (or 'all')") from None
    return addresses


@dataclass(frozen=True)
class Advert:
    """What a relay or node says about itself."""

    name: str
    role: str  # "relay" or "node"
    endpoint: str = ""  # relay ROUTER, or the node's direct ROUTER
    pub: str = ""  # the node's PUB endpoint, if it publishes
    mailboxes: tuple[str, ...] = ()  # mailboxes it consumes directly
    key: str = ""  # CURVE public key (z85), if any: to be pinned, not trusted
    version: int = PROTOCOL_VERSION

    def properties(self) -> dict[str, str]:
        props = {"role": self.role, "name": self.name, "v": str(self.version),
                 "endpoint": self.endpoint, "pub": self.pub, "key": self.key}
        boxes = ",".join(self.mailboxes)
        if len(boxes) <= MAX_TXT_VALUE:
            props["mailboxes"] = boxes
        return props

    @classmethod
    def from_properties(cls, props: dict) -> "Advert | None":
        def text(key: str) -> str:
            value = props.get(key.encode()) or b""
            return printable(value.decode("utf-8", "replace")[:MAX_TXT_VALUE + 55])

        try:
            version = int(text("v") or 0)
        except ValueError:
            return None
        if text("role") not in ("relay", "node") or not text("name"):
            return None
        return cls(shown_peer_name(text("name")), text("role"), text("endpoint"), text("pub"),
                   tuple(m for m in text("mailboxes").split(",") if m), text("key"), version)


def _service_name(advert: Advert) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in advert.name)[:50]
    if advert.role == "relay":
        # Relays often share a name (the default is "relay"), and two
        # services of one name are one service to a browser: a node would
        # see one of several relays.  The endpoint's hash tells them apart
        # (and the label stays within DNS's 63 bytes).
        return f"relay-{safe[:40]}-{zlib.crc32(advert.endpoint.encode()):08x}.{SERVICE_TYPE}"
    return f"{advert.role}-{safe}.{SERVICE_TYPE}"


def _address_of(endpoint: str) -> bytes:
    host = urlsplit(endpoint.replace("tcp://", "http://", 1)).hostname or "127.0.0.1"
    try:
        return socket.inet_aton(host)
    except OSError:
        return socket.inet_aton("127.0.0.1")


class AsyncDiscovery:
    """Advertise and browse on the running loop.  `on_change(peers)` is called
    (on the loop) whenever the set of known adverts changes."""

    def __init__(self, interfaces: str | list[str] | None = None,
                 on_change: Callable[[dict[str, Advert]], None] | None = None):
        self.interfaces = interfaces if isinstance(interfaces, list) else parse_interfaces(interfaces)
        self.on_change = on_change
        self.peers: dict[str, Advert] = {}  # service name -> advert
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._mine: dict[str, AsyncServiceInfo] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """ValueError (one line) if zeroconf cannot use the interfaces: an
        address that is not this host's, say."""
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            where = "all interfaces" if self.interfaces is InterfaceChoice.All else ",".join(self.interfaces)
            raise ValueError(f"cannot use discovery interface(s) {where}: {exc.strerror or exc} "
                             f"(give IPv4 addresses of this host, or 'all')") from None
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._changed])

    async def advertise(self, advert: Advert) -> None:
        """Register `advert`, or update it if this name is advertised already."""
        name = _service_name(advert)
        # "seq" makes every update a TXT record never seen before: zeroconf's
        # cache keeps an older record with the same data in its old place
        # and readers take the last one added, so going back to an earlier
        # set of mailboxes (e.g. none, after a cancel) would go unseen.
        properties = {**advert.properties(), "seq": f"{time.time_ns():x}"}
        info = AsyncServiceInfo(SERVICE_TYPE, name, addresses=[_address_of(advert.endpoint or advert.pub)],
                                port=int(urlsplit((advert.endpoint or advert.pub or "tcp://x:1")
                                                  .replace("tcp://", "http://", 1)).port or 1),
                                properties=properties, server=name.split(".")[0] + ".local.")
        if name in self._mine:
            await self._zc.async_update_service(info)
        else:
            # No probing round (~1 s): names carry the node's name, which is
            # unique per process by default (host-pid).
            await self._zc.async_register_service(info, cooperating_responders=True)
        self._mine[name] = info

    def _changed(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            if self.peers.pop(name, None) is not None:
                self._notify()
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        # The browser reports a service once: a resolve that times out (a
        # loaded machine, a lost packet) would hide it until its next update.
        for _ in range(RESOLVE_TRIES):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(self._zc.zeroconf, 3000):
                break
        else:
            log.debug("no answer resolving %s", name)
            return
        advert = Advert.from_properties(info.properties or {})
        if advert is None:
            log.warning("ignoring malformed advert %s", name)
            return
        if self.peers.get(name) != advert:
            self.peers[name] = advert
            self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(dict(self.peers))

    async def close(self, leftovers: bool = True) -> None:
        """Stop advertising and browsing.  `leftovers`: also end every other
        task of the loop (zeroconf leaves announcement tasks behind); only
        for a loop no other AsyncDiscovery shares."""
        if self._zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        await self._zc.async_unregister_all_services()
        await self._zc.async_close()
        self._zc = None
        if leftovers:
            await _end_other_tasks()


async def _end_other_tasks() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class _SharedLoop:
    """The one asyncio loop thread that every Discovery of a process shares.

    Why one: asyncio keeps "the running loop" per OS thread.  Once eventlet
    has patched a process (oslo.messaging services), every Discovery thread
    is a green thread of the same OS thread, so a second loop fails with
    "Cannot run the event loop while another loop is running" and its Node
    never starts.  One loop for all also saves a thread per Node."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _users = 0

    @classmethod
    def acquire(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                cls._thread = threading.Thread(target=cls._loop.run_forever, name="murano-zmq-discovery",
                                               daemon=True)
                cls._thread.start()
            cls._users += 1
            return cls._loop

    @classmethod
    def release(cls, timeout: float) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._loop is None:
                return
            loop, thread, cls._loop, cls._thread = cls._loop, cls._thread, None, None
        try:
            asyncio.run_coroutine_threadsafe(_end_other_tasks(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the parent's loop thread does not exist here."""
        cls._lock = threading.Lock()
        cls._loop, cls._thread, cls._users = None, None, 0


os.register_at_fork(after_in_child=_SharedLoop.forget)


class Discovery:
    """AsyncDiscovery on a loop in its own thread, for threaded code."""

    def __init__(self, interfaces: str | list[str] | None = None,
                 on_change: Callable[[dict[str, Advert]], None] | None = None, timeout: float = 10.0):
        self.timeout = timeout
        self._loop = _SharedLoop.acquire()
        self._async = AsyncDiscovery(interfaces, on_change)
        try:
            self._call(self._async.start())
        except BaseException:
            _SharedLoop.release(timeout)
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    @property
    def peers(self) -> dict[str, Advert]:
        return dict(self._async.peers)

    @property
    def interfaces(self):
        """The addresses browsed and advertised on (or InterfaceChoice.All)."""
        return self._async.interfaces

    def advertise(self, advert: Advert) -> None:
        self._call(self._async.advertise(advert))

    def wait_for(self, predicate: Callable[[dict[str, Advert]], object], timeout: float):
        """Wait (bounded) until predicate(peers) is truthy; returns its value or None."""
        done = threading.Event()
        result: list = []

        def check() -> None:
            value = predicate(dict(self._async.peers))
            if value:
                result.append(value)
                done.set()

        previous = self._async.on_change

        def on_change(peers: dict[str, Advert]) -> None:
            if previous is not None:
                previous(peers)
            check()

        self._loop.call_soon_threadsafe(check)
        self._async.on_change = on_change
        try:
            done.wait(timeout)
        finally:
            self._async.on_change = previous
        return result[0] if result else None

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._async.close(leftovers=False))
        finally:
            self._loop = None
            _SharedLoop.release(self.timeout)


AUTO = "auto"


def auto_pattern(relay) -> str | None:
    """relay="auto" -> "*" (every relay advertised); "auto:PATTERN" -> PATTERN
    (the relays whose advertised name matches it, fnmatch-style: one fabric
    among several on a LAN); anything else -> None (not discovered)."""
    if not isinstance(relay, str) or not (relay == AUTO or relay.startswith(AUTO + ":")):
        return None
    pattern = relay[len(AUTO) + 1:].strip()
    return pattern or "*"


def relay_endpoints(peers: dict[str, Advert], pattern: str = "*",
                    usable: Callable[[str], bool] | None = None) -> list[str]:
    """The endpoints of the relays in `peers` whose name matches `pattern`
    (and that `usable` accepts: an advert is a claim), sorted."""
    return sorted({a.endpoint for a in peers.values()
                   if a.role == "relay" and a.endpoint and fnmatchcase(a.name, pattern)
                   and (usable is None or usable(a.endpoint))})


def wait_for_relays(discovery: "Discovery", pattern: str = "*", timeout: float = 5.0,
                    settle: float = 0.3, usable: Callable[[str], bool] | None = None) -> list[str]:
    """Wait (at most `timeout`) for a relay matching `pattern`, then up to
    `settle` more for the others that answer the same query, and return
    every endpoint found (sorted).  RelayUnavailable if none."""
    from ..protocol.errors import RelayUnavailable

    def found(peers: dict) -> list[str]:
        return relay_endpoints(peers, pattern, usable)

    if not discovery.wait_for(found, timeout):
        chosen = discovery.interfaces
        where = ",".join(chosen) if isinstance(chosen, list) else "all interfaces"
        which = "" if pattern == "*" else f" named {pattern!r}"
        raise RelayUnavailable(f"no relay{which} advertised on {where} within {timeout}s")
    first = len(found(discovery.peers))
    discovery.wait_for(lambda peers: len(found(peers)) > first, settle)
    return found(discovery.peers)


def find_relay(interfaces: str | None = None, timeout: float = 5.0, pattern: str = "*") -> str:
    """The endpoint of one relay advertised on the LAN (the first, sorted):
    for one-shot clients (the admin commands) that need no failover."""
    discovery = Discovery(interfaces)
    try:
        return wait_for_relays(discovery, pattern, timeout, settle=0.0)[0]
    finally:
        discovery.close()
