"""The relay status as a text table (for `murano-zmq status` and the demo)."""

from __future__ import annotations

from typing import Any


def format_status(status: dict) -> str:
    def show(v: Any) -> str:
        return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    cols = ["mailbox", "depth", "ready", "unacked", "bytes", "consumers", "idle_s", "ttl_s", "expires_in_s"]
    rows = [[mb["name"], show(mb["depth"]), show(mb["ready"]), show(mb["unacked"]), show(mb["bytes"]),
             show(mb["consumers"]), show(mb["idle"]), show(mb["ttl"]), show(mb["expires_in"])]
            for mb in status["mailboxes"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    full = "; DISK FULL: refusing sends until space returns" if status.get("storage_full") else ""
    lines = [f"relay {status['relay']}: {status['peers']} node(s), {len(rows)} mailbox(es){full}",
             "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
