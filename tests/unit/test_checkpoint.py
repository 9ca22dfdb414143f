"""The checkpointer tells the relay when a checkpoint found no room on the
disk: the WAL then grows with every commit, deletes included, past the
relay's reserve (a full disk's purges failed after about a hundred)."""

from __future__ import annotations

import sqlite3
import threading

from murano_zmq.store.checkpoint import Checkpointer


class _FullDisk:
    def execute(self, sql):
        raise sqlite3.OperationalError("database or disk is full")


class _Broken:
    def execute(self, sql):
        raise sqlite3.OperationalError("disk I/O error")


def test_a_checkpoint_that_finds_no_room_says_so_until_one_succeeds(tmp_path):
    path = str(tmp_path / "relay.db")
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x)")
    checkpoints = Checkpointer(path, threading.Lock(), writer)
    try:
        assert not checkpoints.out_of_space
        assert not checkpoints._checkpoint(_FullDisk())
        assert checkpoints.out_of_space
        assert not checkpoints._checkpoint(_Broken())
        assert not checkpoints.out_of_space  # (another failure: not the disk's room)
        checkpoints._checkpoint(_FullDisk())
        writer.execute("INSERT INTO t VALUES (1)")
        assert checkpoints._checkpoint(checkpoints._db)
        assert not checkpoints.out_of_space
    finally:
        checkpoints.close()
        writer.close()
