"""murano-zmq: brokerless messaging on ZeroMQ with durable mailboxes.

    from murano_zmq import Node
    with Node("api") as node:
        node.send("conductor", {"task": 1})
"""

from .gcpolicy import collect_less
from .heap import keep_freed_memory
from .node.aio import AsyncConsumer, AsyncNode
from .node.sync import Consumer, Node
from .protocol.constants import DEFAULT_RELAY_ENDPOINT, PROTOCOL_VERSION
from .protocol.errors import (
    LocalProtocolError,
    MailboxFull,
    MailboxNotFound,
    Malformed,
    MessageTooLarge,
    MuranoZmqError,
    NodeClosed,
    PermissionDenied,
    PreconditionFailed,
    RelayError,
    RelayUnavailable,
    RemoteProtocolError,
    SendQueueFull,
    StorageFull,
)
from .protocol.message import Message, idempotent_id
from .protocol.options import MailboxOptions

__version__ = "0.1.0"

__all__ = [
    "AsyncConsumer", "AsyncNode", "Consumer", "Node", "Message", "MailboxOptions", "idempotent_id",
    "collect_less", "keep_freed_memory",
    "DEFAULT_RELAY_ENDPOINT", "PROTOCOL_VERSION",
    "MuranoZmqError", "LocalProtocolError", "RemoteProtocolError", "RelayError", "RelayUnavailable",
    "NodeClosed", "MailboxFull", "MailboxNotFound", "Malformed", "MessageTooLarge",
    "PermissionDenied", "PreconditionFailed", "SendQueueFull", "StorageFull",
]
