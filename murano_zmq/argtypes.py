"""argparse value types shared by the murano-zmq commands and the devices.

Each refuses a bad value with one line (argparse then exits 2), so no
command meets inf, nan or an absurd size at run time.
"""

from __future__ import annotations

import argparse
import math
import re

from .protocol.constants import MAX_LIMIT, MAX_SECONDS
from .protocol.direct import TRANSPORTS, tcp_port


# Largest --max-message-size a relay takes: a message must fit in memory.
MAX_MESSAGE_SIZE_LIMIT = 1 << 30


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = _number(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= {MAX_SECONDS:g} seconds: {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration that may be 0."""
    value = _number(text)
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be >= 0 and <= {MAX_SECONDS:g} seconds: {text!r}")
    return value


def bounded_int(low: int, high: int | None = None):
    """A whole number in [low, high] (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


count = bounded_int(0)
limit = bounded_int(0, MAX_LIMIT)  # a mailbox's max_length / max_bytes
delivery_limit = bounded_int(1, MAX_LIMIT)  # a mailbox's delivery_limit
message_size = bounded_int(1, MAX_MESSAGE_SIZE_LIMIT)


def given(text: str) -> str:
    """A path or name given on purpose: an empty one (an unset variable in
    `--key "$RELAY_KEY"`) would silently mean the option's absence, e.g. a
    relay without CURVE."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave the option out for its default)")
    return text


def peer_name(text: str) -> str:
    """A relay's or node's name (protocol.message.check_peer_name)."""
    from .protocol.message import check_peer_name

    try:
        return check_peer_name(text, "the")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_ENDPOINT = re.compile(rf"({'|'.join(TRANSPORTS)})://\S+")


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint, transport://address."""
    if not _ENDPOINT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5570): {text!r}")
    port = tcp_port(text)
    if port is not None and port > 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range (0-65535): {text!r}")
    return text


def relay_endpoint(text: str) -> str:
    """A relay to connect to: an endpoint, several comma-separated (the node
    moves to the next when one is lost), or 'auto' / 'auto:PATTERN' (every
    relay zeroconf finds, or those whose name matches PATTERN).  Endpoints
    are judged as the node will judge them (node.sockets.check_endpoint)."""
    if text == "auto" or text.startswith("auto:"):
        return text
    from .node.sockets import check_endpoint

    try:
        return ",".join(check_endpoint(endpoint(part.strip())) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
