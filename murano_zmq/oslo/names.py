"""Mailbox names for oslo.messaging targets.

A mailbox name is 1-255 characters of letters, digits and ``_ . : @ -``.
oslo names (exchanges, topics, servers, pools) may hold anything, so each
one is escaped into letters, digits and ``_ . -`` (any other character
becomes ``@`` and two hex digits per UTF-8 byte), and ``:`` separates the
parts.  A part never contains ``:``, so a name has one reading, and the
prefix ``oslo.fanout:<exchange>:<topic>:`` matches the fanout mailboxes of
exactly that topic (not those of a topic ``<topic>.x``).

::

    oslo.rpc:<exchange>:<topic>                  servers of a topic compete
    oslo.rpc:<exchange>:<topic>:<server>         one server
    oslo.fanout:<exchange>:<topic>:<server>:<listener>   one listener's copy of fanouts
    oslo.reply:<id>                              one caller's replies
    oslo.notify:<exchange>:<topic>.<priority>          listeners without a pool
    oslo.notify:<exchange>:<topic>.<priority>:<pool>   one pool's copy

A virtual host in the transport URL goes between ``oslo`` and the kind:
``oslo.<vhost>.rpc:...``, so two deployments can share a relay.

Names longer than 255 characters are cut and end in a digest of the whole,
so that a topic's fanout and pool mailboxes still start with the prefix
they are listed by (which is cut itself past 246 characters).
"""

from __future__ import annotations

import hashlib
import re

from ..protocol.constants import MAX_NAME_LENGTH

MAX_NAME = MAX_NAME_LENGTH  # a mailbox name's length
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]")
_DIGEST_CHARS = 16


def escape(part: str) -> str:
    """`part` in letters, digits and ``_ . -``; anything else as ``@xx``."""
    if not part:
        return "@"  # an empty part still takes a place
    out = []
    for ch in part:
        if _PLAIN.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"@{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def _bounded(name: str, limit: int = MAX_NAME) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_DIGEST_CHARS]
    return f"{name[:limit - _DIGEST_CHARS - 1]}-{digest}"


# A listed group's prefix (``...:<topic>:``) must start every member's
# name, cut or not.  Up to _MAX_PREFIX characters a cut by _bounded keeps
# it; up to _MAX_KEPT_PREFIX a long member's name is the prefix and a
# shorter digest (_member); a longer prefix is cut itself, to _MAX_PREFIX.
# Names that fit are never changed.
_MAX_PREFIX = MAX_NAME - _DIGEST_CHARS - 1
_SHORT_DIGEST_CHARS = 8
_MAX_KEPT_PREFIX = MAX_NAME - _SHORT_DIGEST_CHARS - 1


def _member(prefix: str, part: str) -> str:
    """The name of a group's member `part` (escaped) under `prefix`."""
    name = prefix + part
    if len(name) <= MAX_NAME or len(prefix) <= _MAX_PREFIX:
        return _bounded(name)
    digest = hashlib.sha256(name.encode()).hexdigest()[:MAX_NAME - len(prefix) - 1]
    return f"{prefix}-{digest}"


class MailboxNames:
    """The mailbox names of one namespace (``oslo`` or ``oslo.<vhost>``)."""

    def __init__(self, virtual_host: str | None = None):
        self.root = "oslo" if not virtual_host else f"oslo.{escape(virtual_host)}"

    def _name(self, kind: str, *parts: str) -> str:
        return _bounded(":".join([f"{self.root}.{kind}", *map(escape, parts)]))

    def _prefix(self, kind: str, *parts: str) -> str:
        """The prefix the mailboxes of a group (a topic's fanout or pool
        mailboxes) share, found by listing: with a very long topic the
        prefix itself is cut (so that a member's cut name still starts with
        it)."""
        prefix = ":".join([f"{self.root}.{kind}", *map(escape, parts)]) + ":"
        if len(prefix) <= _MAX_KEPT_PREFIX:
            return prefix
        return _bounded(prefix[:-1], _MAX_PREFIX - 1) + ":"

    # --- RPC -------------------------------------------------------------------------

    def topic(self, exchange: str, topic: str) -> str:
        return self._name("rpc", exchange, topic)

    def server(self, exchange: str, topic: str, server: str) -> str:
        return self._name("rpc", exchange, topic, server)

    def fanout(self, exchange: str, topic: str, server: str, listener: str) -> str:
        """One listener's copy of a topic's fanouts: `listener` sets apart
        the workers of one service that share a server name (rabbit's
        fanout queues are one per listener too)."""
        return _member(self.fanout_prefix(exchange, topic), f"{escape(server)}:{escape(listener)}")

    def fanout_prefix(self, exchange: str, topic: str) -> str:
        return self._prefix("fanout", exchange, topic)

    def reply(self, reply_id: str) -> str:
        return self._name("reply", reply_id)

    # --- notifications ------------------------------------------------------------------

    def notifications(self, exchange: str, topic: str) -> str:
        """Listeners without a pool share this one; `topic` is ``<topic>.<priority>``."""
        return self._name("notify", exchange, topic)

    def pool(self, exchange: str, topic: str, pool: str) -> str:
        return _member(self.pool_prefix(exchange, topic), escape(pool))

    def pool_prefix(self, exchange: str, topic: str) -> str:
        return self._prefix("notify", exchange, topic)


def shard_key(exchange: str, topic: str) -> str:
    """Which relay holds a topic's mailboxes: every mailbox of one
    (exchange, topic) lives on one relay, so one listing finds its fanout
    and pool mailboxes."""
    return f"{exchange}\0{topic}"
