"""Which path a sender's messages to a mailbox take: direct or relay.

A mailbox goes direct when a consumer of it is known to take direct
deliveries (from the relay's LOOKUP or from discovery) and nothing this
sender gave the relay for it may still be waiting there.  It goes back to the
relay when a direct link fails or stalls.  Switching only once the other path
is drained keeps FIFO per sender and mailbox across switches: relay -> direct
waits until the relay reports the mailbox empty (depth 0) after every relay
send to it was confirmed; direct -> relay happens when a link fails or
stalls, and the link's unconfirmed records (or, for a stalled link, copies
of them), oldest first, are the first to take the relay.

With CURVE (require_keys) an endpoint is a candidate only while the table
knows the public key to expect there: from the relay's LOOKUP (the key the
relay authenticated for that consumer's session), or from discovery once
the node has pinned the advert's key against its trusted keys.  The table
only keeps keys; what counts as trusted is decided before they get here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import (DRAIN_RECHECK, FAILED_BACKOFF, FAILURES_KEPT, HOLD_LIMIT, LOOKUP_TTL, PATH_IDLE,
                        PATH_PRUNE_LOOKUPS, REFUSED_BACKOFF, Z85_KEY_LENGTH)
from .direct import endpoint_problem

HOLD = "hold"  # choose(): wait for the pending LOOKUP, then choose again


@dataclass(slots=True)
class _Path:
    endpoints: list[str] = field(default_factory=list)
    learned_at: float = float("-inf")
    lookup_pending: bool = False
    lookup_sent: float = float("-inf")
    relay_unconfirmed: int = 0  # relay sends to it not yet confirmed
    relay_undrained: bool = False  # relay may still hold messages of ours for it
    rr: int = 0
    held_since: float | None = None  # first held back while nothing was known of it
    used_at: float = float("-inf")  # the last choose() for it


class PathTable:
    def __init__(self, lookup_ttl: float = LOOKUP_TTL, require_keys: bool = False):
        self.lookup_ttl = lookup_ttl
        self.require_keys = require_keys  # CURVE: only endpoints with a known key are used
        self._paths: dict[str, _Path] = {}
        self._discovered: dict[str, set[str]] = {}  # mailbox -> endpoints seen by discovery
        self._lookup_keys: dict[str, bytes] = {}  # endpoint -> key, from the relay (preferred)
        self._discovered_keys: dict[str, bytes] = {}  # endpoint -> key, from pinned adverts
        self.failed: set[str] = set()  # endpoints whose link failed (until learned again)
        self._failures: dict[str, int] = {}  # endpoint -> its links' failures in a row
        # Is a relay session up?  While it is not, a mailbox whose relay
        # sends are all confirmed goes to a direct consumer it knows of
        # (earlier LOOKUP, adverts) without waiting for a drained LOOKUP.
        self.relay_up = True
        self._refused: dict[str, float] = {}  # endpoint -> until when its handshake refusal holds
        self.version = 0  # moves whenever what is known of direct consumers may have changed

    def key_of(self, endpoint: str) -> bytes | None:
        """The CURVE public key (z85) to expect at `endpoint`, if known."""
        return self._lookup_keys.get(endpoint) or self._discovered_keys.get(endpoint)

    def _usable(self, endpoint: str) -> bool:
        if endpoint in self.failed:
            return False
        return not self.require_keys or self.key_of(endpoint) is not None

    def _path(self, mailbox: str) -> _Path:
        path = self._paths.get(mailbox)
        if path is None:
            path = self._paths[mailbox] = _Path()
        return path

    def choose(self, mailbox: str, has_room, now: float) -> str | None:
        """A direct endpoint for the next message to `mailbox`, None (relay),
        or HOLD.  `has_room(endpoint)` says whether that link's window has room."""
        path = self._path(mailbox)
        path.used_at = now
        if path.relay_unconfirmed:
            return None  # (the common case of a stream to the relay: decided at once)
        candidates = self.direct_consumers(mailbox)
        if path.relay_undrained and candidates and not self.relay_up:
            # The relay is unreachable: direct traffic goes on (the relay
            # may still hold earlier messages of ours, which then come later).
            path.relay_undrained = False
        if path.relay_undrained:
            if candidates and path.lookup_pending and now - path.lookup_sent < HOLD_LIMIT:
                return HOLD
            return None
        if not candidates:
            if path.learned_at == float("-inf") and (path.lookup_pending or not self.relay_up):
                # Nothing known yet: wait (a while) for the first LOOKUP, or
                # for the relay session it needs, rather than start on the
                # relay, which would then have to drain before going direct.
                if path.held_since is None:
                    path.held_since = now
                if now - path.held_since < HOLD_LIMIT:
                    return HOLD
            return None
        # Round-robin over links with room; when every window is full, queue
        # behind the next one anyway: spilling to the relay would reorder.
        for i in range(len(candidates)):
            endpoint = candidates[(path.rr + i) % len(candidates)]
            if has_room(endpoint):
                path.rr += i + 1
                return endpoint
        endpoint = candidates[path.rr % len(candidates)]
        path.rr += 1
        return endpoint

    def direct_consumers(self, mailbox: str, usable: bool = True) -> list[str]:
        """The endpoints known to consume `mailbox` directly (LOOKUP's first,
        in its order, then discovery's): only those that may be used, or
        (usable False) also those whose link failed or whose key is unknown."""
        path = self._paths.get(mailbox)
        if (path is None or not path.endpoints) and mailbox not in self._discovered:
            return []  # (a mailbox no direct consumer is known for: the usual case)
        ok = self._usable if usable else (lambda e: True)
        candidates = [e for e in path.endpoints if ok(e)] if path is not None else []
        candidates += [e for e in sorted(self._discovered.get(mailbox, ())) if e not in candidates and ok(e)]
        return candidates

    def is_direct(self, mailbox: str, relay_up: bool | None = None) -> bool:
        """Would the next message to `mailbox` go direct?  (Reads only.)"""
        path = self._paths.get(mailbox)
        discovered = any(self._usable(e) for e in self._discovered.get(mailbox, ()))
        if path is None:
            return discovered
        relay_up = self.relay_up if relay_up is None else relay_up
        if path.relay_unconfirmed or (path.relay_undrained and relay_up):
            return False
        return any(self._usable(e) for e in path.endpoints) or discovered

    def relay_only(self, mailbox: str, now: float) -> bool:
        """No direct consumer of `mailbox` known at all, and a LOOKUP
        answered within lookup_ttl, none pending: then choose() gives the
        relay and wants_lookup() says no, both known in one call (a lone
        send's question)."""
        path = self._paths.get(mailbox)
        return (path is not None and not path.endpoints and not path.lookup_pending
                and now - path.learned_at < self.lookup_ttl and mailbox not in self._discovered)

    def wants_lookup(self, mailbox: str, now: float) -> bool:
        """Ask the relay again?  (Marks the lookup as pending when True.)"""
        path = self._path(mailbox)
        waiting_to_drain = path.relay_undrained and not path.relay_unconfirmed and (
            path.endpoints or self._discovered.get(mailbox))
        ttl = DRAIN_RECHECK if waiting_to_drain else self.lookup_ttl
        if path.lookup_pending or now - path.learned_at < ttl:
            return False
        path.lookup_pending = True
        path.lookup_sent = now
        return True

    def looked_up(self, mailbox: str, result: dict, now: float) -> None:
        self.version += 1
        path = self._path(mailbox)
        path.lookup_pending = False
        path.learned_at = now
        path.endpoints = []
        for entry in result.get("direct", ()):
            # [node name, endpoint, key]: the key is nil from a relay without
            # CURVE (and absent from a relay of an earlier release).
            if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1], str):
                continue
            endpoint = entry[1]
            if endpoint_problem(endpoint) is not None:  # (a relay's word is checked too)
                continue
            key = _key(entry[2]) if len(entry) > 2 else None
            if key is not None:
                self._lookup_keys[endpoint] = key
            else:
                self._lookup_keys.pop(endpoint, None)
            path.endpoints.append(endpoint)
        self._forgive(path.endpoints, now)
        if result.get("depth") == 0 and path.relay_unconfirmed == 0:
            path.relay_undrained = False

    def lookup_failed(self, mailbox: str, now: float) -> None:
        path = self._path(mailbox)
        path.lookup_pending = False
        path.learned_at = now  # ask again after the usual interval, not per message

    def discovered(self, mailbox: str, endpoints: "set[str] | dict[str, bytes | str | None]",
                   now: float | None = None) -> None:
        """Discovery's view of who consumes `mailbox` directly (replaces the
        last): endpoints, or endpoint -> pinned key (already checked as trusted)."""
        self.version += 1
        if isinstance(endpoints, dict):
            for endpoint, key in endpoints.items():
                key = _key(key)
                if key is not None:
                    self._discovered_keys[endpoint] = key
                else:
                    self._discovered_keys.pop(endpoint, None)
        if not isinstance(endpoints, dict):
            endpoints = dict.fromkeys(endpoints)
        endpoints = {e: k for e, k in endpoints.items() if endpoint_problem(e) is None}  # (as LOOKUP's)
        if endpoints:
            self._discovered[mailbox] = set(endpoints)
            self._forgive(endpoints, now)
        else:
            self._discovered.pop(mailbox, None)
        if self._discovered_keys:  # forget keys of endpoints no advert names any more
            named = set().union(*self._discovered.values()) if self._discovered else set()
            for endpoint in [e for e in self._discovered_keys if e not in named]:
                del self._discovered_keys[endpoint]

    def discovered_mailboxes(self) -> list[str]:
        return list(self._discovered)

    def via_relay(self, mailbox: str, count: int = 1, now: float | None = None) -> None:
        """`count` records to `mailbox` go through the relay (`now`: and no
        choose() was asked for them: the lone-send shortcut)."""
        path = self._path(mailbox)
        path.relay_unconfirmed += count
        path.relay_undrained = True
        if now is not None:
            path.used_at = now

    def relay_confirmed(self, mailbox: str, count: int = 1) -> None:
        path = self._path(mailbox)
        path.relay_unconfirmed = max(0, path.relay_unconfirmed - count)

    def relay_bound(self, mailbox: str) -> bool:
        """Will every further record to `mailbox` go to the relay until one
        of its relay sends is confirmed?  (Relay sends still unconfirmed.)"""
        path = self._paths.get(mailbox)
        return path is not None and path.relay_unconfirmed > 0

    def link_failed(self, endpoint: str, now: float) -> None:
        """The link timed out or its peer said BYE.  Its endpoint is tried
        again when reported again, but after a second failure in a row
        (no CONFIRM between) it is left alone for FAILED_BACKOFF, doubling
        at each failure up to REFUSED_BACKOFF, whatever LOOKUP says: tried
        again at each LOOKUP, an endpoint that never answers (which any
        consumer may offer) cost every other send to its mailbox the direct
        timeout."""
        self.failed.add(endpoint)
        if len(self._failures) >= FAILURES_KEPT and endpoint not in self._failures:
            self._failures.clear()  # (endpoints a relay offered: bounded)
        n = self._failures[endpoint] = self._failures.get(endpoint, 0) + 1
        if n > 1:
            # (the exponent bounded: a float of 2 ** 1100 overflows, and an endpoint may fail for days)
            self._hold(endpoint, now + min(REFUSED_BACKOFF, FAILED_BACKOFF * 2 ** min(n - 2, 16)), now)

    def link_worked(self, endpoint: str) -> None:
        """A CONFIRM came over the link: its failures no longer count."""
        if endpoint in self._failures:
            del self._failures[endpoint]

    def link_refused(self, endpoint: str, now: float) -> None:
        """The peer's handshake refused this node's key: leave the endpoint
        alone for REFUSED_BACKOFF, even if it is reported again."""
        self.failed.add(endpoint)
        self._hold(endpoint, now + REFUSED_BACKOFF, now)

    def _hold(self, endpoint: str, until: float, now: float) -> None:
        """Leave `endpoint` alone until `until` (the later of two holds)."""
        if len(self._refused) >= FAILURES_KEPT:  # (endpoints a relay offered: bounded)
            self._refused = {e: t for e, t in self._refused.items() if t > now}
        self._refused[endpoint] = max(self._refused.get(endpoint, 0.0), until)

    def _forgive(self, endpoints, now: float | None) -> None:
        """Endpoints reported again may be tried again (failed links), unless
        their refusal still holds (`now` None: it does)."""
        for endpoint in endpoints:
            until = self._refused.get(endpoint)
            if until is not None:
                if now is None or now < until:
                    continue
                del self._refused[endpoint]
            self.failed.discard(endpoint)

    def mailboxes(self) -> list[str]:
        return list(self._paths)

    def prune(self, now: float, busy) -> list[str]:
        """Forget the paths of mailboxes not sent to, looked up or advertised
        for PATH_IDLE (none in `busy`: records of theirs out on links), and
        the failed endpoints no path names any more.  A path whose messages
        the relay may still hold is kept (a direct consumer found later
        must not overtake them): returns those mailboxes, to look up (a
        drained answer lets the next pass forget them)."""
        ask = []
        for mailbox, path in list(self._paths.items()):
            if (path.relay_unconfirmed or path.lookup_pending or path.held_since is not None
                    or now - path.learned_at < PATH_IDLE or now - path.used_at < PATH_IDLE
                    or mailbox in busy or mailbox in self._discovered):
                continue
            if not path.relay_undrained:
                del self._paths[mailbox]
            elif len(ask) < PATH_PRUNE_LOOKUPS:
                ask.append(mailbox)
        if self.failed:
            named = {e for path in self._paths.values() for e in path.endpoints}
            named.update(*self._discovered.values())
            held = {e for e, until in self._refused.items() if until > now}
            self.failed &= named | held
        return ask


def _key(value) -> bytes | None:
    """A z85 public key as bytes, or None for anything else."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if isinstance(value, bytes) and len(value) == Z85_KEY_LENGTH:
        return value
    return None
