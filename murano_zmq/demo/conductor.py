"""murano-conductor on murano-zmq: takes deployment tasks from the shared
work queue (competing with other conductors), works on several at once,
sends each unit's execution plan to its agent's mailbox (declared with a
TTL, before the agent exists), publishes progress, collects the agents'
results and sends the task's result to the api.

A task is acked only when its result is safe, so a conductor that dies
mid-task leaves it to another one; the result carries an idempotent id
(the task id), so the api sees each deployment's result once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from murano_zmq import Node, idempotent_id
from murano_zmq.argtypes import peer_name

from . import flow

log = logging.getLogger("murano.conductor")


class Conductor:
    def __init__(self, node: Node, stop: threading.Event, parallel: int):
        self.node = node
        self.stop = stop
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="task")
        self.parallel = parallel

    def run(self) -> None:
        tasks = self.node.consume(flow.TASKS, prefetch=self.parallel, direct=False)
        log.info("consuming %s (%d at once)", flow.TASKS, self.parallel)
        while not self.stop.is_set():
            msg = tasks.get(timeout=0.2)
            if msg is not None:
                self.pool.submit(self._guarded, msg)
        tasks.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _guarded(self, msg) -> None:
        try:
            if msg.body["type"] == "deploy":
                self.deploy(msg)
            elif msg.body["type"] == "delete":
                self.delete(msg)
            else:
                log.warning("unknown task type %r: rejected", msg.body.get("type"))
                msg.nack(requeue=False)
        except Exception:
            if not self.stop.is_set():
                log.exception("task %s failed; it goes back to the queue", msg.body.get("task"))
                msg.nack(requeue=True)

    def deploy(self, msg) -> None:
        task = msg.body
        task_id, env, units = task["task"], task["env"], task["units"]
        log.info("task %s: deploying %s (%d units)%s", task_id, env, len(units),
                 " (redelivered)" if msg.redelivered else "")
        results_box = flow.task_results(task_id)
        self.node.declare(results_box, ttl=flow.TASK_RESULTS_TTL)
        results = self.node.consume(results_box, prefetch=len(units) or 1, direct=False)
        for unit in units:
            mailbox = flow.agent_mailbox(env, unit)
            self.node.declare(mailbox, ttl=task["agent_ttl"])
            # A conductor that takes the task over sends the plan again; the
            # agent answers a plan it already ran from its state, not by
            # running it twice.
            self.node.send(mailbox, flow.execution_plan(task_id, env, unit, task["workdir"],
                                                        task["step_seconds"]))
            self._progress(env, unit, "plan sent")
        done: dict[str, dict] = {}
        while len(done) < len(units):
            if self.stop.is_set():
                return  # unacked: another conductor finishes it
            reply = results.get(timeout=0.2)
            if reply is None:
                continue
            done[reply.body["unit"]] = reply.body
            self._progress(env, reply.body["unit"], "done", done=len(done), total=len(units))
            reply.ack()
        results.cancel()
        ok = all(r["ok"] for r in done.values())
        self.node.send(flow.API_RESULTS, {"task": task_id, "env": env, "ok": ok, "units": len(done),
                                          "conductor": self.node.name, "redelivered": msg.redelivered},
                       msg_id=idempotent_id(f"result/{task_id}"))
        msg.ack()
        log.info("task %s: %s deployed (%s)", task_id, env, "ok" if ok else "FAILED")

    def delete(self, msg) -> None:
        task = msg.body
        for unit in task["units"]:
            self.node.send(flow.agent_mailbox(task["env"], unit), flow.shutdown_plan(task["env"], unit),
                           msg_id=idempotent_id(f"shutdown/{task['task']}/{unit}"))
        self.node.send(flow.API_RESULTS, {"task": task["task"], "env": task["env"], "ok": True,
                                          "deleted": True, "conductor": self.node.name},
                       msg_id=idempotent_id(f"result/{task['task']}"))
        msg.ack()
        log.info("task %s: %s deleted (agents told to stop)", task["task"], task["env"])

    def _progress(self, env: str, unit: str, step: str, **extra) -> None:
        self.node.publish(flow.progress_topic(env), {"env": env, "unit": unit, "step": step,
                                                      "conductor": self.node.name, **extra})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="murano-conductor", description=__doc__.splitlines()[0])
    flow.common_arguments(parser)
    parser.add_argument("--name", type=peer_name, default="conductor", help="node name (unique per instance)")
    parser.add_argument("--parallel", type=int, default=4, help="tasks worked on at once")
    args = parser.parse_args(argv)
    stop = flow.setup(args.name, args)
    discovery = args.discovery_interfaces or False
    with Node(args.name, relay=args.relay, heartbeat=args.heartbeat, discovery=discovery) as node:
        print(f"ready {node.name} relay={node.relay}", flush=True)
        Conductor(node, stop, args.parallel).run()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
