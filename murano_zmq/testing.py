"""Test and benchmark helpers: a relay in a child process, free ports, RSS.

The demo, the benchmarks and the test suites start relays with these; the
child runs the relay's own entry point (`python -m murano_zmq.relay`), not
the murano-zmq command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import zmq

from .protocol.frames import Cmd, decode, encode


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp:// endpoint on a port that is free now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory in MB (field VmHWM: its peak), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def relay_answers(endpoint: str, timeout: float, curve=None) -> bool:
    """True once a relay at `endpoint` answers HELLO with WELCOME
    (`curve`: a security.curve.CurveClient for a relay with a key)."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(sock)
        try:
            sock.connect(endpoint)
            sock.send_multipart(encode(Cmd.HELLO, "probe", os.urandom(16), 1.0))
            if sock.poll(200):
                if decode(sock.recv_multipart()).cmd == Cmd.WELCOME:
                    sock.send_multipart(encode(Cmd.BYE, "probe done"))
                    return True
        finally:
            sock.close(linger=100)
    return False


class RelayProcess:
    """`python -m murano_zmq.relay` in a child process, stopped by PID."""

    def __init__(self, endpoint: str, data_dir: str, *extra: str, log_file=None, probe_curve=None,
                 preexec_fn=None):
        self.endpoint = endpoint
        self.preexec_fn = preexec_fn  # run in the child before the relay (e.g. its limits)
        self.probe_curve = probe_curve  # CURVE client options for the start-up probe
        self.data_dir = data_dir
        self.extra = list(extra)
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "RelayProcess":
        """Start the relay and wait until it answers.  A relay of this object
        that still runs is left as it is (`with RelayProcess(...).start()`
        enters a started one: a second would run on, unstopped)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "murano_zmq.relay", "--log-level", "INFO", "--bind", self.endpoint,
             "--data-dir", self.data_dir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=self.log_file or subprocess.DEVNULL, preexec_fn=self.preexec_fn,
        )
        if not relay_answers(self.endpoint, timeout, self.probe_curve):
            self.kill()
            raise RuntimeError(f"relay at {self.endpoint} did not answer within {timeout}s")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no commit, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time.  Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mount_tmpfs(path: str, size_bytes: int) -> None:
    """Mount a tmpfs of `size_bytes` on `path` (root only): a disk that
    fills up on purpose.  OSError (as from the mount command) if it cannot."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"mount tmpfs on {path}: {done.stderr.strip()}")


def unmount(path: str) -> None:
    """Unmount `path` (lazily, so a process still in it cannot block it)."""
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def fill_disk(path: str, leave_bytes: int = 0) -> int:
    """Write `path` (a file) until its file system has only `leave_bytes`
    free (0: until it is full).  Returns the bytes written."""
    chunk = b"\0" * (1 << 16)
    written = 0
    with open(path, "ab", buffering=0) as f:
        while True:
            st = os.statvfs(os.path.dirname(path) or ".")
            free = st.f_bavail * st.f_frsize - leave_bytes
            if free <= 0:
                break
            try:
                n = f.write(chunk[:min(len(chunk), free)])
            except OSError:
                break
            if not n:
                break
            written += n
    return written
