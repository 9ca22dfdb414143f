"""When the relay counts its disk as nearly full (store/space.py space_low):
beside the WAL's size, with the database's free pages counted as room."""

from __future__ import annotations

import os
import types

from murano_zmq.store import space
from murano_zmq.store.space import SPACE_LOW_BYTES

MiB = 1 << 20


def _with_free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(space.os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=nbytes, f_frsize=1))


def test_low_below_the_margin_beside_the_wal(monkeypatch, tmp_path):
    wal = tmp_path / "relay.db-wal"
    wal.write_bytes(b"\0" * (3 * MiB))
    asked = []

    def no_free_pages() -> int:
        asked.append(1)
        return 0

    _with_free(monkeypatch, SPACE_LOW_BYTES + 3 * MiB)
    assert not space.space_low(str(tmp_path), str(wal), no_free_pages)
    assert asked == []  # (the database is asked only when the file system is short)
    _with_free(monkeypatch, SPACE_LOW_BYTES + 3 * MiB - 1)
    assert space.space_low(str(tmp_path), str(wal), no_free_pages)
    assert not space.space_low(str(tmp_path), str(tmp_path / "no-wal"), no_free_pages)


def test_free_pages_inside_the_database_count_as_room(monkeypatch, tmp_path):
    """A consumed backlog leaves its pages free inside relay.db (the file
    does not shrink): new messages fill them before the file grows, so a
    disk with little free space but a roomy database is not full."""
    _with_free(monkeypatch, 2 * MiB)
    assert space.space_low(str(tmp_path), os.devnull + "-nothing", lambda: 0)
    assert not space.space_low(str(tmp_path), os.devnull + "-nothing", lambda: 990 * MiB)
