"""`murano-zmq demo`: the Murano flow end to end on one machine.

An embedded relay (a child process, temporary directory), two conductor
processes, the api in this process, and agents started only after their
plans wait in their mailboxes.  Relay and conductors find each other by
zeroconf pinned to 127.0.0.1, by the relay's name (demo-<random>: a relay
someone else advertises there is not the demo's); agents use the static
relay endpoint, as tenant VMs would.  --chaos kills the relay (SIGKILL,
then restarts it), one conductor mid-task, and one agent mid-plan (then
restarts it).

Exit status 0 only if every deployment completed exactly once.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..node.sync import Node
from ..status_view import format_status
from ..testing import RelayProcess, free_tcp_endpoint, rss_mb
from . import flow
from .view import ProgressView

DISCOVERY = "127.0.0.1"
HEARTBEAT = 0.5
# Seconds the children have in all to exit after SIGTERM, before SIGKILL.
STOP_WAIT = 15.0


@contextlib.contextmanager
def _signals_ignored():
    """Ctrl-C and SIGTERM ignored (in the main thread, where handlers live)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@dataclass
class Env:
    name: str
    units: list[str]
    task_id: str
    sent_at: float = 0.0
    agents_started: float | None = None
    done_at: float | None = None
    results: int = 0  # result messages the api received for its task
    units_done: set = field(default_factory=set)
    step: str = "queued"
    ok: bool | None = None


class Demo:
    def __init__(self, envs: int, units: int, chaos: bool, seed: int, agent_ttl: float,
                 step_seconds: float, timeout: float, live: bool):
        self.rng = random.Random(seed)
        self.chaos = chaos
        self.agent_ttl = agent_ttl
        self.step_seconds = step_seconds
        self.timeout = timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="murano-zmq-demo-")
        self.workdir = os.path.join(self.tmp.name, "vms")
        self.endpoint = free_tcp_endpoint()
        # The relay's own name, for discovery to match: other relays
        # advertised on 127.0.0.1 (another demo's, an operator's) are not ours.
        self.relay_name = f"demo-{uuid.uuid4().hex[:12]}"
        self.envs = [Env(f"env{i + 1}", [f"unit{j + 1}" for j in range(units)], uuid.uuid4().hex[:12])
                     for i in range(envs)]
        # Agents of several environments share a host process past 16 of them
        # (soak runs); each agent still starts only when its plan waits.
        self.per_host = max(1, math.ceil(envs / 16))
        self.procs: dict[str, subprocess.Popen] = {}
        self._stdins: dict = {}  # process name -> its stdin (agent hosts take ENV/UNIT lines)
        self.relay: RelayProcess | None = None
        self.peak_relay_rss = 0.0
        self.view = ProgressView(self.envs, live)
        self.t0 = time.monotonic()
        self.chaos_log: list[str] = []
        self.chaos_done: set[str] = set()
        self.duplicates = 0

    # --- processes -------------------------------------------------------------------------

    def _log(self, name: str):
        return open(os.path.join(self.tmp.name, f"{name}.log"), "ab")

    def start_relay(self) -> None:
        self.relay = RelayProcess(self.endpoint, os.path.join(self.tmp.name, "relay-data"),
                                  "--discovery-interfaces", DISCOVERY, "--name", self.relay_name,
                                  log_file=self._log("relay")).start()

    def spawn(self, name: str, module: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "MURANO_LOG_LEVEL": "INFO"}
        proc = subprocess.Popen([sys.executable, "-m", f"murano_zmq.demo.{module}", *args,
                                 "--heartbeat", str(HEARTBEAT)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self._log(name), text=True, env=env)
        self.procs[name] = proc
        self._stdins[name] = proc.stdin
        return proc

    def wait_ready(self, name: str) -> None:
        if not self.procs[name].stdout.readline().startswith("ready"):
            raise RuntimeError(f"{name} did not start (see {self.tmp.name}/{name}.log)")

    def start_conductor(self, name: str) -> None:
        self.spawn(name, "conductor", "--name", name, "--relay", f"auto:{self.relay_name}",
                   "--discovery-interfaces", DISCOVERY)

    def host_of(self, env: Env) -> str:
        return f"agents-{self.envs.index(env) // self.per_host}"

    def start_agents(self, env: Env) -> None:
        """Boot `env`'s agents (VMs) in their host process, starting it if needed."""
        host = self.host_of(env)
        if host not in self.procs:
            self.spawn(host, "agent", "--relay", self.endpoint, "--stdin",
                       "--state-dir", os.path.join(self.tmp.name, "agent-state"))
            self.wait_ready(host)
        stdin = self._stdins[host]
        stdin.write("".join(f"{env.name}/{u}\n" for u in env.units))
        stdin.flush()
        env.agents_started = time.monotonic()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        self._stdins.pop(name, None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> int:
        """SIGTERM every child, by PID, and SIGKILL those still there after
        STOP_WAIT seconds in all; returns how many did not exit 0."""
        bad = 0
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for name, proc in list(self.procs.items()):
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                code = -9
            if code != 0:
                bad += 1
                self.view.note(f"{name} exited with {code}")
        self.procs.clear()
        return bad

    # --- the run ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def chaos_event(self, text: str) -> None:
        line = f"[{self.elapsed():6.2f}s] chaos: {text}"
        self.chaos_log.append(line)
        self.view.note(line)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self._clean_up()

    def _clean_up(self) -> None:
        try:
            self.stop_all()
            if self.relay is not None:
                self.relay.stop()
            forced = False
        except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM while they stop: no more waiting
            forced = True
        with _signals_ignored():  # (what is left takes milliseconds, and must not be cut short)
            if forced:
                for proc in self.procs.values():
                    proc.kill()
                    proc.wait(10)
                self.procs.clear()
                if self.relay is not None:
                    self.relay.kill()
            self.tmp.cleanup()

    def _run(self) -> int:
        self.start_relay()
        self.view.note(f"relay {self.relay_name} pid {self.relay.pid} on {self.endpoint} "
                       f"(advertised by zeroconf on {DISCOVERY})")
        for name in ("conductor-1", "conductor-2"):
            self.start_conductor(name)
        for name in ("conductor-1", "conductor-2"):
            self.wait_ready(name)
        with Node("murano-api", relay=f"auto:{self.relay_name}", discovery=DISCOVERY, heartbeat=HEARTBEAT) as api:
            self.view.note(f"api found the relay by zeroconf: {api.relay}")
            api.declare(flow.TASKS)
            progress = api.subscribe(flow.PROGRESS)
            results = api.consume(flow.API_RESULTS, prefetch=100)
            for e in self.envs:
                api.send(flow.TASKS, flow.deployment_task(e.task_id, e.name, e.units, self.agent_ttl,
                                                          self.workdir, self.step_seconds))
                e.sent_at = time.monotonic()
            self.view.note(f"{len(self.envs)} deployment tasks sent to '{flow.TASKS}'")
            ok = self._watch(api, progress, results)
            deployed = self.elapsed()
            status_before, status_after = self._delete_first_env(api, results) if ok else (None, None)
            self.peak_relay_rss = max(self.peak_relay_rss, rss_mb(self.relay.pid, "VmHWM"))
        self.view.finish()
        bad_exits = self.stop_all()
        relay_code = self.relay.stop()
        return self._summary(ok, deployed, status_before, status_after, bad_exits, relay_code)

    def _watch(self, api: Node, progress, results) -> bool:
        deadline = time.monotonic() + self.timeout
        next_status = 0.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            while (event := progress.get(timeout=0)) is not None:
                self.view.progress(event.body)
            while (msg := results.get(timeout=0.05)) is not None:
                self._result(msg)
            if now >= next_status:
                next_status = now + 0.25
                self._start_waiting_agents(api)
            if self.chaos:
                self._chaos(api)
            self.view.render(self.elapsed())
            if all(e.done_at for e in self.envs):
                return True
        self.view.note(f"timed out after {self.timeout}s")
        return False

    def _result(self, msg) -> None:
        body = msg.body
        env = next((e for e in self.envs if e.task_id == body["task"]), None)
        msg.ack()
        if env is None:
            return
        env.results += 1
        if env.results > 1:
            self.duplicates += 1
            self.view.note(f"DUPLICATE result for {env.name}")
            return
        env.done_at = time.monotonic()
        env.ok = body["ok"]
        env.step = "deployed" if body["ok"] else "FAILED"
        env.units_done = set(env.units) if body["ok"] else env.units_done
        self.view.note(f"{env.name}: deployed by {body['conductor']}"
                       + (" (task redelivered)" if body.get("redelivered") else ""))

    def _start_waiting_agents(self, api: Node) -> None:
        try:
            status = api.status(timeout=2)
        except Exception:
            return  # the relay may be restarting
        self.peak_relay_rss = max(self.peak_relay_rss, rss_mb(self.relay.pid, "VmHWM"))
        depth = {mb["name"]: mb["depth"] for mb in status["mailboxes"]}
        for env in self.envs:
            if env.agents_started is None and all(
                    depth.get(flow.agent_mailbox(env.name, u), 0) > 0 for u in env.units):
                self.view.note(f"plans for {env.name} wait in their mailboxes: starting its agents now")
                self.start_agents(env)

    def _chaos(self, api: Node) -> None:
        done = sum(1 for e in self.envs if e.done_at)
        busy = [e for e in self.envs if e.agents_started and not e.done_at]
        if "agent" not in self.chaos_done and busy:
            env = busy[0]
            if time.monotonic() - env.agents_started > self.step_seconds * 0.7:
                self.chaos_done.add("agent")
                host = self.host_of(env)
                self.kill(host)
                again = [e for e in self.envs if self.host_of(e) == host and e.agents_started and not e.done_at]
                self.chaos_event(f"SIGKILL {host} ({', '.join(e.name for e in again)}) mid-plan; "
                                 "restarting them")
                for e in again:
                    self.start_agents(e)
        if "conductor" not in self.chaos_done and any(e.step == "plan sent" for e in self.envs):
            victim = self.rng.choice(["conductor-1", "conductor-2"])
            busy = [e.name for e in self.envs if e.step == "plan sent" and not e.done_at]
            self.chaos_done.add("conductor")
            self.kill(victim)
            self.chaos_event(f"SIGKILL {victim} mid-task (working: {', '.join(busy[:5])}); "
                             "the other conductor must finish its tasks")
        if "relay" not in self.chaos_done and done >= max(1, len(self.envs) // 3):
            self.chaos_done.add("relay")
            self.peak_relay_rss = max(self.peak_relay_rss, rss_mb(self.relay.pid, "VmHWM"))
            self.relay.kill()
            self.chaos_event(f"SIGKILL relay (pid {self.relay.pid}) with {done}/{len(self.envs)} deployed")
            self.start_relay()
            self.chaos_event(f"relay restarted (pid {self.relay.pid}) on the same endpoint and data")

    def _delete_first_env(self, api: Node, results):
        """The api deletes env1: its agents stop, their mailboxes expire by TTL."""
        env = self.envs[0]
        prefix = flow.agent_mailbox(env.name, "")
        task_id = uuid.uuid4().hex[:12]
        api.send(flow.TASKS, flow.delete_task(task_id, env.name, env.units))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = results.get(timeout=0.2)
            if msg is not None:
                msg.ack()
                if msg.body.get("task") == task_id:
                    break
        # Wait until the agents have gone (no consumers) and show the mailboxes then.
        before = None
        while time.monotonic() < deadline:
            before = [mb for mb in api.status()["mailboxes"] if mb["name"].startswith(prefix)]
            if before and all(mb["consumers"] == 0 for mb in before):
                break
            time.sleep(0.1)
        deadline = time.monotonic() + self.agent_ttl * 3 + 10
        after = before
        while time.monotonic() < deadline and after:
            time.sleep(0.2)
            after = [mb for mb in api.status()["mailboxes"] if mb["name"].startswith(prefix)]
        return before, after

    def _summary(self, ok: bool, deployed: float, before, after, bad_exits: int, relay_code: int) -> int:
        envs = self.envs
        completed = [e for e in envs if e.done_at and e.ok]
        exactly_once = all(e.results == 1 for e in envs)
        times = sorted(e.done_at - e.sent_at for e in envs if e.done_at)
        print()
        if before is not None:
            print(f"environment {envs[0].name} deleted: its agents stopped; agent mailboxes then:")
            print(format_status({"relay": "relay", "peers": 0, "mailboxes": before}))
            print(f"after their TTL ({self.agent_ttl:g}s idle): "
                  + ("all expired" if not after else f"{len(after)} still there"))
        for line in self.chaos_log:
            print(line)
        print(f"deployments: {len(completed)}/{len(envs)} completed, "
              f"{'exactly once' if exactly_once else 'NOT exactly once'} "
              f"({self.duplicates} duplicate results), {sum(1 for e in envs if e.ok is False)} failed")
        if times:
            print(f"time: {deployed:.2f}s for all; per deployment p50 {times[len(times) // 2]:.2f}s, "
                  f"max {times[-1]:.2f}s; {len(completed) / deployed:.1f} deployments/s")
        print(f"relay peak RSS: {self.peak_relay_rss:.1f} MB; children stopped cleanly: "
              f"{'yes' if bad_exits == 0 and relay_code == 0 else 'NO'}")
        success = ok and len(completed) == len(envs) and exactly_once and (before is None or not after)
        success = success and bad_exits == 0 and relay_code == 0
        print("demo " + ("succeeded" if success else "FAILED"))
        return 0 if success else 1


def run_demo(envs: int = 5, units: int = 3, chaos: bool = False, seed: int = 1, agent_ttl: float = 5.0,
             step_seconds: float = 0.3, timeout: float | None = None, live: bool | None = None) -> int:
    if live is None:
        live = sys.stdout.isatty()
    if timeout is None:
        timeout = 60 + envs * units * 0.5
    return Demo(envs, units, chaos, seed, agent_ttl, step_seconds, timeout, live).run()
