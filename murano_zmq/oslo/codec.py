"""What the driver's messages carry, and how.

A body is one JSON text (oslo_serialization.jsonutils, as the rabbit
driver encodes its messages, so the same Python values survive the trip:
datetimes become strings, tuples become lists).  The headers name the kind
of message, for people reading a mailbox with ``murano-zmq consume``.

    request       {"ctxt", "message", "msg_id", "reply_to", "reply_ttl", "monitor"}
    reply         {"msg_id", "result", "failure", "ending"}
    notification  {"ctxt", "message"}

msg_id and reply_to are None for a cast and a fanout.  reply_ttl is the
caller's timeout (the reply is useless after it); monitor is the caller's
call_monitor_timeout.  A reply with ending false is a heartbeat: the
server still works on the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oslo_serialization import jsonutils

FORMAT = 1
KIND = "oslo.kind"

CALL, CAST, FANOUT, REPLY, NOTIFICATION = "call", "cast", "fanout", "reply", "notification"


class BadEnvelope(ValueError):
    """A message that is not one of this driver's."""


def _encode(kind: str, fields: dict) -> tuple[str, dict]:
    return jsonutils.dumps(fields), {KIND: kind, "oslo.format": FORMAT}


def _decode(body: Any, kind: str) -> dict:
    if not isinstance(body, str):
        raise BadEnvelope(f"a {kind} body is JSON text, not {type(body).__name__}")
    try:
        fields = jsonutils.loads(body)
    except (ValueError, RecursionError) as exc:  # (RecursionError: "[[[[..." nested past Python's stack)
        raise BadEnvelope(f"a {kind} body that is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(fields, dict):
        raise BadEnvelope(f"a {kind} body is a JSON object")
    return fields


@dataclass
class Request:
    ctxt: dict
    message: dict
    msg_id: str | None = None
    reply_to: str | None = None
    reply_ttl: float | None = None
    monitor: float | None = None

    def encode(self, kind: str) -> tuple[str, dict]:
        return _encode(kind, {"ctxt": self.ctxt, "message": self.message, "msg_id": self.msg_id,
                              "reply_to": self.reply_to, "reply_ttl": self.reply_ttl,
                              "monitor": self.monitor})

    @classmethod
    def decode(cls, body: Any) -> "Request":
        f = _decode(body, "request")
        if not isinstance(f.get("message"), dict):
            raise BadEnvelope("a request without a message")
        return cls(f.get("ctxt") or {}, f["message"], f.get("msg_id"), f.get("reply_to"),
                   f.get("reply_ttl"), f.get("monitor"))


@dataclass
class Reply:
    msg_id: str
    result: Any = None
    failure: str | None = None  # serialize_remote_exception's JSON
    ending: bool = True

    def encode(self) -> tuple[str, dict]:
        return _encode(REPLY, {"msg_id": self.msg_id, "result": self.result,
                               "failure": self.failure, "ending": self.ending})

    @classmethod
    def decode(cls, body: Any) -> "Reply":
        f = _decode(body, "reply")
        if not isinstance(f.get("msg_id"), str):
            raise BadEnvelope("a reply without a msg_id")
        return cls(f["msg_id"], f.get("result"), f.get("failure"), bool(f.get("ending", True)))


@dataclass
class Notification:
    ctxt: dict
    message: dict

    def encode(self) -> tuple[str, dict]:
        return _encode(NOTIFICATION, {"ctxt": self.ctxt, "message": self.message})

    @classmethod
    def decode(cls, body: Any) -> "Notification":
        f = _decode(body, "notification")
        if not isinstance(f.get("message"), dict):
            raise BadEnvelope("a notification without a message")
        return cls(f.get("ctxt") or {}, f["message"])
