"""murano-api on murano-zmq, as a small standalone program: send deployment
tasks to the conductors, print progress events and results, optionally
delete an environment (its agents stop; their mailboxes expire by TTL).

    python -m murano_zmq.demo.api --relay auto --discovery-interfaces 127.0.0.1 \
        deploy env7 unit1,unit2 --workdir /tmp/vms
    python -m murano_zmq.demo.api --relay tcp://127.0.0.1:5570 delete env7 unit1,unit2

(`murano-zmq demo` runs the same flow with the api in its own process.)
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from murano_zmq import Node

from . import flow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="murano-api", description=__doc__.splitlines()[0])
    flow.common_arguments(parser)
    parser.add_argument("action", choices=["deploy", "delete"])
    parser.add_argument("env", help="environment id")
    parser.add_argument("units", help="comma-separated unit names")
    parser.add_argument("--workdir", default="/tmp/murano-zmq-vms", help="where agents write their files")
    parser.add_argument("--agent-ttl", type=float, default=flow.DEFAULT_AGENT_TTL)
    parser.add_argument("--step-seconds", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the result")
    args = parser.parse_args(argv)
    stop = flow.setup("api", args)
    units = [u for u in args.units.split(",") if u]
    task_id = uuid.uuid4().hex[:12]
    with Node("murano-api", relay=args.relay, heartbeat=args.heartbeat,
              discovery=args.discovery_interfaces or False) as node:
        node.declare(flow.TASKS)
        progress = node.subscribe(flow.progress_topic(args.env))
        results = node.consume(flow.API_RESULTS)
        task = (flow.deployment_task(task_id, args.env, units, args.agent_ttl, args.workdir, args.step_seconds)
                if args.action == "deploy" else flow.delete_task(task_id, args.env, units))
        node.send(flow.TASKS, task)
        print(f"{args.action} task {task_id} for {args.env} sent", flush=True)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and not stop.is_set():
            while (event := progress.get(timeout=0)) is not None:
                print(f"progress: {event.body}", flush=True)
            msg = results.get(timeout=0.2)
            if msg is None:
                continue
            msg.ack()
            if msg.body.get("task") == task_id:
                print(f"result: {msg.body}", flush=True)
                return 0 if msg.body.get("ok") else 1
    print("no result in time", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
