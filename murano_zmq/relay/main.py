"""The relay device's command line: its options, and main() for
`murano-zmq relay`, `python -m murano_zmq.relay` and `python -m devices.relay`.

Bad option values stop argparse (one line, exit 2); a relay that cannot
start (data directory in use or unusable, corrupt database, address in use)
prints one line and exits 1; so does one that a failed sync of its store
stopped (relay/server.py Relay._halt), for systemd to restart it.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys

from ..argtypes import endpoint, given, message_size, peer_name
from ..discovery.zeroconf import INTERFACES_ENV
from ..protocol.constants import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_RELAY_ENDPOINT
from ..protocol.errors import StartupError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# `murano-zmq relay --help` and `python -m murano_zmq.relay --help`.
DESCRIPTION = ("Run the relay: one ROUTER socket, mailboxes in SQLite. SIGTERM/SIGINT commit, tell "
               "nodes and exit 0; a failed sync of the store stops it with exit 1 (restart it: nodes "
               "resend what was not confirmed; docs/operations.md).")


def add_relay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", type=endpoint, default=DEFAULT_RELAY_ENDPOINT, help="endpoint to bind (default %(default)s)")
    p.add_argument("--data-dir", type=given,
                   help="where relay.db lives (default ~/.local/share/murano-zmq); one relay per directory")
    p.add_argument("--store", type=given, metavar="URL",
                   help="where mailboxes live: 'sqlite' (relay.db in --data-dir, the default) or "
                        "postgresql://... (the postgresql extra; one relay per database unless --shared; "
                        "docs/scale-out.md)")
    p.add_argument("--standby", action="store_true",
                   help="with a postgresql:// store: wait until the relay running on it ends, then take "
                        "over (bind and serve)")
    p.add_argument("--shared", action="store_true",
                   help="with a postgresql:// store: serve at once with the other --shared relays on the "
                        "same database (and schema), each its own nodes; consumers on different relays "
                        "compete for a mailbox's messages (claims with a 2 s lease), a message stored on one "
                        "relay wakes the others (LISTEN/NOTIFY), one relay at a time sweeps expired messages "
                        "and idle mailboxes. Every relay on the database must use it (docs/scale-out.md)")
    p.add_argument("--name", type=peer_name, default="relay",
                   help="relay name shown to nodes and in zeroconf adverts (default %(default)s)")
    p.add_argument("--max-message-size", type=message_size, default=DEFAULT_MAX_MESSAGE_SIZE,
                   help="largest message in bytes: body plus packed headers, at most 1 GiB "
                        "(default %(default)s)")
    p.add_argument("--discovery-interfaces", default=os.environ.get(INTERFACES_ENV, ""),
                   metavar="ADDRS",
                   help="advertise the relay by zeroconf on these IPv4 addresses (comma-separated, "
                        f"or 'all'; default ${INTERFACES_ENV}, else not advertised)")
    p.add_argument("--metrics", default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (needs the metrics extra)")
    p.add_argument("--check-config", action="store_true",
                   help="validate keys, permissions file, data dir (and --bind, --metrics); print what "
                        "was checked and exit 0 (all good) or 1, without starting")
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--key", type=given, metavar="NAME|FILE",
                   help="own CURVE key pair: a .key_secret file, or NAME in --key-dir")
    g.add_argument("--key-dir", type=given, metavar="DIR", help="where --key NAMEs are looked up")
    g.add_argument("--authorized-keys", type=given, metavar="DIR",
                   help="public keys (NAME.key) allowed to connect; reloaded on change and SIGHUP")
    g.add_argument("--permissions", type=given, metavar="FILE",
                   help="TOML: what each key NAME may send, consume, declare, admin")
    g.add_argument("--allow-all", action="store_true",
                   help="with --key and no --permissions: every admitted key may do everything")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the relay the parsed options describe; one line and 1 if it cannot start."""
    from ..gcpolicy import collect_less
    from ..heap import keep_freed_memory
    from .server import RelayConfig, run_relay

    try:
        config = RelayConfig(key=args.key or "", key_dir=args.key_dir or "", allow_all=args.allow_all,
                             authorized_keys=args.authorized_keys or "", permissions=args.permissions or "",
                             bind=args.bind, data_dir=args.data_dir or "", store=args.store or "",
                             standby=args.standby, shared=args.shared, name=args.name,
                             max_message_size=args.max_message_size,
                             discovery_interfaces=args.discovery_interfaces, metrics=args.metrics)
        from .checks import inproc_problem, print_checks

        if args.check_config:
            return print_checks(config)
        if config.bind.startswith("inproc://"):
            raise StartupError(inproc_problem(config.bind))
        keep_freed_memory()
        collect_less()
        raise_descriptor_limit()
        return run_relay(config)
    except (StartupError, ValueError) as exc:
        print(f"murano-zmq relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def raise_descriptor_limit() -> None:
    """Take the hard limit on open files as the soft one: every node's
    connection holds a descriptor, and so do the store's files; at a
    login shell's soft 1,024 a few hundred nodes (or a connection flood)
    left none for the next segment file, where the hard limit is often
    hundreds of thousands.  (The shipped unit sets LimitNOFILE=65536.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20  # (fs.nr_open's default)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            logging.getLogger("murano_zmq.relay").warning(
                "cannot raise the open-file limit from %d to %d: %s", soft, want, exc)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default %(default)s)")
    add_relay_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format=LOG_FORMAT)
    return run_from_args(args)
