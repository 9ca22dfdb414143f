"""What Murano's engine pays per send on the drop-in (docs/murano.md).

Agent._send makes a client per plan: ``with create_rmq_client(region) as
client: client.send(...)``.  This times that (connect, send, close) against
sends on one open client, each send returning once the relay stored the
message, on a relay process on loopback.  Not for CI.

    python bench/compat_client.py            # table
    python bench/compat_client.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from murano_zmq.compat import murano as engine  # noqa: E402
from murano_zmq.testing import RelayProcess  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(i: int) -> engine.Message:
    msg = engine.Message()
    msg.body, msg.id = {"FormatVersion": "2.0.0", "ID": f"p{i}", "Body": "return 1", "Scripts": {}}, f"p{i}"
    return msg


def timed(run, count: int) -> dict:
    """Wall-clock per call (ms: p50, p90) and this process's CPU per call (ms)."""
    laps = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(count):
        start = time.perf_counter()
        run(i)
        laps.append((time.perf_counter() - start) * 1000)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) * 1000 / count
    laps.sort()
    return {"count": count, "p50_ms": round(statistics.median(laps), 2),
            "p90_ms": round(laps[int(len(laps) * 0.9)], 2), "cpu_ms": round(cpu, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100, help="sends with a client each")
    parser.add_argument("--sends", type=int, default=300, help="sends on one open client")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compat-bench-") as tmp:
        relay = RelayProcess(f"tcp://127.0.0.1:{free_port()}", os.path.join(tmp, "data")).start()
        try:
            host, port = relay.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
            settings = dict(login="murano", password="guest", host=host, port=int(port), virtual_host="/")
            queue = "e0-h0"
            with engine.MqClient(**settings) as client:
                client.declare(queue, enable_ha=True, ttl=86400000)
                client.send(plan(-1), queue)  # warm: the relay's store and this process's imports

            def client_per_send(i: int) -> None:
                with engine.MqClient(**settings) as client:
                    client.send(message=plan(i), key=queue)

            rows = {"client_per_send": timed(client_per_send, args.clients)}
            with engine.MqClient(**settings) as client:
                rows["one_open_client"] = timed(lambda i: client.send(message=plan(i), key=queue), args.sends)
        finally:
            relay.kill()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'':<18} {'count':>6} {'p50 ms':>8} {'p90 ms':>8} {'cpu ms':>8}")
        for name, row in rows.items():
            print(f"{name:<18} {row['count']:>6} {row['p50_ms']:>8} {row['p90_ms']:>8} {row['cpu_ms']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
