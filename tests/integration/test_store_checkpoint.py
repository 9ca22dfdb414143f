"""The SQLite store's WAL checkpoint runs off the commit path
(store/checkpoint.py): the WAL stays bounded under steady load, and a kill -9
while checkpoints run loses no committed row."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.store.checkpoint import BEHIND
from murano_zmq.store.schema import PAGE_SIZE
from murano_zmq.store.packs import packed_rows
from murano_zmq.store.sqlite import SQLiteStore

BODY = b"x" * 1024
LONE_COMMIT_WAL = 4 * PAGE_SIZE  # WAL bytes of one commit of one row of BODY (~3.5 frames)


def row(seq: int) -> StoredMessage:
    return StoredMessage(seq, 1, seq.to_bytes(16, "big"), b"", BODY, 1.0, None, 0)


def wal_size(data_dir) -> int:
    path = os.path.join(data_dir, SQLiteStore.DB_NAME + "-wal")
    return os.path.getsize(path) if os.path.exists(path) else 0


def commit_rows(store: SQLiteStore, first: int, n: int, per_commit: int) -> None:
    for seq in range(first, first + n, per_commit):
        store.insert([row(s) for s in range(seq, seq + per_commit)])
        store.seal()
        store.commit()


def test_wal_stays_bounded_under_one_at_a_time_and_batched_commits(tmp_path):
    store = SQLiteStore(str(tmp_path), checkpoint={"commits": 50})
    try:
        store.save_mailbox(MailboxRow(1, "m", {}, False))
        store.seal()
        store.commit()
        # A lone commit adds ~3.5 pages to the WAL (under LONE_COMMIT_WAL):
        # 3,000 would grow a WAL that is never checkpointed to ~85 MB.  Restarted
        # after each checkpoint it stays near 50 commits' worth; on a loaded
        # machine where the thread falls behind, the committing thread
        # checkpoints itself after BEHIND x 50 commits.
        commit_rows(store, 1, 3000, 1)
        lone = wal_size(tmp_path)
        commit_rows(store, 3001, 30_000, 100)  # ~120 MB of rows through the WAL
        batched = wal_size(tmp_path)
        assert store.get(1) is not None and store.get(33_000) is not None
    finally:
        store.close()
    assert lone <= (BEHIND + 1) * 50 * LONE_COMMIT_WAL, f"WAL {lone} bytes after 3,000 lone commits"
    assert batched <= SQLiteStore.WAL_SIZE_LIMIT + (8 << 20), f"WAL {batched} bytes after 300 batched commits"


def test_the_writer_never_checkpoints_in_a_commit(tmp_path):
    """wal_autocheckpoint=0 on the writer: with the checkpoint thread idle,
    the WAL only grows (SQLite's default would checkpoint at 1,000 pages)."""
    store = SQLiteStore(str(tmp_path), checkpoint={"commits": 10**9, "nbytes": 1 << 40})
    try:
        store.save_mailbox(MailboxRow(1, "m", {}, False))
        commit_rows(store, 1, 600, 1)
        assert wal_size(tmp_path) > 1000 * PAGE_SIZE
    finally:
        store.close()


WRITER = """
import sys
from murano_zmq.store.checkpoint import BEHIND
from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.store.sqlite import SQLiteStore
store = SQLiteStore(sys.argv[1], checkpoint={"commits": 2})  # checkpoints run all the time
first = int(sys.argv[2])
if first == 1:
    store.save_mailbox(MailboxRow(1, "m", {}, False))
seq = first
while True:
    n = 1 if seq % 3 else 40  # lone commits and batches
    store.insert([StoredMessage(s, 1, s.to_bytes(16, "big"), b"", b"x" * 1024, 1.0, None, 0)
                  for s in range(seq, seq + n)])
    store.seal()
    store.commit()
    seq += n
    print(seq - 1, flush=True)  # every seq up to this one is committed: the "confirm"
"""


def test_kill9_while_checkpoints_run_loses_no_committed_row(tmp_path):
    data_dir = str(tmp_path)
    confirmed = 0
    for round_ in range(4):
        child = subprocess.Popen([sys.executable, "-c", WRITER, data_dir, str(confirmed + 1)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            stop_after = confirmed + random.randint(300, 1500)
            line = ""
            while confirmed < stop_after:
                line = child.stdout.readline()
                assert line, f"the writer died in round {round_}"
                confirmed = int(line)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            child.stdout.close()
        # Rows committed after the last line read may exist too: start past them.
        store = SQLiteStore(data_dir)
        try:
            assert store._query("PRAGMA integrity_check")[0][0] == "ok"
            top = store.max_seq()
            assert top >= confirmed
            kept = store._query("SELECT count(*) FROM messages WHERE seq <= ?", (confirmed,))[0][0]
            kept += sum(1 for seq, _ in packed_rows(store._reader) if seq <= confirmed)
            assert kept == confirmed, f"{confirmed - kept} committed rows lost"
        finally:
            store.close()
        confirmed = top
