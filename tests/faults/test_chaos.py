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


def _mounts() -> str:
    with open("/proc/mounts") as f:
        return "".join(line for line in f if "murano-chaos-" in line)


@pytest.mark.timeout(240)
def test_short_chaos_run_loses_nothing():
    before = _netns() if os.geteuid() == 0 else set()
    done = subprocess.run([sys.executable, CHAOS, "--minutes", "0.4", "--seed", "11", "--json"],
                          capture_output=True, text=True, timeout=220)
    assert done.returncode in (0, 1), done.stderr
    result = json.loads(done.stdout)
    assert result["sends_confirmed"] > 100
    assert sum(result["faults"].values()) >= 3, result["faults"]
    assert result["lost"] == 0, result
    assert result["duplicates_within_a_life"] == 0, result
    assert result["ok"] and done.returncode == 0
    if os.geteuid() == 0:
        assert _netns() <= before, "namespaces left behind"
    assert _mounts() == "", "a tmpfs left mounted"


def test_bad_arguments_exit_2():
    done = subprocess.run([sys.executable, CHAOS, "--minutes", "nan"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
