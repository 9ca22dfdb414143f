"""The relays of one transport: a Node per relay, and which relay holds what.

With several relays in the URL, mailboxes are spread over them by a stable
hash of a shard key (see names.shard_key): every process that lists the
same relays puts a mailbox on the same one.  A relay that is down stops
only the mailboxes it holds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import zlib

import oslo_messaging

from .. import Node, PreconditionFailed
from ..protocol.message import check_peer_name

log = logging.getLogger("murano_zmq.oslo")


class Relays:
    """Lazily connected Nodes, one per relay endpoint."""

    def __init__(self, endpoints: list[str | None], name: str, **node_options):
        self.endpoints = endpoints
        self._name = f"{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        check_peer_name(f"{self._name}-{len(endpoints)}", "oslo node")  # (now, not at the first call)
        self._node_options = node_options  # Node's keyword arguments
        self._nodes: dict[int, Node] = {}
        self._lock = threading.Lock()
        self._closed = False

    def node(self, shard_key: str) -> Node:
        """The Node of the relay that holds mailboxes of `shard_key`."""
        index = zlib.crc32(shard_key.encode()) % len(self.endpoints) if len(self.endpoints) > 1 else 0
        with self._lock:
            if self._closed:
                raise oslo_messaging.MessageDeliveryFailure("the transport was cleaned up")
            node = self._nodes.get(index)
            if node is None:
                node = Node(f"{self._name}-{index}", relay=self.endpoints[index], **self._node_options)
                self._nodes[index] = node
            return node

    def close(self) -> None:
        with self._lock:
            self._closed = True
            nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            node.close()


def declare(node: Node, mailbox: str, **options) -> None:
    """Declare `mailbox`; if it exists with other options, use it as it is."""
    try:
        node.declare(mailbox, **options)
    except PreconditionFailed as exc:
        log.warning("using mailbox %s as it is: %s", mailbox, exc)


class Directory:
    """Mailboxes whose names start with a prefix, as the relay lists them.

    Fanout and notification pools need "every mailbox of this topic"; the
    relay's STATUS lists all its mailboxes, which this filters (and, when
    `cache` > 0, reuses for that many seconds)."""

    def __init__(self, cache: float = 0.0):
        self._cache = cache
        self._listings: dict[int, tuple[float, list[dict]]] = {}
        self._lock = threading.Lock()

    def find(self, node: Node, prefix: str, *, consumed_only: bool, timeout: float | None = None) -> list[str]:
        return sorted(
            mb["name"] for mb in self._mailboxes(node, timeout)
            if mb["name"].startswith(prefix) and (mb.get("consumers", 0) > 0 or not consumed_only)
        )

    def consumed(self, node: Node, mailbox: str, timeout: float | None = None) -> bool:
        """Whether `mailbox` exists and has a consumer now."""
        return any(mb["name"] == mailbox and mb.get("consumers", 0) > 0
                   for mb in self._mailboxes(node, timeout))

    def _mailboxes(self, node: Node, timeout: float | None) -> list[dict]:
        if self._cache > 0:
            with self._lock:
                cached = self._listings.get(id(node))
            if cached is not None and time.monotonic() - cached[0] < self._cache:
                return cached[1]
        mailboxes = node.status(timeout=timeout)["mailboxes"]
        if self._cache > 0:
            with self._lock:
                self._listings[id(node)] = (time.monotonic(), mailboxes)
        return mailboxes
