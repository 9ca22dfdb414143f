"""The collector tuning of murano_zmq/gcpolicy.py: the relay process applies
it at start (a node never does), and it takes the collections out of a
relay-like churn of short-lived containers."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from murano_zmq import gcpolicy
from murano_zmq.relay import main, server

# A relay-like churn, in a process of its own: turns whose records and
# rows live until a later turn's commit, then go.  Prints the collections.
CHURN = """
import gc, sys
from murano_zmq import collect_less
if sys.argv[1] == "less":
    collect_less()
collections = [0]
gc.callbacks.append(lambda phase, info: phase == "stop" and collections.__setitem__(0, collections[0] + 1))
held = []
for turn in range(200):
    held.append([[bytes(16), "box", b"", b"x", 1.0, None, False] for _ in range(1000)])
    if len(held) > 3:
        held.pop(0)
print(collections[0])
"""


def churn(how: str) -> int:
    return int(subprocess.run([sys.executable, "-c", CHURN, how], capture_output=True, text=True,
                              timeout=60, check=True).stdout)


@pytest.mark.timeout(60)
def test_a_relay_like_churn_runs_no_collection():
    assert churn("default") > 100, "(else the churn proves nothing)"
    assert churn("less") == 0


@pytest.mark.timeout(60)
def test_the_relay_process_applies_it_before_it_serves(monkeypatch, tmp_path):
    seen = {}

    def run_relay(config):
        seen["threshold"], seen["frozen"] = gc.get_threshold(), gc.get_freeze_count()
        return 0

    before = gc.get_threshold()
    monkeypatch.setattr(server, "run_relay", run_relay)
    try:
        assert main.main(["--data-dir", str(tmp_path), "--bind", "tcp://127.0.0.1:0"]) == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert seen["threshold"] == (gcpolicy.GEN0_THRESHOLD, gcpolicy.GEN1_THRESHOLD, gcpolicy.GEN2_THRESHOLD)
    assert seen["frozen"] > 0
