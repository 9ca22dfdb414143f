"""murano-agent on murano-zmq: one agent per unit (VM), untrusted and behind
NAT, so relay-only: it connects out to a static relay endpoint, consumes its
own mailbox (where its plan has waited since before it booted), runs the
plan and sends the result to the reply mailbox the plan names.

One process may host several agents (one thread and one node each), as a
stand-in for several VMs.  A plan is acked after its result is safe; an
agent that dies mid-plan gets the plan again and runs it again (its steps
are idempotent); a plan it finished before is answered from its state
directory without running again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

from murano_zmq import Node, idempotent_id

from . import flow

log = logging.getLogger("murano.agent")


class Stopped(Exception):
    """The host is stopping mid-plan: the plan is left unacked, and comes
    again to the agent's next life (as after a crash)."""


def run_commands(commands: list, stop: threading.Event) -> None:
    for command in commands:
        kind = command[0]
        if kind == "mkdir":
            os.makedirs(command[1], exist_ok=True)
        elif kind == "sleep":
            if stop.wait(float(command[1])):  # the plan's "work", cut short by a signal
                raise Stopped
        elif kind == "write":
            with open(command[1], "w") as f:
                f.write(command[2])
        else:
            raise ValueError(f"unknown command {kind!r}")


def agent(env: str, unit: str, relay: str, state_dir: str, heartbeat: float, stop: threading.Event) -> None:
    mailbox = flow.agent_mailbox(env, unit)
    state_file = os.path.join(state_dir, f"{env}.{unit}.done.json")
    with Node(f"agent-{env}-{unit}", relay=relay, direct=False, heartbeat=heartbeat) as node:
        plans = node.consume(mailbox, prefetch=1, direct=False)
        log.info("%s: consuming %s", unit, mailbox)
        while not stop.is_set():
            msg = plans.get(timeout=0.2)
            if msg is None:
                continue
            body = msg.body
            if body["type"] == "shutdown":
                msg.ack()
                log.info("%s: told to stop (environment deleted)", unit)
                return
            done = _load(state_file)
            if body["plan"] not in done:
                started = time.time()
                try:
                    run_commands(body["commands"], stop)
                    result = {"ok": True, "error": None}
                except Stopped:
                    log.info("%s: stopped mid-plan %s; it is not acked", unit, body["plan"])
                    return
                except Exception as exc:
                    result = {"ok": False, "error": str(exc)}
                result["seconds"] = round(time.time() - started, 3)
                done[body["plan"]] = result
                _save(state_file, done)
            node.send(body["reply_to"], {"task": body["task"], "env": env, "unit": unit, **done[body["plan"]],
                                         "redelivered": msg.redelivered},
                      msg_id=idempotent_id(f"plan-result/{body['plan']}"))
            msg.ack()
            log.info("%s: plan %s %s", unit, body["plan"], "ok" if done[body["plan"]]["ok"] else "FAILED")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save(path: str, done: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(done, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="murano-agent", description=__doc__.splitlines()[0])
    flow.common_arguments(parser)
    parser.add_argument("--units", default="",
                        help="ENV/UNIT[,ENV/UNIT...]: the agents this process hosts")
    parser.add_argument("--stdin", action="store_true",
                        help="also start an agent for each ENV/UNIT line read on stdin (a host of VMs that boot later)")
    parser.add_argument("--state-dir", required=True, help="where agents remember finished plans")
    args = parser.parse_args(argv)
    if not args.relay or args.relay == "auto":
        parser.error("an agent needs a static --relay endpoint (tenant VMs cannot use multicast)")
    stop = flow.setup("agent", args)
    os.makedirs(args.state_dir, exist_ok=True)
    units = [u.split("/", 1) for u in args.units.split(",") if u]
    if (not units and not args.stdin) or any(len(u) != 2 for u in units):
        parser.error("give ENV/UNIT pairs with --units, or --stdin")
    threads: list[threading.Thread] = []

    def start(env: str, unit: str) -> None:
        t = threading.Thread(target=agent, args=(env, unit, args.relay, args.state_dir, args.heartbeat, stop),
                             name=f"{env}/{unit}")
        t.start()
        threads.append(t)

    for env, unit in units:
        start(env, unit)
    print(f"ready {args.units}", flush=True)
    if args.stdin:
        def read_stdin() -> None:
            for line in sys.stdin:  # until EOF
                pair = line.strip().split("/", 1)
                if len(pair) == 2 and all(pair):
                    start(*pair)
                elif line.strip():
                    log.warning("ignoring %r: expected ENV/UNIT", line.strip())

        threading.Thread(target=read_stdin, daemon=True).start()
        while not stop.wait(1.0):  # a signal ends the host (a blocking read would not see it)
            pass
    for t in threads:
        t.join()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
