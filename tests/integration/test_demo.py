"""`murano-zmq demo` end to end, headless: every deployment exactly once,
with and without chaos, and nothing left running afterwards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from murano_zmq.testing import RelayProcess, free_tcp_endpoint
from tests.helpers import wait_for


def run_demo(*args: str, timeout: float = 240):
    proc = subprocess.Popen([sys.executable, "-m", "murano_zmq", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    return proc.returncode, out, err, proc.pid


def descendants_of_session(sid: int) -> list[str]:
    """Processes still in the demo's session (its children and theirs)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if line.split()[1] == str(sid)]


@pytest.mark.timeout(300)
def test_demo_deploys_every_environment_exactly_once(tmp_path):
    # Another relay advertised where the demo's is (another demo's, an
    # operator's): the demo's nodes must not take it for their own.
    log = tmp_path / "decoy.log"
    with open(log, "ab") as log_file, RelayProcess(free_tcp_endpoint(), str(tmp_path / "decoy"),
                                                   "--discovery-interfaces", "127.0.0.1", "--name", "decoy",
                                                   log_file=log_file).start():
        code, out, err, sid = run_demo("--envs", "3", "--units", "2")
    assert set(re.findall(r"node (\S+) connected", log.read_text())) == {"probe"}  # (RelayProcess's own)
    assert code == 0, out + err
    assert "deployments: 3/3 completed, exactly once (0 duplicate results), 0 failed" in out
    assert re.search(r"plans for env1 wait in their mailboxes: starting its agents now", out)
    assert "api found the relay by zeroconf" in out
    assert "after their TTL (5s idle): all expired" in out
    assert "children stopped cleanly: yes" in out
    assert "demo succeeded" in out
    assert "\x1b[" not in out, "no live view when stdout is not a terminal"
    assert descendants_of_session(sid) == []


@pytest.mark.timeout(300)
def test_demo_chaos_still_deploys_exactly_once():
    code, out, err, sid = run_demo("--envs", "4", "--units", "2", "--chaos", "--seed", "3")
    assert code == 0, out + err
    assert "deployments: 4/4 completed, exactly once (0 duplicate results), 0 failed" in out
    assert re.search(r"chaos: SIGKILL relay \(pid \d+\)", out)
    assert re.search(r"chaos: relay restarted", out)
    assert re.search(r"chaos: SIGKILL conductor-[12] mid-task", out)
    assert re.search(r"chaos: SIGKILL agents-\d+ .* mid-plan; restarting them", out)
    assert "demo succeeded" in out
    assert descendants_of_session(sid) == []


@pytest.mark.parametrize("args, says", [
    (["--envs", "0"], "--envs: must be between 1 and 1000"),
    (["--units", "0"], "--units: must be between 1 and 100"),
    (["--envs", "100000000"], "--envs: must be between 1 and 1000"),
    (["--envs", "1000", "--units", "6"], "1000 x 6 = 6000 agents, more than the 5000"),
])
def test_demo_rejects_bad_sizes(args, says):
    out = subprocess.run([sys.executable, "-m", "murano_zmq", "demo", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signals", [1, 2])
def test_demo_stopped_by_sigterm_mid_plan_stops_every_child(signals):
    """SIGTERM while agents sleep in a plan's long step: the demo stops its
    children (an agent's step is cut short, its plan left unacked) and
    removes its directory, in well under the children's STOP_WAIT.  A
    second SIGTERM while they stop (an impatient operator) cuts the wait
    short, and still leaves nothing behind."""
    proc = subprocess.Popen([sys.executable, "-m", "murano_zmq", "demo", "--envs", "2", "--units", "1",
                             "--step-seconds", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        agents = wait_for(lambda: [line for line in descendants_of_session(proc.pid)
                                   if "murano_zmq.demo.agent" in line], 60, what="an agent host")
        demo_dir = os.path.dirname(agents[0].split("--state-dir ")[1].split()[0])
        # A plan's mkdir done: its agent sleeps in the next step (60 s).
        wait_for(lambda: os.path.isdir(os.path.join(demo_dir, "vms")) and any(
            os.listdir(os.path.join(demo_dir, "vms", env)) for env in os.listdir(os.path.join(demo_dir, "vms"))),
            60, what="a plan under way")
        if signals == 2:  # an agent host that will not stop (SIGSTOPped) holds the demo in its stop
            stuck = int(agents[0].split()[0])
            os.kill(stuck, signal.SIGSTOP)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if signals == 2:
            # The others gone (the relay is stopped last): the demo waits for
            # the stuck one, up to STOP_WAIT (15 s); a second SIGTERM ends the wait.
            def running_children() -> list[int]:
                return [int(line.split()[0]) for line in descendants_of_session(proc.pid)
                        if not any(s in line for s in ("murano_zmq.relay", "<defunct>", "murano_zmq demo"))]

            wait_for(lambda: running_children() == [stuck], 10, what="only the stuck child")
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
        assert time.monotonic() - started < 10
        assert descendants_of_session(proc.pid) == []
        assert not os.path.exists(demo_dir)
    finally:
        if proc.poll() is None or descendants_of_session(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
