"""bench/chaos.py on a short seed: faults on a schedule, then the history is
checked (no confirmed message lost, none twice within a consumer's life),
and nothing is left behind (processes, namespaces, mounts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHAOS = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "chaos.py")


def _netns() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.timeout(240)
def test_short_chaos_run_loses_nothing():
    proc = subprocess.Popen([sys.executable, CHAOS, "--minutes", "0.4", "--seed", "11", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=220)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode in (0, 1), err
    result = json.loads(out)
    assert result["sends_confirmed"] > 100
    assert sum(result["faults"].values()) >= 3, result["faults"]
    assert result["lost"] == 0, result
    assert result["duplicates_within_a_life"] == 0, result
    assert result["ok"] and proc.returncode == 0
    tag = f"mzc{proc.pid % 100000}"  # the run's namespaces are named after its PID
    assert not [ns for ns in _netns() if ns.startswith(tag)], "namespaces left behind"
    with open("/proc/mounts") as f:
        assert result["work_dir"] not in f.read(), "its tmpfs left mounted"
    assert not os.path.exists(result["work_dir"])


def test_bad_arguments_exit_2():
    done = subprocess.run([sys.executable, CHAOS, "--minutes", "nan"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
