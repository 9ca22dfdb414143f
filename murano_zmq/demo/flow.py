"""The Murano flow on murano-zmq: mailbox names, paths and message shapes
shared by the api, conductor and agent programs.

| flow                         | mailbox / topic                 | path                       |
|------------------------------|---------------------------------|----------------------------|
| api -> conductors: tasks     | murano.tasks                    | relay (ack = task done)    |
| conductor -> api: progress   | topic murano.progress.<env>     | PUB/SUB, lossy             |
| conductor -> api: results    | murano.api.results              | direct, else relay         |
| conductor -> agent: plans    | murano.agent.<env>.<unit> (ttl) | relay (agent is NAT'd)     |
| agent -> conductor: results  | murano.task.<task>.results      | relay (agent is NAT'd)     |
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

TASKS = "murano.tasks"
API_RESULTS = "murano.api.results"
PROGRESS = "murano.progress."

# Seconds an agent mailbox lives with no agent and no traffic (x-expires).
DEFAULT_AGENT_TTL = 60.0
# Seconds a task's result mailbox lives once nobody uses it.
TASK_RESULTS_TTL = 120.0


def agent_mailbox(env: str, unit: str) -> str:
    return f"murano.agent.{env}.{unit}"


def task_results(task_id: str) -> str:
    return f"murano.task.{task_id}.results"


def progress_topic(env: str) -> str:
    return PROGRESS + env


def deployment_task(task_id: str, env: str, units: list[str], agent_ttl: float, workdir: str,
                    step_seconds: float) -> dict:
    return {"type": "deploy", "task": task_id, "env": env, "units": units, "agent_ttl": agent_ttl,
            "workdir": workdir, "step_seconds": step_seconds}


def delete_task(task_id: str, env: str, units: list[str]) -> dict:
    return {"type": "delete", "task": task_id, "env": env, "units": units}


def execution_plan(task_id: str, env: str, unit: str, workdir: str, step_seconds: float) -> dict:
    """What an agent runs: a few steps of 'work' (sleeps) and file writes."""
    target = os.path.join(workdir, env, unit)
    return {
        "type": "plan", "plan": f"{task_id}/{unit}", "task": task_id, "env": env, "unit": unit,
        "reply_to": task_results(task_id),
        "commands": [
            ["mkdir", target],
            ["sleep", step_seconds],
            ["write", os.path.join(target, "app.conf"), f"env={env}\nunit={unit}\n"],
            ["sleep", step_seconds],
            ["write", os.path.join(target, "deployed"), task_id],
        ],
    }


def shutdown_plan(env: str, unit: str) -> dict:
    return {"type": "shutdown", "env": env, "unit": unit}


# --- what every role program shares: flags, logging, clean shutdown -------------


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay", default=os.environ.get("MURANO_ZMQ_RELAY"),
                        help="relay endpoint, or 'auto' to find it by zeroconf (default $MURANO_ZMQ_RELAY)")
    parser.add_argument("--discovery-interfaces", default=os.environ.get("MURANO_ZMQ_DISCOVERY_INTERFACES"),
                        help="zeroconf interfaces (default $MURANO_ZMQ_DISCOVERY_INTERFACES; none: off)")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="seconds between heartbeats")
    parser.add_argument("--log-level", default=os.environ.get("MURANO_LOG_LEVEL", "INFO"))


def setup(name: str, args: argparse.Namespace) -> threading.Event:
    """Logging to stderr; SIGTERM/SIGINT set the returned event (clean shutdown)."""
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
