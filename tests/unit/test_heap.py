"""The malloc tuning of murano_zmq/heap.py (the relay applies it at start, an
application may call it): applied on glibc, left to the operator when they
set glibc's own environment variables, and it keeps pages from being faulted
in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from murano_zmq import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_applied_on_glibc(monkeypatch):
    for name in heap.OPERATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert heap.keep_freed_memory() is True


@pytest.mark.parametrize("name", heap.OPERATOR_SETTINGS)
def test_the_operators_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert heap.keep_freed_memory() is False


CHURN = """
import resource, sys
from murano_zmq import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def burst():  # a sender's pipeline of 64 KiB bodies: held, then all freed
    held = [bytearray(65536) for _ in range(200)]
    for b in held:
        b[::4096] = b"x" * 16  # touch every page
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_heap_is_reused_not_faulted_in_again():
    """20 bursts of 200 bodies of 64 KiB (12.5 MiB each): with glibc's
    defaults every burst faults its pages in again (~3,200 faults); with
    the heap kept only the first one does."""
    env = {k: v for k, v in os.environ.items() if k not in heap.OPERATOR_SETTINGS}
    faults = {how: int(subprocess.run([sys.executable, "-c", CHURN, how], env=env, capture_output=True,
                                      text=True, timeout=60, check=True).stdout)
              for how in ("default", "kept")}
    assert faults["default"] > 20 * 3000, faults
    assert faults["kept"] < 2 * 3300, faults
