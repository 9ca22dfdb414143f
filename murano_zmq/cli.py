"""The `murano-zmq` command: relay, send, consume, declare, delete, status, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from . import cli_ops
from .argtypes import (
    bounded_int,
    count as _count,
    delivery_limit as _delivery_limit,
    given,
    limit as _limit,
    positive_seconds as _positive_float,
    relay_endpoint,
    seconds,
)
from .discovery.zeroconf import INTERFACES_ENV
from .forwarder import add_forwarder_arguments
from .protocol.constants import (
    DEFAULT_PREFETCH,
    DEFAULT_RELAY_ENDPOINT,
    OVERFLOWS,
    RELAY_ENV,
)
from .protocol.errors import MuranoZmqError, RelayUnavailable
from .relay.main import DESCRIPTION as RELAY_DESCRIPTION, add_relay_arguments
from .status_view import format_status

RELAY_HELP = (f"relay endpoint, or several comma-separated (a lost session moves to the next), or "
              f"'auto' (every relay zeroconf finds; 'auto:PATTERN': those whose name matches); "
              f"default: ${RELAY_ENV}, else {DEFAULT_RELAY_ENDPOINT}")
# What `demo` runs at most: each agent is a node (sockets, a session) in one
# of at most 16 agent host processes.
DEMO_MAX_ENVS, DEMO_MAX_UNITS, DEMO_MAX_AGENTS = 1000, 100, 5000


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"header must be key=value, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="murano-zmq",
        description="Brokerless messaging on ZeroMQ with durable mailboxes held by a relay device.",
        epilog="Run 'murano-zmq COMMAND --help' for a command's options.",
    )
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("relay", help="run the relay device (holds mailboxes on disk)",
                       description=RELAY_DESCRIPTION)
    add_relay_arguments(p)

    p = sub.add_parser("send", help="send one message to a mailbox",
                       description="Send BODY (or stdin with '-') to MAILBOX and print the message "
                                   "id once the relay has stored it durably.")
    p.add_argument("mailbox")
    p.add_argument("body", nargs="?", default="-", help="the body text, or - for stdin (default)")
    p.add_argument("--relay", type=relay_endpoint, help=RELAY_HELP)
    p.add_argument("--ttl", type=_positive_float, help="message time-to-live in seconds")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="KEY=VALUE",
                   help="a header (repeatable)")
    p.add_argument("--json", action="store_true", help="parse BODY as JSON instead of sending text")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds to wait for the relay")

    p = sub.add_parser("consume", help="print messages from a mailbox",
                       description="Consume MAILBOX, printing each message; ack it unless --no-ack.")
    p.add_argument("mailbox")
    p.add_argument("--relay", type=relay_endpoint, help=RELAY_HELP)
    p.add_argument("--count", type=_count, help="stop after N messages")
    p.add_argument("--timeout", type=_positive_float,
                   help="stop after S seconds without a message (default: wait forever)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-ack", action="store_true", help="leave the messages in the mailbox")
    p.add_argument("--prefetch", type=bounded_int(1, 10_000), default=DEFAULT_PREFETCH,
                   help="credit, 1 to 10000 (the relay's limit; default %(default)s)")

    p = sub.add_parser("declare", help="create a mailbox with options",
                       description="Declare MAILBOX. Declaring again with other options fails.")
    p.add_argument("mailbox")
    p.add_argument("--relay", type=relay_endpoint, help=RELAY_HELP)
    p.add_argument("--ttl", type=_positive_float, help="delete after S idle seconds (no consumer, no traffic)")
    p.add_argument("--message-ttl", type=_positive_float, help="default message time-to-live, seconds")
    p.add_argument("--max-length", type=_limit, help="most ready messages held")
    p.add_argument("--max-bytes", type=_limit, help="most body bytes held")
    p.add_argument("--overflow", choices=OVERFLOWS, default="reject",
                   help="when full: reject the send (default) or drop the oldest")
    p.add_argument("--dead-letter", help="mailbox for expired, dropped and rejected messages")
    p.add_argument("--delivery-limit", type=_delivery_limit, metavar="N",
                   help="deliveries a message may have: one that comes back after N (requeued, or its "
                        "consumer gone) goes to the dead-letter mailbox, or away")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds to wait for the relay")

    p = sub.add_parser("delete", help="delete a mailbox and its messages")
    p.add_argument("mailbox")
    p.add_argument("--relay", type=relay_endpoint, help=RELAY_HELP)
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds to wait for the relay")

    p = sub.add_parser("status", help="show the relay's mailboxes",
                       description="Per mailbox: depth, bytes, consumers, idle seconds, ttl, expires in.")
    p.add_argument("--relay", type=relay_endpoint, help=RELAY_HELP)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds to wait for the relay")

    p = sub.add_parser("peers", help="list the relays and nodes zeroconf discovery sees",
                       description="Browse _murano-zmq._tcp for a while and print what advertises itself.")
    p.add_argument("--discovery-interfaces", default=None, metavar="ADDRS",
                   help=f"IPv4 addresses to browse on (default ${INTERFACES_ENV}, else 127.0.0.1)")
    p.add_argument("--wait", type=_positive_float, default=2.0,
                   help="seconds to browse (default %(default)s); with --expect, the most to wait")
    p.add_argument("--expect", action="append", default=[], metavar="NAME",
                   help="stop browsing as soon as a peer of this name is seen (repeatable: all of them); "
                        "exit 1 if one is still missing after --wait")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("forwarder", help="run a pub/sub forwarder device (XSUB -> XPUB)",
                       description="Publishers that cannot reach subscribers connect their PUB to "
                                   "--xsub; subscribers connect to --xpub.  Events are not stored.")
    add_forwarder_arguments(p)

    p = sub.add_parser("demo", help="run the Murano flow (api, 2 conductors, late agents) on an embedded relay",
                       description="Start a relay in a temporary directory, two conductors and the api; "
                                   "deploy ENVS environments of UNITS units each, starting every agent "
                                   "only after its plan waits in its mailbox; then delete one environment "
                                   "and show its agent mailboxes expire.  Exit 0 only if every "
                                   "deployment completed exactly once.")
    p.add_argument("--envs", type=bounded_int(1, DEMO_MAX_ENVS), default=5,
                   help=f"environments to deploy, 1-{DEMO_MAX_ENVS} (default %(default)s)")
    p.add_argument("--units", type=bounded_int(1, DEMO_MAX_UNITS), default=3,
                   help=f"units (agents) per environment, 1-{DEMO_MAX_UNITS}; ENVS x UNITS at most "
                        f"{DEMO_MAX_AGENTS} (default %(default)s)")
    p.add_argument("--chaos", action="store_true",
                   help="SIGKILL the relay (and restart it), a conductor mid-task, an agent mid-plan")
    p.add_argument("--seed", type=int, default=1, help="seed for --chaos choices (default %(default)s)")
    p.add_argument("--agent-ttl", type=_positive_float, default=5.0,
                   help="idle seconds before an agent mailbox expires (default %(default)s)")
    p.add_argument("--step-seconds", type=seconds, default=0.3,
                   help="seconds each of a plan's two work steps takes (default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, help="give up after S seconds (default: scales with size)")

    p = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret)",
                       description="Write NAME.key (public: copy it into a relay's authorized-keys "
                                   "directory) and NAME.key_secret (keep it private) in DIR, in "
                                   "pyzmq's zmq.auth certificate format. See docs/security.md.")
    p.add_argument("name", help="key name: the identity in the relay's permissions file")
    p.add_argument("--dir", type=given, default=".", help="directory for the key files (default: current)")
    p.add_argument("--force", action="store_true", help="replace existing key files")

    for command in ("send", "consume", "declare", "delete", "status"):
        _add_key_options(sub.choices[command])
    cli_ops.extend_parser(sub, _add_key_options)  # status --watch, purge/move/peek
    return parser


def _add_key_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--key", type=given, metavar="NAME|FILE",
                   help="own CURVE key pair: a .key_secret file, or NAME in --key-dir")
    g.add_argument("--key-dir", type=given, metavar="DIR", help="where --key (and --relay-key) NAMEs are looked up")
    g.add_argument("--relay-key", type=given, metavar="NAME|FILE|Z85",
                   help="the relay's public key: a .key file, NAME in --key-dir, or z85 text")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "relay":
        args.log_level = args.log_level if args.log_level != "WARNING" else "INFO"
        logging.getLogger().setLevel(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except RelayUnavailable as exc:
        hint = ("Is a relay running, and does it know this key (--key) under this relay key "
                "(--relay-key)?" if getattr(args, "key", None)
                else "Is a relay running? Start one with 'murano-zmq relay'.")
        print(f"murano-zmq: {exc}. {hint}", file=sys.stderr)
        return 1
    except (MuranoZmqError, ValueError) as exc:
        print(f"murano-zmq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # (a path given that cannot be used: keygen --dir a file)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"murano-zmq: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_relay(args: argparse.Namespace) -> int:
    from .relay.main import run_from_args

    return run_from_args(args)


def _node(args: argparse.Namespace, name: str):
    from .node.sync import Node

    from .security.curve import client_curve

    relay = args.relay or os.environ.get(RELAY_ENV) or None
    if relay is not None and args.relay is None:
        try:
            relay_endpoint(relay)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"${RELAY_ENV}: {exc}") from None
    curve = client_curve(args.key, args.relay_key, args.key_dir)
    return Node(name, relay=relay, timeout=args.timeout or 10.0,
                curve_key=curve.key if curve else None, relay_key=curve.server_key if curve else None)


def cmd_send(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.body == "-" else args.body
    body: Any = text
    if args.json:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            print(f"murano-zmq: BODY is not JSON: {exc}", file=sys.stderr)
            return 2
    with _node(args, "cli-send") as node:
        msg_id = node.send(args.mailbox, body, headers=dict(args.header) or None, ttl=args.ttl)
    print(msg_id.hex())
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_consume(args: argparse.Namespace) -> int:
    if args.count == 0:
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    seen = 0
    with _node(args, "cli-consume") as node:
        consumer = node.consume(args.mailbox, prefetch=max(1, min(args.prefetch, args.count or args.prefetch)))
        try:
            while args.count is None or seen < args.count:
                msg = consumer.get(timeout=args.timeout)
                if msg is None:
                    break
                if args.json:
                    print(json.dumps(msg.to_json(), default=repr), flush=True)
                else:
                    try:
                        body = msg.body
                    except ValueError as exc:  # (printed as hex: one line per message all the same)
                        print(f"murano-zmq: message {msg.id.hex()}: {exc}", file=sys.stderr)
                        body = msg.packed_body.hex()
                    if isinstance(body, bytes):
                        body = body.decode("utf-8", "replace")
                    print(body if isinstance(body, str) else json.dumps(body, default=repr), flush=True)
                if not args.no_ack:
                    msg.ack()
                seen += 1
        except KeyboardInterrupt:
            pass
        consumer.cancel()
    return 0


def cmd_declare(args: argparse.Namespace) -> int:
    with _node(args, "cli-declare") as node:
        status = node.declare(args.mailbox, ttl=args.ttl, message_ttl=args.message_ttl,
                              max_length=args.max_length, max_bytes=args.max_bytes,
                              overflow=args.overflow, dead_letter=args.dead_letter,
                              delivery_limit=args.delivery_limit)
    print(json.dumps(status))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _node(args, "cli-delete") as node:
        node.delete(args.mailbox)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return cli_ops.cmd_watch(args)
    with _node(args, "cli-status") as node:
        status = node.status()
    if args.json:
        print(json.dumps(status))
        return 0
    print(format_status(status))
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    from .discovery.zeroconf import Discovery

    expected = set(args.expect)
    discovery = Discovery(args.discovery_interfaces)
    try:
        # Browse for --wait seconds, or until every --expect name is seen.
        discovery.wait_for(lambda peers: bool(expected) and expected <= {a.name for a in peers.values()},
                           args.wait)
        peers = sorted(discovery.peers.values(), key=lambda a: (a.role, a.name))
    finally:
        discovery.close()
    missing = expected - {a.name for a in peers}
    for a in peers:
        if args.json:
            print(json.dumps({"role": a.role, "name": a.name, "endpoint": a.endpoint, "pub": a.pub,
                              "mailboxes": list(a.mailboxes), "key": a.key, "version": a.version}))
        else:
            extra = f" pub={a.pub}" if a.pub else ""
            extra += f" mailboxes={','.join(a.mailboxes)}" if a.mailboxes else ""
            print(f"{a.role:<6} {a.name:<24} {a.endpoint}{extra}")
    if not peers and not args.json:
        print("nothing advertised", file=sys.stderr)
    if missing:
        print(f"not seen within {args.wait:g}s: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    return 0


def cmd_forwarder(args: argparse.Namespace) -> int:
    from .forwarder import run_from_args

    return run_from_args(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.envs * args.units > DEMO_MAX_AGENTS:
        print(f"murano-zmq: demo: {args.envs} x {args.units} = {args.envs * args.units} agents, more than the "
              f"{DEMO_MAX_AGENTS} one machine's demo runs (each agent is a node with its own sockets)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # (as Ctrl-C: the children are stopped, the temp dir removed)
    return run_demo(envs=args.envs, units=args.units, chaos=args.chaos, seed=args.seed,
                    agent_ttl=args.agent_ttl, step_seconds=max(0.0, args.step_seconds), timeout=args.timeout)


def cmd_keygen(args: argparse.Namespace) -> int:
    from .security.keys import create_key_pair, load_key_file

    public, secret = create_key_pair(args.name, args.dir, overwrite=args.force)
    print(f"public key  {public}  ({load_key_file(public).public.decode()})")
    print(f"secret key  {secret}  (keep private)")
    return 0


COMMANDS = {
    "relay": cmd_relay,
    "send": cmd_send,
    "consume": cmd_consume,
    "declare": cmd_declare,
    "delete": cmd_delete,
    "status": cmd_status,
    "demo": cmd_demo,
    "peers": cmd_peers,
    "forwarder": cmd_forwarder,
    "keygen": cmd_keygen,
    **cli_ops.COMMANDS,
}

if __name__ == "__main__":
    sys.exit(main())
