"""bench/chaos.py's world: the relay's tmpfs, the two network namespaces
and their veth link, the processes (started and killed by PID), and the
faults with the action that undoes each."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter

from murano_zmq.testing import fill_disk, free_tcp_endpoint, mount_tmpfs, relay_answers, unmount

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DISK_BYTES = 64 << 20  # the relay's tmpfs: its journal (16 MiB), reserve (4), low-space margin (16) and room
RELAY_IP, NODE_IP = "10.251.9.1", "10.251.9.2"


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


class World:
    def __init__(self, work: str, seed: int, script: str, netns: bool, disk: bool):
        self.work = work
        self.script = script  # bench/chaos.py: runs the producer and consumer roles
        self.rng = random.Random(seed)
        self.seed = seed
        self.events: Counter = Counter()
        self.notes: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.lives: Counter = Counter()
        self.tag = f"mzc{os.getpid() % 100000}"
        self.ns_relay = self.ns_nodes = None
        self.disk = os.path.join(work, "disk")
        self.mounted = False
        self.link_down = self.disk_full = False
        os.makedirs(self.disk, exist_ok=True)
        if disk:
            try:
                mount_tmpfs(self.disk, DISK_BYTES)
                self.mounted = True
            except OSError as exc:
                self.notes.append(f"disk faults skipped: {exc}")
        if netns:
            try:
                self._make_namespaces()
            except BaseException:
                self.close()  # the caller never gets a World to close
                raise
        host = RELAY_IP if self.ns_relay else "127.0.0.1"
        self.endpoint = free_tcp_endpoint() if not self.ns_relay else f"tcp://{host}:5570"

    def _make_namespaces(self) -> None:
        a, b = f"{self.tag}r", f"{self.tag}n"
        steps = [("netns", "add", a), ("netns", "add", b),
                 ("link", "add", f"{self.tag}r", "type", "veth", "peer", "name", f"{self.tag}n"),
                 ("link", "set", f"{self.tag}r", "netns", a), ("link", "set", f"{self.tag}n", "netns", b)]
        for ns, dev, ip in ((a, f"{self.tag}r", RELAY_IP), (b, f"{self.tag}n", NODE_IP)):
            steps += [("-n", ns, "addr", "add", f"{ip}/24", "dev", dev), ("-n", ns, "link", "set", dev, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        self.ns_relay, self.ns_nodes = a, b  # set first: cleanup removes what was made
        for step in steps:
            done = sh("ip", *step)
            if done.returncode != 0:
                self.notes.append(f"link faults skipped: ip {' '.join(step)}: {done.stderr.strip()}")
                self._remove_namespaces()
                return
        if sh("tc", "qdisc", "show", "dev", "lo").returncode != 0:
            self.notes.append("link faults skipped: no tc")
            self._remove_namespaces()

    def _remove_namespaces(self) -> None:
        for ns in (self.ns_relay, self.ns_nodes):
            if ns:
                sh("ip", "netns", "del", ns)
        self.ns_relay = self.ns_nodes = None

    def _spawn(self, key: str, ns: str | None, *args: str, log: str | None = None) -> None:
        cmd = [sys.executable, *args]
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]  # ip execs python: the PID is python's
        self.lives[key] += 1
        err = open(os.path.join(self.work, log or f"{key}.log"), "ab")
        self.procs[key] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                           env={**os.environ, "PYTHONPATH": ROOT})
        err.close()

    def start_relay(self) -> None:
        self._spawn("relay", self.ns_relay, "-m", "murano_zmq.relay", "--bind", self.endpoint,
                    "--data-dir", os.path.join(self.disk, "data"))
        if not self.relay_answers(20):
            raise RuntimeError(f"the relay did not start; see {self.work}/relay.log")

    def relay_answers(self, timeout: float) -> bool:
        if not self.ns_nodes:
            return relay_answers(self.endpoint, timeout)
        probe = ("import sys; from murano_zmq.testing import relay_answers; "
                 "sys.exit(0 if relay_answers(sys.argv[1], float(sys.argv[2])) else 1)")
        done = subprocess.run(["ip", "netns", "exec", self.ns_nodes, sys.executable, "-c", probe,
                               self.endpoint, str(timeout)], env={**os.environ, "PYTHONPATH": ROOT},
                              capture_output=True, timeout=timeout + 10)
        return done.returncode == 0

    def start_producer(self, i: int) -> None:
        key = f"producer{i}"
        name = f"p{i}.{self.lives[key] + 1}"
        self._spawn(key, self.ns_nodes, self.script, "--role", "producer", "--relay", self.endpoint,
                    "--name", name, "--history", os.path.join(self.work, f"{name}.history"),
                    "--direct", str(i % 2), "--seed", str(self.seed * 1000 + self.lives[key]))

    def start_consumer(self, i: int) -> None:
        key = f"consumer{i}"
        name = f"c{i}.{self.lives[key] + 1}"
        self._spawn(key, self.ns_nodes, self.script, "--role", "consumer", "--relay", self.endpoint,
                    "--name", name, "--history", os.path.join(self.work, f"{name}.history"))

    def kill(self, key: str) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self, key: str, timeout: float = 15) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(key)

    # faults: each returns the action that undoes it (None: nothing to undo)
    def fault(self, kind: str, producers: int, consumers: int):
        self.events[kind] += 1
        if kind == "kill -9 relay":
            self.kill("relay")
            return self.start_relay
        if kind == "kill -9 consumer":
            i = self.rng.randrange(consumers)
            self.kill(f"consumer{i}")
            return lambda: self.start_consumer(i)
        if kind == "kill -9 producer":
            i = self.rng.randrange(producers)
            self.kill(f"producer{i}")
            return lambda: self.start_producer(i)
        if kind == "fill disk":
            fill_disk(os.path.join(self.disk, "ballast"))
            self.disk_full = True
            return self.free_disk
        if kind == "link loss":
            loss = self.rng.choice(["100%", "100%", "30%"])
            sh("ip", "netns", "exec", self.ns_nodes, "tc", "qdisc", "replace", "dev", f"{self.tag}n",
               "root", "netem", "loss", loss)
            self.link_down = True
            return self.restore_link
        raise ValueError(kind)

    def free_disk(self) -> None:
        if self.disk_full:
            os.unlink(os.path.join(self.disk, "ballast"))
            self.disk_full = False
            self.events["free disk"] += 1

    def restore_link(self) -> None:
        if self.link_down:
            sh("ip", "netns", "exec", self.ns_nodes, "tc", "qdisc", "del", "dev", f"{self.tag}n", "root")
            self.link_down = False
            self.events["restore link"] += 1

    def close(self) -> None:
        for key in list(self.procs):
            self.kill(key)
        self.restore_link()
        self._remove_namespaces()
        if self.mounted:
            unmount(self.disk)
