"""bench/lone_stages.py times the relay's lone path by wrapping its loop's,
engine's and store's methods: a rename there must fail here, not leave the
tool timing nothing."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "lone_stages.py")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [1024, 65536])
def test_lone_stages_times_every_step_of_the_lone_path(size):
    done = subprocess.run([sys.executable, BENCH, "--rounds", "2", "--block", "20", "--size", str(size), "--json"],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["lone_sends_timed"] >= 30  # (of 40: a send may meet a due deadline and take the general path)
    stages = result["stages"]
    for key in ("relay", "read", "engine", "store", "send", "floor_begin", "floor_insert", "floor_commit"):
        assert stages[key]["p50_us"] > 0, key
    # Its record in the journal, its row written after the CONFIRM (store/journal.py)
    assert stages["record"]["p50_us"] > 0 and stages["owed"]["p50_us"] > 0
    if size >= 65536:  # ... and its body into a segment after the CONFIRM, synced by the store's thread
        assert stages["early"]["p50_us"] > 0 and stages["early_sync"]["p50_us"] > 0
    assert stages["store"]["p50_us"] < stages["relay"]["p50_us"]
    assert 0 < stages["journal"]["p50_us"] < stages["store"]["p50_us"]
    assert result["round_trip"]["relay"] > stages["relay"]["p50_us"]
    tail = result["round_trip_tail"]["relay"]
    assert result["round_trip"]["relay"] <= tail["p90_us"] <= tail["p99_us"]
