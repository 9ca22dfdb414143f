"""`murano-zmq demo`: an api -> conductor -> agent exchange on an embedded relay.

The relay runs as a child process in a temporary directory.  The conductor
sends each agent its execution plan before the agent exists; the plan waits
in the agent's mailbox (declared with a TTL) until the agent starts.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

from .node.sync import Node
from .relay.process import RelayProcess

TASKS = "conductor"  # work queue shared by conductors
RESULTS = "api.results"  # progress and results for the api
PLAN_RESULTS = "conductor.results"  # agents' plan results
AGENT_TTL = 60.0


def _say(t0: float, who: str, text: str) -> None:
    print(f"[{time.monotonic() - t0:6.3f}s] {who:<12} {text}", flush=True)


def run_demo(units: int = 2, env: str = "env1") -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="murano-zmq-demo-") as tmp:
        endpoint = f"ipc://{tmp}/relay.ipc"
        relay = RelayProcess(endpoint, os.path.join(tmp, "data")).start()
        _say(t0, "relay", f"pid {relay.pid} on {endpoint}, data in {tmp}/data")
        plans_sent = threading.Event()
        try:
            conductor = threading.Thread(target=_conductor, args=(endpoint, t0, plans_sent), daemon=True)
            conductor.start()
            with Node("api", relay=endpoint) as api:
                api.declare(TASKS)
                api.declare(RESULTS)
                unit_names = [f"unit{i + 1}" for i in range(units)]
                api.send(TASKS, {"env": env, "units": unit_names})
                _say(t0, "api", f"deployment task for {env} ({units} units) sent to '{TASKS}'")
                if not plans_sent.wait(30):
                    raise RuntimeError("the conductor sent no plans")
                agents = [threading.Thread(target=_agent, args=(endpoint, t0, env, u, tmp), daemon=True)
                          for u in unit_names]
                for a in agents:
                    a.start()
                results = api.consume(RESULTS)
                outcome = None
                while outcome is None:
                    msg = results.get(timeout=30)
                    if msg is None:
                        raise RuntimeError("no result from the conductor within 30s")
                    body = msg.body
                    if body["type"] == "progress":
                        _say(t0, "api", f"progress: {body['text']}")
                    else:
                        outcome = body
                    msg.ack()
                results.cancel()
                _say(t0, "api", f"deployment of {env}: {outcome['status']} ({outcome['done']}/{units} units)")
                for a in agents:
                    a.join(10)
                conductor.join(10)
                status = api.status()
            from .cli import format_status

            print(format_status(status))
            ok = outcome["status"] == "success" and outcome["done"] == units
        finally:
            code = relay.stop()
            _say(t0, "relay", f"stopped (exit {code})")
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok and code == 0 else 1


def _conductor(endpoint: str, t0: float, plans_sent: threading.Event) -> None:
    with Node("conductor-1", relay=endpoint) as node:
        tasks = node.consume(TASKS, prefetch=1)
        task = tasks.get(timeout=30)
        if task is None:
            return
        env, units = task.body["env"], task.body["units"]
        _say(t0, "conductor", f"took task for {env}")
        for unit in units:
            mailbox = f"agent.{env}.{unit}"
            node.declare(mailbox, ttl=AGENT_TTL)
            node.send(mailbox, {"env": env, "unit": unit,
                                "commands": [["write", f"{unit}.txt", f"deployed {unit}"], ["sleep", 0.05]]})
            _say(t0, "conductor", f"plan sent to '{mailbox}' (its agent has not started)")
        plans_sent.set()
        node.send(RESULTS, {"type": "progress", "text": f"{env}: {len(units)} plans sent"})
        replies = node.consume(PLAN_RESULTS)
        done = 0
        while done < len(units):
            msg = replies.get(timeout=30)
            if msg is None:
                break
            done += msg.body["ok"]
            node.send(RESULTS, {"type": "progress", "text": f"{env}: {msg.body['unit']} done ({done}/{len(units)})"})
            msg.ack()
        node.send(RESULTS, {"type": "result", "env": env, "done": done,
                            "status": "success" if done == len(units) else "failed"})
        task.ack()
        tasks.cancel()
        replies.cancel()


def _agent(endpoint: str, t0: float, env: str, unit: str, workdir: str) -> None:
    mailbox = f"agent.{env}.{unit}"
    with Node(f"agent-{env}-{unit}", relay=endpoint) as node:
        _say(t0, f"agent {unit}", f"started, consuming '{mailbox}'")
        plans = node.consume(mailbox, prefetch=1)
        plan = plans.get(timeout=30)
        if plan is None:
            return
        for command in plan.body["commands"]:
            if command[0] == "write":
                with open(os.path.join(workdir, command[1]), "w") as f:
                    f.write(command[2])
            elif command[0] == "sleep":
                time.sleep(command[1])
        node.send(PLAN_RESULTS, {"env": env, "unit": unit, "ok": True})
        plan.ack()
        plans.cancel()
        _say(t0, f"agent {unit}", "plan executed, result sent")
