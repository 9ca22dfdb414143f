"""The lone-send journal (store/journal.py): its ring on its own, and the
SQLite store over it: a lone send's row that never reached the database
before a crash is written in at the next start, once, and nothing the
database durably settled comes back."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from murano_zmq.store import journal as journal_module
from murano_zmq.store import segments as segments_module
from murano_zmq.store.base import MailboxRow, StoredMessage
from murano_zmq.protocol.errors import StartupError
from murano_zmq.store.journal import FILE_NAME, Journal
from murano_zmq.store.sqlite import SQLiteStore, StoreError


def msg(seq: int, body: bytes = b"body", mailbox: int = 1) -> StoredMessage:
    return StoredMessage(seq, mailbox, seq.to_bytes(16, "big"), b"", body, 1.0, None, 0)


OWNER = bytes(range(16))  # a database's journal id


def record_length(j: Journal, seq: int, body: bytes = b"body") -> int:
    """The bytes of msg(seq)'s record, without its padding."""
    return sum(map(len, j.record(seq, list(msg(seq, body)))))


def put(j: Journal, seq: int, body: bytes = b"body") -> bool:
    """Append msg(seq) (wrapping the ring when it has no room); did it wrap?"""
    record = j.record(seq, list(msg(seq, body)))
    wrapped = not j.room(record)
    if wrapped:
        j.wrap()
    j.append(record)
    return wrapped


# --- the ring ---


def test_a_new_journal_is_written_zeros_and_holds_no_record(tmp_path):
    j = Journal(str(tmp_path), OWNER)
    try:
        size = journal_module.SIZE + journal_module.ALIGN  # the ring, and the block a direct write is tried in
        assert os.path.getsize(tmp_path / FILE_NAME) == size
        assert os.stat(tmp_path / FILE_NAME).st_blocks * 512 >= size  # written, not a hole
        assert j.records() == []
    finally:
        j.close()


def test_records_come_back_in_the_order_written(tmp_path):
    j = Journal(str(tmp_path), OWNER)
    try:
        for seq in (5, 6, 9):
            assert not put(j, seq)
        assert [(seq, StoredMessage(*f)) for seq, f in j.records()] == [(s, msg(s)) for s in (5, 6, 9)]
    finally:
        j.close()


@pytest.mark.parametrize("damage", ["torn payload", "torn header", "zeros"])
def test_a_scan_skips_an_unreadable_record_and_says_where(tmp_path, damage):
    """A record that cannot be read (torn by a crash while it was written:
    then nothing newer follows it; or damaged on the disk) is skipped:
    the records after it are read, and the gap is reported."""
    j = Journal(str(tmp_path), OWNER)
    try:
        put(j, 1)
        at = j._head
        put(j, 2)
        end = j._head
        length = record_length(j, 2)
        put(j, 3)
    finally:
        j.close()
    with open(tmp_path / FILE_NAME, "r+b") as f:
        if damage == "torn payload":
            f.seek(at + length - 3)
            f.write(b"\xff\xff\xff")
        elif damage == "torn header":
            f.seek(at + 4)
            f.write(b"\x01")  # its length
        else:
            f.seek(at)
            f.write(bytes(end - at))
    gaps: list = []
    assert [seq for seq, _ in journal_module.read_records(str(tmp_path / FILE_NAME), OWNER, gaps)] == [1, 3]
    assert gaps == [(at, end - at, 1)]
    j = Journal(str(tmp_path), OWNER)
    try:
        assert [seq for seq, _ in j.records()] == [1, 3]
    finally:
        j.close()


def test_the_ring_wraps_and_writes_from_its_start(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "SIZE", 16 * 1024)
    j = Journal(str(tmp_path), OWNER)
    try:
        seq = 1
        while not put(j, seq, b"x" * 1000):
            seq += 1
        records = [s for s, _ in j.records()]
        assert records[0] == seq  # the record that wrapped, at offset 0
        assert all(s < seq for s in records[1:])  # then what is left of the lap before
    finally:
        j.close()


def test_records_are_padded_to_whole_blocks_and_an_unpadded_journal_still_reads(tmp_path):
    """Each record starts at a multiple of ALIGN (what a direct write
    needs), its padding zeros; a journal written before the padding
    (records end to end) reads back whole."""
    j = Journal(str(tmp_path), OWNER)
    try:
        records = [j.record(seq, list(msg(seq, b"x" * size))) for seq, size in ((1, 10), (2, 5000), (3, 4096))]
        heads = []
        for record in records:
            j.append(record)
            heads.append(j._head)
        assert heads == [journal_module.ALIGN, 3 * journal_module.ALIGN, 5 * journal_module.ALIGN]
        first = len(b"".join(records[0]))
        with open(tmp_path / FILE_NAME, "rb") as f:
            assert f.read(journal_module.ALIGN)[first:] == bytes(journal_module.ALIGN - first)
        assert [s for s, _ in j.records()] == [1, 2, 3]
        with open(tmp_path / FILE_NAME, "r+b") as f:  # the same records as an older relay wrote them
            f.write(b"".join(b"".join(r) for r in records) + bytes(heads[-1]))
        gaps: list = []
        assert [s for s, _ in journal_module.read_records(str(tmp_path / FILE_NAME), OWNER, gaps)] == [1, 2, 3]
        assert gaps == []
    finally:
        j.close()


def test_records_under_the_mark_are_checked_but_not_unpacked(tmp_path):
    """A start reads the ring whole; only the records above the mark are
    written in, so only theirs are unpacked."""
    path = str(tmp_path / FILE_NAME)
    j = Journal(str(tmp_path), OWNER)
    try:
        for seq in (1, 2, 3):
            j.append(j.record(seq, list(msg(seq, b"x" * 3000))))
    finally:
        j.close()
    assert [(s, f is None) for s, f in journal_module.read_records(path, OWNER, mark=2)] == [
        (1, True), (2, True), (3, False)]
    os.truncate(path, 0)
    assert journal_module.read_records(path, OWNER) == []


def older_ring_crashed(tmp_path, monkeypatch, seqs) -> None:
    """A relay of sessions 26-30 (a 2 MiB ring) crashed with `seqs` journaled, their rows owed."""
    monkeypatch.setattr(journal_module, "SIZE", 2 << 20)
    store = new_store(tmp_path)
    for seq in seqs:
        lone_send(store, seq, write=False, body=b"x" * 1000)
    crash(store)
    monkeypatch.undo()


def test_an_older_relays_smaller_ring_is_written_in_then_grown(tmp_path, monkeypatch):
    """Sessions 26-30 wrote a 2 MiB ring: its records are written in at
    the first start of this release, then the ring grows to SIZE."""
    older_ring_crashed(tmp_path, monkeypatch, (10, 11))
    assert os.path.getsize(tmp_path / FILE_NAME) == (2 << 20) + journal_module.ALIGN
    store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == [10, 11]
        assert os.path.getsize(tmp_path / FILE_NAME) == journal_module.SIZE + journal_module.ALIGN
        lone_send(store, 12, write=False)
    finally:
        crash(store)
    gaps: list = []
    assert [s for s, _ in journal_module.read_records(str(tmp_path / FILE_NAME), store._journal._owner, gaps)] \
        == [12, 11]  # (the older lap's second record after this one's first: no gap, no damage)
    assert gaps == []
    assert ready_after_restart(tmp_path) == [10, 11, 12]


def test_an_older_ring_that_cannot_grow_is_left_as_it_was(tmp_path, monkeypatch, caplog):
    """A full disk at the first start of this release: the zeros written
    so far are taken off again (they would hold the disk's last bytes),
    and the relay goes on without a journal until a restart finds room."""
    older_ring_crashed(tmp_path, monkeypatch, (10,))
    size = os.path.getsize(tmp_path / FILE_NAME)
    real = journal_module._fill_zeros

    def fills_the_disk(fd, upto):
        real(fd, size + 4 * journal_module.ALIGN)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module, "_fill_zeros", fills_the_disk)
    with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
        store = SQLiteStore(str(tmp_path))
    try:
        assert store._journal is None and "no room for the lone-send journal" in caplog.text
        assert os.path.getsize(tmp_path / FILE_NAME) == size
        assert ready(store) == [10]
        store.commit_insert([msg(11)])  # (through the database)
        assert not store._owed
    finally:
        store.close()
    monkeypatch.undo()
    assert ready_after_restart(tmp_path) == [10, 11]
    assert os.path.getsize(tmp_path / FILE_NAME) == journal_module.SIZE + journal_module.ALIGN


def test_a_padded_lap_over_an_older_unpadded_one_is_read_past_a_torn_record(tmp_path):
    """The upgrade after a crash: an older relay's lap (records end to
    end), this release's first records over its start, padded, the last
    of them torn.  The new ones are read, then, past one gap, every older
    record the new writes left whole (the lap before: under the mark)."""
    path = str(tmp_path / FILE_NAME)
    j = Journal(str(tmp_path), OWNER)
    try:
        older = [j.record(seq, list(msg(seq, b"y" * 700))) for seq in range(1, 40)]
        starts, at = [], 0
        for record in older:
            starts.append(at)
            at += len(record[0]) + len(record[1])
        with open(path, "r+b") as f:
            f.write(b"".join(b"".join(r) for r in older))
        put(j, 50)
        put(j, 51)
        torn = j._head
        put(j, 52)
    finally:
        j.close()
    with open(path, "r+b") as f:  # (its payload: the rest of its block is padding)
        f.seek(torn + 20)
        f.write(bytes(20))
    whole = [(seq, start) for seq, start in zip(range(1, 40), starts) if start >= torn + journal_module.ALIGN]
    assert len(whole) > 10
    gaps: list = []
    assert [seq for seq, _ in journal_module.read_records(path, OWNER, gaps)] == [50, 51] + [s for s, _ in whole]
    assert gaps == [(torn, whole[0][1] - torn, 2)]


@pytest.mark.parametrize("refused", ["at open", "the trial write", "the first record"])
def test_where_direct_writes_are_refused_records_are_written_and_fdatasynced(tmp_path, monkeypatch, caplog,
                                                                              refused):
    """A file system that will not open the journal with O_DIRECT, fails
    the direct write tried at open (EOPNOTSUPP: FUSE, some network file
    systems), or refuses a record's (EINVAL, before any I/O): each record
    is then written through the page cache and fdatasynced, and reads
    back; the relay is not stopped by a failed sync."""
    real_open, real_pwrite, real_fdatasync = os.open, os.pwrite, os.fdatasync
    direct_fds: set = set()
    synced: list = []

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            if refused == "at open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *args)

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            if refused == "the trial write":
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            if offset < journal_module.SIZE:  # (the trial, past the ring, goes through)
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    closed: list = []
    real_close = os.close
    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd))[1])
    with caplog.at_level(logging.INFO, logger="murano_zmq.store"):
        j = Journal(str(tmp_path), OWNER)
    try:
        assert j.direct == (refused == "the first record")
        with caplog.at_level(logging.INFO, logger="murano_zmq.store"):
            put(j, 1)
            put(j, 2)
        assert not j.direct and direct_fds <= set(closed)  # (the refused descriptor not left open)
        assert caplog.text.count("lone-send journal written through the page cache") == 1
        assert synced == [j._fd, j._fd]
        assert [s for s, _ in j.records()] == [1, 2]
    finally:
        j.close()


def test_a_direct_write_needs_no_fdatasync(tmp_path, monkeypatch):
    """Where the file system takes O_DIRECT | O_DSYNC (ext4 here), a
    record is written on a descriptor with both flags, in whole blocks:
    the write itself is the sync, no fdatasync follows it."""
    j = Journal(str(tmp_path), OWNER)
    try:
        if not j.direct:
            pytest.skip("this file system does not take O_DIRECT")
        flags = fcntl.fcntl(j._direct_fd, fcntl.F_GETFL)
        assert flags & os.O_DIRECT and flags & os.O_DSYNC == os.O_DSYNC
        writes: list = []
        synced: list = []
        real_pwrite = os.pwrite
        monkeypatch.setattr(os, "pwrite", lambda fd, data, at: (writes.append((fd, len(data), at)),
                                                                real_pwrite(fd, data, at))[1])
        monkeypatch.setattr(os, "fdatasync", synced.append)
        put(j, 1, b"x" * 70_000)
        put(j, 2)
        assert writes == [(j._direct_fd, 18 * journal_module.ALIGN, 0),
                          (j._direct_fd, journal_module.ALIGN, 18 * journal_module.ALIGN)]
        assert synced == []
        assert [StoredMessage(*f) for _, f in j.records()] == [msg(1, b"x" * 70_000), msg(2)]
    finally:
        j.close()


@pytest.mark.parametrize("failure", ["EIO", "short"])
def test_a_direct_write_that_fails_otherwise_is_a_failed_sync_not_a_fallback(tmp_path, monkeypatch, failure):
    """Only EINVAL, refused before any I/O, sends records through the page
    cache: an I/O error or a short write may have left the record in part
    on the disk, and raises (the store's failed sync)."""
    j = Journal(str(tmp_path), OWNER)
    try:
        if not j.direct:
            pytest.skip("this file system does not take O_DIRECT")
        real_pwrite = os.pwrite

        def failing(fd, data, at):
            if fd != j._direct_fd:
                return real_pwrite(fd, data, at)
            if failure == "EIO":
                raise OSError(errno.EIO, "Input/output error")
            return journal_module.ALIGN // 2  # (nothing written: as the device's part of a short write)

        monkeypatch.setattr(os, "pwrite", failing)
        with pytest.raises(OSError) as raised:
            put(j, 1)
        assert raised.value.errno == errno.EIO
        assert j.direct and j._head == 0
    finally:
        j.close()


def test_a_record_too_large_for_the_ring_is_not_journaled(tmp_path):
    assert Journal.fits(8 * 1024)
    assert not Journal.fits(journal_module.SIZE)
    # A large body is written to a segment before its CONFIRM, however large the ring.
    assert Journal.fits(journal_module.MAX_RECORD - 4096)
    assert not Journal.fits(journal_module.MAX_RECORD)


def test_a_small_ring_takes_records_of_a_quarter_of_it_at_most(monkeypatch):
    monkeypatch.setattr(journal_module, "SIZE", 64 * 1024)
    assert Journal.fits(16 * 1024 - 4096)
    assert not Journal.fits(16 * 1024)


def test_the_ring_holds_many_lone_64k_sends_between_wraps(tmp_path):
    """A wrap syncs the WAL before a CONFIRM: one lone 64 KiB send in 30
    paid for it with a 2 MiB ring, the one-at-a-time p99 itself."""
    j = Journal(str(tmp_path), OWNER)
    try:
        record = j.record(1, [b"b" * 65536])
        records = 0
        while j.room(record):
            j._head += journal_module._aligned(len(record[0]) + len(record[1]))
            records += 1
        assert records >= 200
    finally:
        j.close()


# --- the SQLite store over it ---


def lone_send(store: SQLiteStore, seq: int, write: bool = True, body: bytes = b"body") -> None:
    store.commit_insert([msg(seq, body)])
    assert store._owed and store._owed[-1].seq == seq, "not journaled"
    if write:
        store.write_owed()


def crash(store: SQLiteStore) -> None:
    """The process dies: connections gone without a commit, the owed row not
    written (what a kill -9 between the CONFIRM and write_owed leaves)."""
    store._reader.close()
    store._db.close()
    store._journal.close()
    os.close(store._wal_fd)
    store._segments.close()
    if store._early_pool is not None:  # (a sync of bodies written early may run: its own descriptors)
        store._early_pool.shutdown()


def new_store(tmp_path) -> SQLiteStore:
    store = SQLiteStore(str(tmp_path))
    store.save_mailbox(MailboxRow(1, "jobs", {}, False))
    store.seal()
    store.commit()
    return store


def ready(store: SQLiteStore) -> list[int]:
    return [m.seq for m in store.load_ready(1, 0, 100)]


def ready_after_restart(tmp_path) -> list[int]:
    store = SQLiteStore(str(tmp_path))
    try:
        return ready(store)
    finally:
        store.close()


def count_wal_syncs(store: SQLiteStore, monkeypatch) -> list[int]:
    """The WAL's syncs from now on, each as the number of rows owed then."""
    syncs: list[int] = []
    real = store._sync_wal
    monkeypatch.setattr(store, "_sync_wal", lambda: (syncs.append(len(store._owed)), real())[1])
    return syncs


def test_a_lone_send_is_in_the_journal_before_its_row_is_in_the_database(tmp_path):
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False)
        reader = sqlite3.connect(store.path)
        try:
            assert reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
            store.write_owed()
            assert reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
            assert reader.execute("SELECT value FROM meta WHERE key='journal'").fetchone() == (10,)
        finally:
            reader.close()
        assert ready(store) == [10]
    finally:
        store.close()


def test_a_crash_before_the_row_was_written_is_replayed_at_start(tmp_path, caplog):
    store = new_store(tmp_path)
    lone_send(store, 10)
    lone_send(store, 11, write=False)  # confirmed, then the relay died
    crash(store)
    with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
        store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == [10, 11]
        assert store.get(11) == msg(11)
        assert store.max_seq() >= 11
        assert "1 message(s) from the lone-send journal were written into the database" in caplog.text
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [10, 11]  # and once only


@pytest.mark.parametrize("middle_written", [False, True], ids=["above the mark", "under the mark"])
def test_records_after_a_damaged_one_are_written_in_and_a_loss_is_said(tmp_path, caplog, middle_written):
    """A record in the middle of the journal damaged on the disk: the
    confirmed sends after it are not lost with it.  The damage is logged
    as an error where the record was a send not yet in the database (a
    crash alone never leaves newer records past a torn one); not where
    its row is there already (the mark covers it: a crash may leave the
    mark a lap behind the ring's head)."""
    store = new_store(tmp_path)
    lone_send(store, 10, write=False)
    at = store._journal._head
    lone_send(store, 11, write=middle_written)  # (written: 10 and 11 in the database, the mark 11)
    end = store._journal._head
    lone_send(store, 12, write=False)
    crash(store)
    with open(tmp_path / FILE_NAME, "r+b") as f:
        f.seek(at + 30)
        f.write(b"\xff" * (end - at - 40))
    with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
        store = SQLiteStore(str(tmp_path))
    try:
        if middle_written:
            assert ready(store) == [10, 11, 12]
            assert "damaged" not in caplog.text
        else:
            assert ready(store) == [10, 12]
            assert f"is damaged ({end - at} bytes at offset {at} unreadable)" in caplog.text
            assert "seq up to 12" in caplog.text
    finally:
        store.close()


def test_a_record_with_large_headers_is_read_back(tmp_path):
    """The record holds the whole row: a body at the journal's limit with
    headers besides it makes a payload over MAX_RECORD (a record the store
    would not write: its bound counts the headers; one of an older
    release's), still a record to read in order."""
    body = b"b" * (journal_module.MAX_RECORD - 4096)
    assert Journal.fits(len(body))
    row = StoredMessage(7, 1, (7).to_bytes(16, "big"), b"h" * 20_000, body, 1.0, None, 0)
    j = Journal(str(tmp_path), OWNER)
    try:
        j.append(j.record(7, list(row)))
        assert [(seq, StoredMessage(*f)) for seq, f in j.records()] == [(7, row)]
    finally:
        j.close()


def test_a_torn_last_record_before_the_lap_before_is_no_damage(tmp_path, caplog, monkeypatch):
    """A crash tears the record it was writing; after it lie the lap
    before's records, whose rows are in the database: nothing is said,
    nothing comes back twice."""
    monkeypatch.setattr(journal_module, "SIZE", 64 * 1024)
    store = new_store(tmp_path)
    seq = 10
    while True:  # until the ring has wrapped and holds a few records of its new lap
        lone_send(store, seq, write=False, body=b"x" * 1000)
        seq += 1
        if store._journal._head < 3 * journal_module.ALIGN and seq > 70:
            break
    at, owner = store._journal._head, store._journal._owner
    lone_send(store, seq, write=False, body=b"x" * 1000)  # its record torn by the crash
    crash(store)
    with open(tmp_path / FILE_NAME, "r+b") as f:
        f.seek(at + 100)
        f.write(b"\0" * 200)
    gaps: list = []
    records = journal_module.read_records(str(tmp_path / FILE_NAME), owner, gaps)
    assert gaps and records[gaps[0][2]:], "the lap before's records lie after the torn one"
    with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
        store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == list(range(10, seq))  # (the torn one: never confirmed, in this model)
        assert "damaged" not in caplog.text
    finally:
        store.close()


def test_a_replayed_row_already_in_the_database_is_not_doubled(tmp_path):
    """The row's transaction reached the database but not its mark (not
    expected: they are one transaction; the INSERT skips it either way)."""
    store = new_store(tmp_path)
    lone_send(store, 10)
    crash(store)
    db = sqlite3.connect(os.path.join(str(tmp_path), SQLiteStore.DB_NAME))
    db.execute("DELETE FROM meta WHERE key='journal'")
    db.commit()
    db.close()
    assert ready_after_restart(tmp_path) == [10]


def test_a_settled_message_does_not_come_back(tmp_path):
    """Acked after its row was written, the ack then synced by a later
    commit: the mark is durable with the row, so the record is not replayed."""
    store = new_store(tmp_path)
    lone_send(store, 10)
    lone_send(store, 11)
    store.delete([10])
    store.save_mailbox(MailboxRow(2, "other", {}, False))  # (a commit that is synced)
    store.seal()
    store.commit()
    crash(store)
    assert ready_after_restart(tmp_path) == [11]


def test_a_wrap_syncs_the_wal_first_and_a_crash_after_it_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "SIZE", 32 * 1024)
    store = new_store(tmp_path)
    syncs = count_wal_syncs(store, monkeypatch)
    for seq in range(10, 100):
        lone_send(store, seq, body=b"x" * 1000)
    lone_send(store, 100, write=False, body=b"x" * 1000)
    assert len(syncs) >= 2, "the ring did not wrap"
    crash(store)
    assert ready_after_restart(tmp_path) == list(range(10, 101))


def test_a_body_too_large_for_the_ring_or_several_rows_take_the_commit_path(tmp_path):
    store = new_store(tmp_path)
    try:
        store.commit_insert([msg(10, b"x" * journal_module.MAX_RECORD)])
        store.commit_insert([msg(11), msg(12)])
        assert not store._owed and store._journal.records() == []
        assert ready(store) == [10, 11, 12]
    finally:
        store.close()


LARGE = bytes(range(256)) * 256  # 64 KiB: a segment's body


def relay_lone_sends(store: SQLiteStore, seqs, body: bytes = LARGE) -> None:
    """Lone sends as the relay makes them: each journaled, then, after its
    CONFIRM, write_owed(OWED_ROWS) (the body into a segment; the rows owed
    written, or their segment's sync begun, when enough are owed)."""
    for seq in seqs:
        lone_send(store, seq, write=False, body=body)
        store.write_owed(journal_module.OWED_ROWS)


def segment_bytes(store: SQLiteStore, seq: int) -> bytes | None:
    """The bytes at the segment place the row of `seq` names (None: no row, or a body in the database)."""
    db = sqlite3.connect(store.path)
    try:
        row = db.execute("SELECT seg, seg_off, seg_len FROM messages WHERE seq=?", (seq,)).fetchone()
    finally:
        db.close()
    if row is None or row[0] is None:
        return None
    with open(store._segments.path(row[0]), "rb") as f:
        f.seek(row[1])
        return f.read(row[2])


def test_a_large_body_is_journaled_and_written_to_a_segment_after_its_confirm(tmp_path, monkeypatch):
    """The record holds the body; the body goes to a segment when the relay
    asks after the CONFIRM (write_owed(OWED_ROWS) with fewer rows owed), its
    row with the next transaction of rows owed, the segment synced before it."""
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False, body=LARGE)
        assert store._journal.records()[-1] == (10, list(msg(10, LARGE)))
        assert not store._segments.on_disk() or max(store._segments.on_disk().values()) == 0
        store.write_owed(journal_module.OWED_ROWS)
        assert store._owed and segment_bytes(store, 10) is None  # the row: not yet
        assert sum(store._segments.on_disk().values()) >= len(LARGE)  # the body: written
        synced = []  # at each segment sync: is the row in the database yet?
        real = store._segments.sync
        monkeypatch.setattr(store._segments, "sync",
                            lambda **kw: (synced.append(segment_bytes(store, 10) is not None), real(**kw)))
        store.write_owed()
        assert synced == [False] and not store._owed
        assert segment_bytes(store, 10) == LARGE
        assert store.get(10) == msg(10, LARGE)
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [10]


def test_the_segment_sync_of_bodies_written_early_runs_beside_the_loop(tmp_path, monkeypatch):
    """Once OWED_LARGE_ROWS lone sends with large bodies are owed, their
    segment is synced by the store's thread, never in write_owed(); the
    CONFIRM's turn after it writes the rows whose bodies that sync covered,
    with no sync of their own, and the later body stays owed (its row in
    the journal alone) until a sync covers it too."""
    rows = journal_module.OWED_LARGE_ROWS
    store = new_store(tmp_path)
    try:
        lone_send(store, 9, body=LARGE)  # (a new segment: its directory entry is synced with it, in the loop)
        monkeypatch.setattr(store._segments, "sync", lambda **kw: pytest.fail("a segment synced in the loop"))
        seqs = list(range(10, 10 + rows))
        relay_lone_sends(store, seqs)
        assert store._early_sync is not None and [m.seq for m in store._owed] == seqs
        store._early_sync[1].result(10)
        lone_send(store, seqs[-1] + 1, write=False, body=LARGE)
        store.write_owed(journal_module.OWED_ROWS)  # (the next body written early, then the rows)
        assert store._early_sync is None and [m.seq for m in store._owed] == [seqs[-1] + 1]
        assert [segment_bytes(store, seq) for seq in seqs] == [LARGE] * rows
        assert segment_bytes(store, seqs[-1] + 1) is None
        last = store._owed_places[seqs[-1] + 1]
        assert not store._segments.durable(last) and store._segments.unwritten
        monkeypatch.undo()
        syncs = []
        real_sync = store._segments.sync
        monkeypatch.setattr(store._segments, "sync", lambda **kw: (syncs.append(kw), real_sync(**kw)))
        store.write_owed()  # (a turn that is not a lone send's: every row, the last body synced first)
        assert not store._owed and segment_bytes(store, seqs[-1] + 1) == LARGE
        assert len(syncs) == 1 and store._segments.durable(last)
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [9, *seqs, seqs[-1] + 1]


def test_a_store_that_cannot_start_the_thread_syncs_in_the_loop(tmp_path, monkeypatch, caplog):
    """No thread to be had (submit() raises): the sync runs in the loop,
    as before, the job's descriptors closed; said once."""
    store = new_store(tmp_path)
    try:
        lone_send(store, 9, body=LARGE)
        closed = []
        real_close = segments_module.EarlySync.close
        monkeypatch.setattr(segments_module.EarlySync, "close", lambda job: (closed.append(job), real_close(job)))

        def no_thread(*args):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(ThreadPoolExecutor, "submit", no_thread)
        seqs = list(range(10, 10 + 2 * journal_module.OWED_LARGE_ROWS))
        with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
            relay_lone_sends(store, seqs)
        assert not store._owed and store._early_sync is None and len(closed) == 2
        assert caplog.text.count("synced in the relay's loop") == 1
        assert [segment_bytes(store, seq) for seq in seqs] == [LARGE] * len(seqs)
    finally:
        store.close()


def test_a_turn_that_needs_the_rows_waits_for_the_threads_sync(tmp_path, monkeypatch):
    """A turn that is not a lone send's, or the store's close, finds the
    thread's sync still running: it waits for it, then writes every row."""
    store = new_store(tmp_path)
    gate = threading.Event()
    real_run = segments_module.EarlySync.run

    def held_run(job):
        assert gate.wait(10)
        real_run(job)

    monkeypatch.setattr(segments_module.EarlySync, "run", held_run)
    try:
        lone_send(store, 9, body=LARGE)  # (a new segment, synced in the loop)
        seqs = list(range(10, 10 + journal_module.OWED_LARGE_ROWS))
        relay_lone_sends(store, seqs)
        store.write_owed(journal_module.OWED_ROWS)  # (running: nothing written, nothing waited for)
        assert not store._early_sync[1].done() and len(store._owed) == len(seqs)
        threading.Timer(0.2, gate.set).start()
        store.write_owed()
        assert gate.is_set() and not store._owed
        assert [segment_bytes(store, seq) for seq in seqs] == [LARGE] * len(seqs)
        gate.clear()  # and the store's close, with a sync running
        more = list(range(seqs[-1] + 1, seqs[-1] + 1 + journal_module.OWED_LARGE_ROWS))
        relay_lone_sends(store, more)
        assert not store._early_sync[1].done()
        threading.Timer(0.2, gate.set).start()
        store.close()
        assert gate.is_set()
    finally:
        gate.set()
        store.close()
    assert ready_after_restart(tmp_path) == [9, *seqs, *more]


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC], ids=["I/O error", "full disk"])
def test_a_failed_sync_in_the_stores_thread_is_the_owed_writes_failure(tmp_path, monkeypatch, error):
    """The thread's sync of bodies written early fails: the turn that
    takes its outcome fails as the owed write's sync would in the loop.
    An I/O error is a failed sync (the relay stops; its restart writes
    the journal's records in); a full disk leaves the rows owed, and the
    start-over writes them with their bodies in the database (the bytes a
    failed sync leaves are not to be trusted)."""
    store = new_store(tmp_path)
    seqs = list(range(10, 10 + journal_module.OWED_LARGE_ROWS))
    try:
        lone_send(store, 9, body=LARGE)  # (a new segment, synced in the loop)
        def failing_run(job):
            for fd in job._fds.values():
                os.close(fd)
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(segments_module.EarlySync, "run", failing_run)
        relay_lone_sends(store, seqs)
        assert store._early_sync is not None
        with pytest.raises(OSError):
            store._early_sync[1].result(10)
        monkeypatch.undo()
        with pytest.raises(StoreError) as failed:
            store.write_owed(journal_module.OWED_ROWS)
        assert failed.value.full == (error == errno.ENOSPC)
        assert [m.seq for m in store._owed] == seqs
        if error == errno.EIO:
            assert store.sync_failed is not None
            crash(store)
        else:
            assert store.sync_failed is None
            store.rollback()
            assert not store._owed and [segment_bytes(store, seq) for seq in seqs] == [None] * len(seqs)
            assert [store.get(seq) for seq in seqs] == [msg(seq, LARGE) for seq in seqs]
            store.close()
    except BaseException:
        crash(store)
        raise
    store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == [9, *seqs] and [store.get(seq).body for seq in seqs] == [LARGE] * len(seqs)
    finally:
        store.close()


def test_a_lone_send_whose_headers_the_ring_cannot_hold_is_committed_by_sqlite(tmp_path):
    """The journal's bound counts the headers too: a small body with
    headers larger than the ring (up to the relay's frame limit) made a
    record that wrapped the ring and was written past its end, where no
    start reads it: a confirmed send lost after a crash."""
    headers = b"h" * (journal_module.SIZE + 100)
    row = StoredMessage(10, 1, (10).to_bytes(16, "big"), headers, b"body", 1.0, None, 0)
    store = new_store(tmp_path)
    store.commit_insert([row])
    assert not store._owed, "journaled"
    assert os.path.getsize(tmp_path / FILE_NAME) == journal_module.SIZE + journal_module.ALIGN
    crash(store)
    store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == [10] and store.get(10) == row
    finally:
        store.close()


def test_a_crash_after_a_large_body_went_to_a_segment_replays_it_from_the_journal(tmp_path):
    store = new_store(tmp_path)
    lone_send(store, 10, body=LARGE)
    lone_send(store, 11, write=False, body=LARGE)
    store.write_owed(journal_module.OWED_ROWS)  # the body written, not synced, no row: then the crash
    crash(store)
    store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == [10, 11]
        assert store.get(10) == msg(10, LARGE) and store.get(11) == msg(11, LARGE)
    finally:
        store.close()


def test_a_large_body_no_segment_takes_goes_into_the_database_with_its_row(tmp_path, monkeypatch, caplog):
    """Confirmed already, a journaled body does not wait on the segments
    (a full disk, a directory the relay may not write): said once."""
    store = new_store(tmp_path)
    try:
        def no_segment(body):
            raise OSError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(store._segments, "write_early", no_segment)
        monkeypatch.setattr(store._segments, "append", lambda body: pytest.fail("placed in a segment"))
        with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
            relay_lone_sends(store, (10, 11))
            store.write_owed()
        assert caplog.text.count("bodies go into the database") == 1
        assert store.get(10) == msg(10, LARGE) and segment_bytes(store, 11) is None
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [10, 11]


def test_large_and_small_lone_sends_mixed_keep_their_bodies_and_segments(tmp_path):
    """Many sends, some large (16 owed rows a transaction, segments rolling
    every few bodies), acks between: every body reads back, before and after
    a restart, and a segment whose rows are all acked goes."""
    store = SQLiteStore(str(tmp_path))
    store._segments.roll_bytes = 5 * len(LARGE)
    store.save_mailbox(MailboxRow(1, "jobs", {}, False))
    store.seal()
    store.commit()
    bodies = {}
    for seq in range(10, 80):
        bodies[seq] = LARGE if seq % 3 else b"small %d" % seq
        lone_send(store, seq, write=False, body=bodies[seq])
        store.write_owed(journal_module.OWED_ROWS)
        if seq % 10 == 0:
            store.write_owed()
            acked = [s for s in sorted(bodies) if s < seq - 20]
            store.delete(acked)
            store.seal()
            store.commit()
            for s in acked:
                del bodies[s]
    store.write_owed()
    try:
        assert {m.seq: m.body for m in store.load_ready(1, 0, 1000)} == bodies
        assert all(store.get(s).body == b for s, b in bodies.items())
        assert len(store._segments.on_disk()) <= 6  # (the acked ones' segments deleted)
    finally:
        store.close()
    store = SQLiteStore(str(tmp_path))
    try:
        assert {m.seq: store.get(m.seq).body for m in store.load_ready(1, 0, 1000)} == bodies
    finally:
        store.close()


def test_rows_owed_across_a_wrap_are_written_before_it(tmp_path, monkeypatch):
    """Rows are written a transaction per OWED_ROWS sends: a wrap with rows
    still owed writes them, then syncs the WAL, then writes over the ring."""
    monkeypatch.setattr(journal_module, "SIZE", 32 * 1024)
    store = new_store(tmp_path)
    syncs = count_wal_syncs(store, monkeypatch)
    for seq in range(10, 60):
        lone_send(store, seq, write=False, body=b"x" * 1000)
    assert syncs and all(n == 0 for n in syncs), "the WAL was synced with rows not written"
    assert 0 < len(store._owed) < 50
    crash(store)
    assert ready_after_restart(tmp_path) == list(range(10, 60))


def test_rows_owed_take_the_held_deletes_with_them(tmp_path):
    store = new_store(tmp_path)
    try:
        lone_send(store, 10)
        lone_send(store, 11)
        store.delete([10])  # an ack, held for a later commit
        lone_send(store, 12, write=False)
        lone_send(store, 13, write=False)  # (the same deletes held: journaled too)
        assert [m.seq for m in store._owed] == [12, 13]
        store.write_owed()
        assert len(store._batches) == 1 and not store._batches[0]
        assert ready(store) == [11, 12, 13]
    finally:
        store.close()


def test_an_id_among_the_rows_owed_is_found(tmp_path):
    """An idempotent id sent again, one send at a time: the relay asks
    mailboxes_of() before it journals a row."""
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False)
        assert store.mailboxes_of([msg(10).msg_id], every=True) == {msg(10).msg_id: 1}
        assert not store._owed  # (written to be looked up)
    finally:
        store.close()


# --- a journal belongs to its database ---


def test_a_journal_beside_a_new_database_holds_nothing_of_it(tmp_path):
    """relay.db moved aside (a corrupt one, docs/operations.md), the old
    journal left: its records are not written into the new database, and
    the new one's own records are (before: the old records' mark skipped
    them, or old rows came into a mailbox of the same id)."""
    store = new_store(tmp_path)
    for seq in range(1000, 1020):  # (seqs of one size: the new records end where old ones begin)
        lone_send(store, seq, write=False)
    crash(store)
    for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
        if os.path.exists(tmp_path / name):
            os.rename(tmp_path / name, tmp_path / (name + ".aside"))
    store = new_store(tmp_path)
    assert ready(store) == []
    for seq in range(2000, 2005):
        lone_send(store, seq, write=False)
    crash(store)
    assert ready_after_restart(tmp_path) == list(range(2000, 2005))


def test_another_data_directorys_journal_is_not_read(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for d in (mine, theirs):
        store = new_store(d)
        lone_send(store, 10 if d == mine else 11, write=False)
        crash(store)
    shutil.copy(theirs / FILE_NAME, mine / FILE_NAME)
    assert ready_after_restart(mine) == []  # (its own record was overwritten by the copy: as a lost file)


def test_a_short_journal_with_records_is_kept_and_read_when_the_disk_is_full(tmp_path, monkeypatch, caplog):
    """A journal cut short (copied onto a full disk): its records are
    written in, and the file is not deleted because it cannot be filled
    out; the relay goes on without one."""
    store = new_store(tmp_path)
    for seq in range(10, 15):
        lone_send(store, seq, write=False)
    crash(store)
    with open(tmp_path / FILE_NAME, "r+b") as f:
        f.truncate(64 * 1024)

    def no_room(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module, "_fill_zeros", no_room)
    with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
        store = SQLiteStore(str(tmp_path))
    try:
        assert ready(store) == list(range(10, 15))
        assert store._journal is None and os.path.exists(tmp_path / FILE_NAME)
        assert "no room for the lone-send journal" in caplog.text
        store.commit_insert([msg(20)])  # (through the database)
        assert not store._owed and ready(store) == [10, 11, 12, 13, 14, 20]
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["directory", "fifo", "link to /dev/null"])
def test_a_journal_that_is_not_a_regular_file_is_refused_by_name(tmp_path, kind):
    path = tmp_path / FILE_NAME
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/null", path)
    with pytest.raises(StartupError, match=f"{FILE_NAME} is not a regular file"):
        SQLiteStore(str(tmp_path))
    assert os.path.lexists(path)  # (left as it was)


# --- a full disk under the rows owed ---


def full_disk_for_owed_rows(store: SQLiteStore, monkeypatch) -> None:
    real = store._write_lone

    def write_lone(messages, held, recheck, journaled=False, **kw):
        if journaled:
            raise sqlite3.OperationalError("database or disk is full")
        return real(messages, held, recheck, journaled, **kw)

    monkeypatch.setattr(store, "_write_lone", write_lone)


def test_a_full_disk_keeps_the_rows_owed_and_rollback_writes_them(tmp_path, monkeypatch):
    """A full disk is the relay's usual StoreError (it refuses sends and
    starts over), not a failed sync: the rows stay owed, and the rollback
    it starts over with writes them (with the reserve given back)."""
    store = new_store(tmp_path)
    try:
        for seq in range(10, 13):
            lone_send(store, seq, write=False)
        full_disk_for_owed_rows(store, monkeypatch)
        with pytest.raises(StoreError) as failed:
            store.write_owed()
        assert failed.value.full and not failed.value.unsynced and store.sync_failed is None
        assert [m.seq for m in store._owed] == [10, 11, 12]
        monkeypatch.undo()
        store.rollback()
        assert not store._owed and ready(store) == [10, 11, 12]
    finally:
        store.close()


def test_large_bodies_whose_segment_sync_failed_go_into_the_database(tmp_path, monkeypatch):
    """The segment's sync before the rows' commit met a full disk: the rows
    stay owed, and their bodies, whose written bytes a failed sync leaves
    untrusted, go into the database with them (the journal's copies)."""
    store = new_store(tmp_path)
    try:
        relay_lone_sends(store, (10, 11))
        assert store._owed_places

        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fdatasync", no_space)
        with pytest.raises(StoreError) as failed:
            store.write_owed()
        assert failed.value.full and [m.seq for m in store._owed] == [10, 11]
        monkeypatch.undo()
        store.rollback()
        assert not store._owed and ready(store) == [10, 11]
        assert segment_bytes(store, 10) is None and store.get(11) == msg(11, LARGE)
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [10, 11]


def test_a_full_disk_at_the_commit_keeps_the_bodies_synced_in_their_segment(tmp_path, monkeypatch):
    """The segment's sync went through and the COMMIT met a full disk: the
    bodies are good, and the rows written again point at them."""
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False, body=LARGE)
        real, failures = store._commit_tx, [1]

        def commit_tx(*args):
            if failures:
                failures.pop()
                raise sqlite3.OperationalError("database or disk is full")
            return real(*args)

        monkeypatch.setattr(store, "_commit_tx", commit_tx)
        with pytest.raises(StoreError) as failed:
            store.write_owed()
        assert failed.value.full and store._owed and store._owed_places
        store.rollback()
        assert not store._owed and segment_bytes(store, 10) == LARGE
    finally:
        store.close()
    assert ready_after_restart(tmp_path) == [10]


def test_bodies_written_early_under_a_failed_segment_sync_go_into_the_database(tmp_path, monkeypatch):
    """Any failed sync of their segment (Linux reports a failed write-back
    once) leaves the bodies written early untrusted: the next write of
    their rows keeps the journal's copies in the database."""
    store = new_store(tmp_path)
    try:
        lone_send(store, 10, write=False, body=LARGE)
        store.write_owed(journal_module.OWED_ROWS)
        monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(OSError):
            store._segments.sync()
        monkeypatch.undo()
        assert store._segments.early_failed
        store.write_owed()
        assert segment_bytes(store, 10) is None and store.get(10) == msg(10, LARGE)
        assert not store._segments.early_failed
    finally:
        store.close()


def test_a_segment_that_fails_its_first_write_is_not_left_behind(tmp_path, monkeypatch):
    """A body written early that fails in the segment made for it: that
    segment goes (else every lone send would leave one), the body goes
    into the database with its row."""
    store = new_store(tmp_path)
    try:
        def eio(*args):
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(segments_module, "pwrite_all", eio)
        relay_lone_sends(store, range(10, 15))
        assert store._segments.on_disk() == {}
        monkeypatch.undo()
        store.write_owed()
        assert [store.get(seq) for seq in range(10, 15)] == [msg(seq, LARGE) for seq in range(10, 15)]
    finally:
        store.close()


def test_a_rollback_gives_the_reserve_to_rows_it_could_not_write_at_first(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    try:
        for seq in range(10, 13):
            lone_send(store, seq, write=False)
        real, failures = store._write_lone, [1]

        def write_lone(messages, held, recheck, journaled=False, **kw):
            if journaled and failures:  # (the first write finds the disk full; the reserve makes room)
                failures.pop()
                raise sqlite3.OperationalError("database or disk is full")
            return real(messages, held, recheck, journaled, **kw)

        monkeypatch.setattr(store, "_write_lone", write_lone)
        assert store.hold_reserve() and os.path.exists(tmp_path / "relay.reserve")
        assert store.rollback() is True  # (the relay then refuses sends, as on a full disk)
        assert not failures and not store._owed and ready(store) == [10, 11, 12]
        assert not os.path.exists(tmp_path / "relay.reserve")
    finally:
        store.close()


def test_a_journal_from_before_its_database_had_an_id_is_read(tmp_path):
    """The first journal's records had no id in their CRC (2208324): a
    database with a mark and no id reads them once, then takes an id."""
    store = new_store(tmp_path)
    lone_send(store, 10)
    crash(store)
    db = sqlite3.connect(tmp_path / SQLiteStore.DB_NAME)
    db.execute("DELETE FROM meta WHERE key='journal_id'")
    db.commit()
    db.close()
    j = Journal(str(tmp_path), b"")
    try:
        for seq in (10, 11):
            put(j, seq)
    finally:
        j.close()
    assert ready_after_restart(tmp_path) == [10, 11]
    assert ready_after_restart(tmp_path) == [10, 11]  # (with an id now: the old records are not read again)


def test_the_start_syncs_the_wal_before_it_writes_over_the_ring(tmp_path, monkeypatch):
    from murano_zmq.store import sqlite as sqlite_module

    store = new_store(tmp_path)
    lone_send(store, 10)
    crash(store)
    synced, real = [], sqlite_module.sync_path
    opened = journal_module.Journal.__init__

    def journal_init(self, data_dir, owner):
        synced.append("journal opened")
        opened(self, data_dir, owner)

    monkeypatch.setattr(sqlite_module, "sync_path", lambda path, *how: (synced.append(path), real(path, *how))[1])
    monkeypatch.setattr(journal_module.Journal, "__init__", journal_init)
    SQLiteStore(str(tmp_path)).close()
    assert synced[:2] == [str(tmp_path / "relay.db-wal"), "journal opened"]


def test_rows_that_cannot_be_put_back_stop_the_relay(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    lone_send(store, 10, write=False)
    full_disk_for_owed_rows(store, monkeypatch)
    with pytest.raises(StoreError) as failed:
        store.rollback()
    assert failed.value.unsynced and "journaled sends" in str(failed.value)
    crash(store)
    monkeypatch.undo()
    assert ready_after_restart(tmp_path) == [10]


# --- a power loss: the WAL as its last sync left it ---


@pytest.mark.parametrize("size", [300, 20_000], ids=["small", "segment"])
def test_a_power_loss_loses_no_confirmed_send_and_brings_back_no_durable_ack(tmp_path, monkeypatch, size):
    """Random lone sends (their rows owed, written 16 at a time), sends of
    two (synced commits), acks (held, or committed without a sync), a small
    ring that wraps often; then a copy of the data directory with the WAL as
    its last sync left it (and sometimes some of what was written since),
    the journal as it is, the segment files as their last sync left them.
    Every confirmed send not acked is there, its body whole; no message
    whose ack a WAL sync covered comes back.  (After review 53.)  With
    bodies in segments, also a copy at every few WAL syncs and after every
    few lone sends (with some of the WAL written since its last sync): the
    moment a row's transaction may be durable, its body must be already."""
    monkeypatch.setattr(journal_module, "SIZE", 64 * 1024 if size < 8192 else 1 << 20)
    no_checkpoint = {"commits": 10**9, "nbytes": 10**15}
    for seed in range(6 if size < 8192 else 3):  # (a segment's copies cost more: 3 seeds, ~6 s)
        rnd = random.Random(seed)
        live = tmp_path / f"live{seed}"
        store = SQLiteStore(str(live), checkpoint=no_checkpoint)
        store._segments._flush_shared = False  # (bodies durable by their own syncs alone: this copy's model)
        synced_segments: dict[str, bytes] = {}
        segment_syncs = [0]
        real_segment_sync = store._segments.sync

        def segment_sync_and_copy(real=real_segment_sync, copy=synced_segments, seg_dir=store._segments.dir,
                                  syncs=segment_syncs, **kw):
            real(**kw)
            syncs[0] += 1
            copy.clear()
            copy.update(segment_files(seg_dir))

        # A sync run by the store's thread (Segments.early_sync) covers at
        # least what was written when it began: the files then are what it
        # leaves, once the store has seen it end, unless a sync came since.
        began: dict[int, tuple[dict[str, bytes], int]] = {}
        early_syncs = [0]
        partial_writes = [0]  # (rows written after the thread's sync, the later ones still owed)

        def early_sync_and_copy(real=store._segments.early_sync, seg_dir=store._segments.dir, syncs=segment_syncs,
                                began=began, early_syncs=early_syncs):
            job = real()
            if job is not None:
                began[id(job)] = (segment_files(seg_dir), syncs[0])
                early_syncs[0] += 1
            return job

        def early_synced_and_copy(job, error, real=store._segments.early_synced, copy=synced_segments,
                                  syncs=segment_syncs, began=began):
            files, at = began.pop(id(job))
            if error is None and at == syncs[0]:
                copy.clear()
                copy.update(files)
            return real(job, error)

        real_write_owed = store._write_owed_locked

        def counting_write_owed(first=None, real=real_write_owed, partial=partial_writes):
            partial[0] += first is not None
            return real(first)

        store._segments.sync = segment_sync_and_copy
        store._write_owed_locked = counting_write_owed
        store._segments.early_sync = early_sync_and_copy
        store._segments.early_synced = early_synced_and_copy
        store.save_mailbox(MailboxRow(1, "jobs", {}, False))
        store.seal()
        store.commit()
        with open(store.path + "-wal", "rb") as f:  # (the mailbox's commit: synced)
            synced_wal = [f.read()]
        acked, durably_acked, confirmed = set(), set(), set()
        real_sync = store._sync_wal
        copies = [0]

        def power_loss(wal: bytes, seed=seed, live=live, store=store, synced_segments=synced_segments,
                       confirmed=confirmed, acked=acked, durably_acked=durably_acked, copies=copies):
            """A copy of the data directory as a power loss would leave it, started and checked."""
            copies[0] += 1
            lost = tmp_path / f"lost{seed}-{copies[0]}"
            (lost / "segments").mkdir(parents=True)
            shutil.copy(store.path, lost / "relay.db")
            (lost / "relay.db-wal").write_bytes(wal)
            shutil.copy(live / FILE_NAME, lost / FILE_NAME)
            for name, data in synced_segments.items():
                (lost / "segments" / name).write_bytes(data)
            after = SQLiteStore(str(lost), checkpoint=no_checkpoint)
            try:
                ready_now = after.load_ready(1, 0, 10_000)
                present = {m.msg_id for m in ready_now}
                bodies = {m.seq: after.get(m.seq).body for m in ready_now}
            finally:
                after.close()
            shutil.rmtree(lost)
            assert not (confirmed - acked) - present, f"seed {seed}: confirmed sends lost"
            assert all(b in (b"x" * size, b"y" * size) for b in bodies.values()), f"seed {seed}: a body lost"
            assert not durably_acked & present, f"seed {seed}: durably acked messages came back"

        def sync_and_copy(store=store, real_sync=real_sync, synced_wal=synced_wal, acked=acked,
                          durably_acked=durably_acked, rnd=rnd, power_loss=power_loss):
            seen = visible_ids(store.path)  # what a sync that begins now makes durable
            real_sync()
            with open(store.path + "-wal", "rb") as f:
                synced_wal[0] = f.read()
            durably_acked.update(i for i in acked if i not in seen)
            if size >= 8192 and rnd.random() < 0.3:
                power_loss(synced_wal[0])

        store._sync_wal = sync_and_copy
        seq = 100
        for i in range(300 + (40 if size >= 8192 else 0)):
            op = rnd.random() if i < 300 else 0.0  # (then lone sends alone: their rows 16 a transaction)
            if op < 0.6:  # a lone send
                seq += 1
                store.commit_insert([msg(seq, b"x" * size)])
                confirmed.add(msg(seq).msg_id)
                store.write_owed(16)
                if size >= 8192 and (i % 3 == 0 if i >= 300 else rnd.random() < 0.15):  # (unsynced WAL frames too)
                    with open(store.path + "-wal", "rb") as f:
                        now = f.read()
                    power_loss(now[:len(synced_wal[0]) + rnd.randint(0, max(0, len(now) - len(synced_wal[0])))])
            elif op < 0.75:  # a turn with a send of two
                store.write_owed()
                store.insert([msg(seq + 1, b"y" * size), msg(seq + 2, b"y" * size)])
                confirmed.update((msg(seq + 1).msg_id, msg(seq + 2).msg_id))
                seq += 2
                store.seal()
                store.commit()
            else:  # a turn with acks
                store.write_owed()
                present = sorted(m.seq for m in store.load_ready(1, 0, 10_000) if m.msg_id not in acked)
                take = present[:rnd.randint(1, 3)]
                if take:
                    store.delete(take)
                    acked.update(msg(s).msg_id for s in take)
                    if rnd.random() < 0.5:
                        store.seal()
                        store.commit()
        with open(store.path + "-wal", "rb") as f:
            now = f.read()
        extra = rnd.randint(0, max(0, len(now) - len(synced_wal[0]))) if rnd.random() < 0.5 else 0
        try:
            power_loss(now[:len(synced_wal[0]) + extra])
        finally:
            crash(store)
        assert early_syncs[0] >= (2 if size >= 8192 else 0), "the rows' segment synced in the store's thread"
        assert partial_writes[0] >= (2 if size >= 8192 else 0), "rows written after the thread's sync"


def segment_files(seg_dir: str) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(seg_dir):
        with open(os.path.join(seg_dir, name), "rb") as f:
            out[name] = f.read()
    return out


def visible_ids(path: str) -> set[bytes]:
    db = sqlite3.connect(path, timeout=10)
    try:
        return {r[0] for r in db.execute("SELECT msg_id FROM messages")}
    finally:
        db.close()


def test_a_scan_past_unreadable_bytes_full_of_lookalike_headers_gives_up_in_bounded_time(tmp_path, caplog):
    """A body made of fake record headers, left unreadable (torn) after
    the head: the scan checksums a bounded number of bytes, then says it
    gave up; the records before are read."""
    import struct

    j = Journal(str(tmp_path), OWNER)
    try:
        put(j, 1)
        at = j._head
    finally:
        j.close()
    # Headers claiming more than a record holds are passed over unchecked,
    # the rest checksummed, each charged a block at least: the scan gives
    # up either way, after a bounded number of them.
    for length, gives_up in ((journal_module.SIZE // 4, True), (journal_module.MAX_RECORD - 64, True),
                             (0, True)):
        fake = struct.pack("<IIQI", journal_module.MAGIC, length, 7, 0)
        with open(tmp_path / FILE_NAME, "r+b") as f:
            f.seek(at)
            f.write(fake * ((journal_module.SIZE - at) // len(fake) - 1))
        # (without a bound: ~800,000 checksums of 512 KiB each, past the test's timeout)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
            records = journal_module.read_records(str(tmp_path / FILE_NAME), OWNER)
        assert [seq for seq, _ in records] == [1]
        assert ("stopped looking for lone-send journal records" in caplog.text) is gives_up
