"""The operator's subcommands and options of `murano-zmq` (docs/operations.md):

    status --watch               live depth and rates (rich on a TTY, else lines)
    purge MAILBOX                drop READY messages
    move MAILBOX --to OTHER      move READY messages (dead letters back to work)
    peek MAILBOX --count N       show READY messages without taking them

(The relay's --metrics and --check-config are relay options: relay/main.py,
relay/metrics.py, relay/checks.py.)  cli.py calls extend_parser() and
dispatches through COMMANDS; the admin commands speak to the relay through
murano_zmq.admin.Admin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

DEFAULT_WATCH_INTERVAL = 2.0


def extend_parser(sub: argparse._SubParsersAction, add_key_options: Callable) -> None:
    """Add --watch to `status`, and the admin subcommands."""
    from .argtypes import bounded_int, positive_seconds, relay_endpoint
    from .protocol.constants import DEFAULT_RELAY_ENDPOINT, MAX_LIMIT, RELAY_ENV

    relay_help = f"relay endpoint (default: ${RELAY_ENV}, else {DEFAULT_RELAY_ENDPOINT})"
    _positive_float, _at_least_one = positive_seconds, bounded_int(1)

    p = sub.choices["status"]
    p.add_argument("--watch", action="store_true",
                   help="refresh until Ctrl-C: depth and rates per mailbox (rich on a terminal; "
                        "with --json one status object per line)")
    p.add_argument("--interval", type=_positive_float, default=DEFAULT_WATCH_INTERVAL,
                   help="seconds between refreshes with --watch (default %(default)s)")
    p.add_argument("--iterations", type=_at_least_one, help="with --watch: stop after N refreshes")

    p = sub.add_parser("purge", help="drop a mailbox's ready messages (admin)",
                       description="Remove every READY message of MAILBOX; unacked ones stay with "
                                   "their consumers.  Needs the admin permission when keys are on.")
    p.add_argument("mailbox")

    p = sub.add_parser("move", help="move a mailbox's ready messages to another (admin)",
                       description="Move READY messages of MAILBOX to --to, oldest first, each one "
                                   "atomically (never lost, never doubled); e.g. dead letters back to "
                                   "work.  Stops at a full target.  Exit 1 if it stopped early.")
    p.add_argument("mailbox")
    p.add_argument("--to", required=True, metavar="OTHER", help="the mailbox to move them to")
    p.add_argument("--limit", type=bounded_int(1, MAX_LIMIT), help="move at most N messages (default: all)")

    p = sub.add_parser("peek", help="show a mailbox's first ready messages without taking them (admin)",
                       description="Print copies of the first READY messages of MAILBOX; nothing is "
                                   "taken, acked or counted as a delivery.")
    p.add_argument("mailbox")
    p.add_argument("--count", type=bounded_int(1, 1000), default=1, help="messages to show, 1..1000 (default 1)")

    for command in ("purge", "move", "peek"):
        p = sub.choices[command]
        p.add_argument("--relay", type=relay_endpoint, help=relay_help)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds to wait for the relay")
        add_key_options(p)


def _admin(args: argparse.Namespace):
    from .admin import Admin

    return Admin(args.relay, timeout=args.timeout, name=f"cli-{args.command}",
                 curve_key=args.key, relay_key=args.relay_key, key_dir=args.key_dir)


def cmd_purge(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        purged = admin.purge(args.mailbox)
    print(json.dumps({"mailbox": args.mailbox, "purged": purged}) if args.json
          else f"purged {purged} message(s) from {args.mailbox}")
    return 0


def cmd_move(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        result = admin.move(args.mailbox, args.to, args.limit)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"moved {result['moved']} message(s) from {args.mailbox} to {args.to}; "
              f"{result['left']} ready left in {args.mailbox}")
        if result.get("stopped"):
            print(f"murano-zmq: stopped early: {result['stopped']}", file=sys.stderr)
    return 1 if result.get("stopped") else 0


def cmd_peek(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        messages = admin.peek(args.mailbox, args.count)
    for msg in messages:
        record = msg.to_json()
        if args.json:
            print(json.dumps(record, default=repr))
        else:
            body = record["body"]
            shown = body if isinstance(body, str) else json.dumps(body, default=repr)
            headers = f" headers={json.dumps(record['headers'], default=repr)}" if record["headers"] else ""
            print(f"{record['id']} deliveries={record['deliveries']}{headers} {shown}")
    if not messages and not args.json:
        print(f"{args.mailbox}: no ready messages", file=sys.stderr)
    return 0


# --- status --watch -------------------------------------------------------------------

WATCH_COLUMNS = ("mailbox", "ready", "unacked", "depth", "consumers", "bytes", "depth/s")


def watch_rows(previous: dict | None, current: dict, seconds: float) -> tuple[str, list[list[str]]]:
    """(headline, rows) for one refresh: per mailbox, the depth change per
    second since `previous`; in the headline, relay-wide rates."""
    def rate(now: float, before: float | None) -> str:
        return "-" if before is None or seconds <= 0 else f"{(now - before) / seconds:+.1f}"

    before = {mb["name"]: mb for mb in (previous or {}).get("mailboxes", [])}
    rows = []
    for mb in current["mailboxes"]:
        old = before.get(mb["name"])
        rows.append([mb["name"], str(mb["ready"]), str(mb["unacked"]), str(mb["depth"]), str(mb["consumers"]),
                     str(mb["bytes"]), rate(mb["depth"], old["depth"] if old else None)])
    counters, old_counters = current.get("counters", {}), (previous or {}).get("counters", {})

    def per_second(key: str) -> str:
        if previous is None or seconds <= 0 or key not in old_counters:
            return "-"
        return f"{(counters.get(key, 0) - old_counters[key]) / seconds:.1f}/s"

    headline = (f"relay {current['relay']}: {current['peers']} session(s), {len(rows)} mailbox(es); "
                f"published {per_second('received')}, delivered {per_second('delivered')}, "
                f"acked {per_second('acked')}")
    return headline, rows


def _plain(headline: str, rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(WATCH_COLUMNS)]
    lines = [time.strftime("%Y-%m-%d %H:%M:%S ") + headline,
             "  ".join(c.ljust(w) for c, w in zip(WATCH_COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _rich_table(headline: str, rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=headline, caption=time.strftime("%H:%M:%S  Ctrl-C to stop"))
    for i, column in enumerate(WATCH_COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _use_rich() -> bool:
    if not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_watch(args: argparse.Namespace) -> int:
    """`status --watch`: like `rabbitmqctl list_queues`, refreshed."""
    from .admin import Admin

    fancy = _use_rich() and not args.json
    live = None
    previous, taken = None, time.monotonic()
    done = 0
    try:
        with Admin(args.relay, timeout=args.timeout, name="cli-watch", curve_key=args.key,
                   relay_key=args.relay_key, key_dir=args.key_dir) as admin:
            while args.iterations is None or done < args.iterations:
                current, now = admin.status(), time.monotonic()
                headline, rows = watch_rows(previous, current, now - taken)
                if args.json:  # one STATUS map per line, with the time it was taken
                    print(json.dumps({"time": time.time(), **current}), flush=True)
                elif fancy:
                    if live is None:
                        from rich.live import Live

                        live = Live(_rich_table(headline, rows), auto_refresh=False)
                        live.start()
                    live.update(_rich_table(headline, rows), refresh=True)
                else:
                    print(_plain(headline, rows) + "\n", flush=True)
                previous, taken = current, now
                done += 1
                if args.iterations is None or done < args.iterations:
                    time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return 0


COMMANDS = {
    "purge": cmd_purge,
    "move": cmd_move,
    "peek": cmd_peek,
}
