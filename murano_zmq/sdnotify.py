"""systemd's readiness protocol (sd_notify), without libsystemd.

Under `Type=notify`, systemd passes $NOTIFY_SOCKET, a unix datagram socket
(a path, or '@name' in the abstract namespace); the service sends
"READY=1" there once it serves, "STOPPING=1" when it begins to stop.
Outside systemd the variable is unset and notify() does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("murano_zmq")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to $NOTIFY_SOCKET;
    True if sent.  A failure is logged, never raised: readiness reporting
    must not stop a working service."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
