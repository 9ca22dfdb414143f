"""Error codes of the wire protocol and the exceptions they become.

A relay answers a failed command with ERROR (code, text); the node raises the
exception class registered for that code.  LocalProtocolError means the caller
misused the API; RemoteProtocolError means the peer sent something invalid.
"""

from .constants import MAX_ERROR_TEXT


class MuranoZmqError(Exception):
    """Base class of every error murano-zmq raises."""


class LocalProtocolError(MuranoZmqError):
    """The caller asked for something the protocol does not allow."""


class RemoteProtocolError(MuranoZmqError):
    """A peer sent bytes that are not a valid command."""

    code = 400


class VersionMismatch(RemoteProtocolError):
    """A peer speaks another version of the protocol."""

    code = 426


class RelayUnavailable(MuranoZmqError):
    """No relay answered within the time allowed."""


class SendQueueFull(MuranoZmqError):
    """The node already holds its limit of messages it could not hand on yet
    (typically: no relay reachable for them)."""


class StartupError(MuranoZmqError):
    """A device cannot start (data directory in use, database corrupt,
    address in use); the text is the one line an operator reads."""


class NodeClosed(MuranoZmqError):
    """The node was closed while the operation was pending."""


class RelayError(MuranoZmqError):
    """The relay refused a command; .code and .text say why."""

    code = 500

    def __init__(self, text: str, code: int | None = None):
        if len(text) > MAX_ERROR_TEXT:  # (it goes on the wire: quoted input may be any size)
            text = text[:MAX_ERROR_TEXT - 3] + "..."
        super().__init__(text)
        self.text = text
        if code is not None:
            self.code = code


class Malformed(RelayError):
    code = 400


class PermissionDenied(RelayError):
    code = 403


class MailboxNotFound(RelayError):
    code = 404


class UnknownCommand(RelayError):
    code = 405


class PreconditionFailed(RelayError):
    code = 406


class NotReady(RelayError):
    code = 409


class MessageTooLarge(RelayError):
    code = 413


class UnsupportedVersion(RelayError):
    code = 426


class MailboxFull(RelayError):
    code = 429


class InternalError(RelayError):
    code = 500


class ShuttingDown(RelayError):
    code = 503


class StorageFull(RelayError):
    """The relay's disk is full, or its writes keep failing: it stores
    nothing new until it can again (consumers and acks still work).
    Nothing of the send was stored."""

    code = 507



ERROR_CLASSES: dict[int, type[RelayError]] = {
    cls.code: cls
    for cls in (
        Malformed,
        PermissionDenied,
        MailboxNotFound,
        UnknownCommand,
        PreconditionFailed,
        NotReady,
        MessageTooLarge,
        UnsupportedVersion,
        MailboxFull,
        InternalError,
        ShuttingDown,
        StorageFull,
    )
}

# Code -> symbolic name, as written in docs/protocol.md.
ERROR_NAMES: dict[int, str] = {
    400: "MALFORMED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNKNOWN_COMMAND",
    406: "PRECONDITION_FAILED",
    409: "NOT_READY",
    413: "TOO_LARGE",
    426: "UNSUPPORTED_VERSION",
    429: "MAILBOX_FULL",
    500: "INTERNAL",
    503: "SHUTTING_DOWN",
    507: "STORAGE_FULL",
}


def error_from_code(code: int, text: str) -> RelayError:
    """The exception a node raises for an ERROR (code, text) from the relay."""
    cls = ERROR_CLASSES.get(code, RelayError)
    return cls(text, code)
