"""What only the PostgreSQL store does: the relay lock, reconnecting."""

from __future__ import annotations

import pytest

from ..pgserver import import_psycopg

psycopg = import_psycopg()

from murano_zmq.store.base import StoredMessage  # noqa: E402
from murano_zmq.store.open import StoreUnavailable  # noqa: E402
from murano_zmq.store.postgresql import PostgresStore  # noqa: E402


def msg(seq: int) -> StoredMessage:
    return StoredMessage(seq, 1, seq.to_bytes(16, "big"), b"", b"body", 1.0, None, 0)


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def test_commit_and_reads_ride_through_lost_connections(pg_dsn):
    store = PostgresStore(pg_dsn)
    try:
        store.insert([msg(1)])
        store.seal()
        store.commit()
        store.insert([msg(2)])
        store.delete([1])
        store.seal()
        _terminate(pg_dsn, store._db.info.backend_pid)  # as a failover does to the writer
        _terminate(pg_dsn, store._reader.info.backend_pid)
        store.commit()  # reconnects, takes the relay lock again, runs the transaction
        assert [m.seq for m in store.load_ready(1, 0, 10)] == [2]  # the reader reconnected too
        assert store.mailbox_stats() == {1: (1, 4)}
        with pytest.raises(StoreUnavailable, match="another relay"):
            PostgresStore(pg_dsn)  # the lock came back with the new writer session
    finally:
        store.close()


def test_a_commit_run_twice_stores_once(pg_dsn):
    """The failover path runs a transaction again that may have got in."""
    store = PostgresStore(pg_dsn)
    try:
        store.insert([msg(1), msg(2)])
        store.delete([2])
        store.seal()
        batch = store._pending()[0]
        store.commit()
        with store._db.transaction():
            store._write(batch)  # again, as after a lost COMMIT acknowledgement
        assert [m.seq for m in store.load_ready(1, 0, 10)] == [1]
        assert store.max_seq() == 2
    finally:
        store.close()


def test_a_bad_conninfo_is_a_clear_error(tmp_path):
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        PostgresStore(f"host={tmp_path} user=nobody dbname=none connect_timeout=2")


def test_no_server_within_the_reconnect_window_is_a_store_error(pg_dsn, monkeypatch, tmp_path):
    """Then the relay's store-failure path takes over (relay/server.py)."""
    from murano_zmq.store import pgconn
    from murano_zmq.store.faults import StoreError

    store = PostgresStore(pg_dsn)
    try:
        store.insert([msg(1)])
        store.seal()
        monkeypatch.setattr(pgconn, "RECONNECT_WINDOW", 0.5)
        good = store._conninfo
        store._conninfo = f"host={tmp_path} dbname=none connect_timeout=1"  # nothing answers there
        _terminate(pg_dsn, store._db.info.backend_pid)
        with pytest.raises(StoreError):
            store.commit()
        assert store.in_transaction  # the batch is kept
        store._conninfo = good  # the server is back
        store.commit()
        assert store.mailbox_stats() == {1: (1, 4)}
    finally:
        store.close()
