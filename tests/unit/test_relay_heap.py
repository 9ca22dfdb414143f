"""The relay's malloc tuning (relay/heap.py): applied on glibc, left to the
operator when they set glibc's own environment variables."""

from __future__ import annotations

import platform

import pytest

from murano_zmq.relay import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_applied_on_glibc(monkeypatch):
    for name in heap.OPERATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert heap.keep_freed_memory() is True


@pytest.mark.parametrize("name", heap.OPERATOR_SETTINGS)
def test_the_operators_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert heap.keep_freed_memory() is False
