"""Relay._store_failed: a store failure starts the relay over in-process,
unless a sync of COMMITted writes failed, this one or one drained with it
(a threaded commit's), or the store says one did: then it halts.  (The
loop meeting a failed write before it collected a threaded commit whose
sync failed is a race a real loop rarely shows on cue: its decision is
checked here, the halt itself end to end in tests/faults/test_failed_sync.py.)"""

from __future__ import annotations

import os
import sqlite3
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from murano_zmq.relay.server import Relay, RelayConfig
from murano_zmq.store.faults import StoreError, SyncFailed


class StoreStub:
    sync_failed: Exception | None = None
    rolled_back = False

    def rollback(self) -> None:
        self.rolled_back = True


@pytest.fixture
def relay(tmp_path):
    relay = Relay(RelayConfig(bind="tcp://127.0.0.1:0", data_dir=str(tmp_path)))
    relay.engine = SimpleNamespace(store=StoreStub())
    yield relay
    os.close(relay._wake_r)
    os.close(relay._wake_w)


def failed(exc: Exception) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


WRITE_FAILED = StoreError(sqlite3.OperationalError("disk I/O error"))


def test_a_failed_sync_drained_beside_another_error_halts(relay):
    unsynced = StoreError(SyncFailed("syncing the store failed: [Errno 5] Input/output error"))
    relay._in_flight = [(failed(unsynced), [])]
    assert relay._store_failed(None, WRITE_FAILED) is False
    assert relay.halted_by is unsynced
    assert not relay.engine.store.rolled_back  # (no start-over)
    assert relay._in_flight == []


def test_a_store_whose_sync_failed_halts_on_any_later_error(relay):
    relay.engine.store.sync_failed = OSError(5, "Input/output error")
    assert relay._store_failed(None, WRITE_FAILED) is False
    assert relay.halted_by.unsynced and "Input/output error" in str(relay.halted_by)
    assert not relay.engine.store.rolled_back


def test_a_failed_sync_itself_halts(relay):
    unsynced = StoreError(SyncFailed("syncing the store failed: [Errno 5] Input/output error"))
    assert relay._store_failed(None, unsynced) is False
    assert relay.halted_by is unsynced
