"""Segment bodies written and read around the page cache (store/direct.py):
the bytes that come back, where the reads come from, and the fall-backs
to buffered I/O where the file system has no direct I/O."""

from __future__ import annotations

import errno
import logging
import os
import threading

import pytest

from murano_zmq.store import direct
from murano_zmq.store import segments as segments_module
from murano_zmq.store.base import StoredMessage
from murano_zmq.store.direct import ALIGN, DirectReader, DirectWriter, aligned_up, open_direct
from murano_zmq.store.segments import DIRECT_MIN, Segments
from murano_zmq.store.sqlite import SQLiteStore

LARGE = 64 * 1024


@pytest.fixture(autouse=True)
def needs_direct_io(tmp_path):
    fd = open_direct(str(tmp_path / "probe"), os.O_WRONLY | os.O_CREAT)
    if fd is None:
        pytest.skip("this file system has no O_DIRECT (the buffered path is tested in test_store.py)")
    os.close(fd)


def msg(seq: int, body: bytes, mailbox: int = 1) -> StoredMessage:
    return StoredMessage(seq, mailbox, seq.to_bytes(16, "big"), b"", body, 1.0, None, 0)


def flush(store) -> None:
    store.seal()
    store.commit()


def body(i: int, size: int = LARGE) -> bytes:
    """Bytes that differ from one offset to the next and from body to body."""
    return (i.to_bytes(4, "big") + os.urandom(4)) * (size // 8) + b"t" * (size % 8)


def open_pair(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return fd, open_direct(path, os.O_WRONLY)


@pytest.mark.parametrize("start", [0, ALIGN, 100, ALIGN - 1])
def test_a_run_written_direct_reads_back_whole(tmp_path, monkeypatch, start):
    """The head up to the first block boundary goes through the page cache,
    the rest from the aligned buffer, cut into pieces of CHUNK bytes; the
    last block is padded with zeros, and the padded end is returned."""
    monkeypatch.setattr(direct, "CHUNK", 3 * ALIGN)  # pieces, and bodies across them
    path = str(tmp_path / "seg")
    fd, dfd = open_pair(path)
    try:
        os.pwrite(fd, b"p" * start, 0)  # what earlier bodies left
        run = [body(1, 5000), body(2, 3), body(3, 4 * ALIGN + 7), body(4, ALIGN)]
        end = DirectWriter().write(fd, dfd, start, run)
        joined = b"".join(run)
        assert end == aligned_up(start + len(joined)) or end == start + len(joined) <= aligned_up(start)
        with open(path, "rb") as f:
            data = f.read()
        assert data[:start] == b"p" * start
        assert data[start:start + len(joined)] == joined
        assert data[start + len(joined):] == bytes(len(data) - start - len(joined))
    finally:
        os.close(fd)
        os.close(dfd)


def test_a_run_within_its_first_block_is_written_buffered_only(tmp_path):
    path = str(tmp_path / "seg")
    fd, dfd = open_pair(path)
    try:
        assert DirectWriter().write(fd, dfd, 10, [b"abc", b"de"]) == 15
        with open(path, "rb") as f:
            assert f.read() == bytes(10) + b"abcde"
    finally:
        os.close(fd)
        os.close(dfd)


def test_a_failed_direct_write_kept_in_a_traceback_leaves_the_buffer_free(tmp_path, monkeypatch):
    """A full disk's ENOSPC from the last, padded direct write: its traceback
    (kept by the relay's failure path, a cycle the tuned collector is slow
    to free) held a slice of the writer's buffer, and the buffer's close()
    raised BufferError: a traceback and exit 1 at the relay's stop, and the
    relay's death where a later batch needed a larger buffer."""
    path = str(tmp_path / "seg")
    fd, dfd = open_pair(path)

    def full(dfd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "_pwrite_direct", full)
    writer = DirectWriter()
    try:
        with pytest.raises(OSError) as kept:
            writer.write(fd, dfd, 0, [b"x" * (ALIGN + 100)])
        assert kept.value.__traceback__ is not None  # (held, with its frames, while the writer goes on)
        writer._buffer(direct.WRITE_CHUNK)  # a larger one: the first is closed
        writer.close()
    finally:
        os.close(fd)
        os.close(dfd)


class Reads:
    """A DirectReader over one file of bodies, counting where its reads ran."""

    def __init__(self, tmp_path, sizes: list[int], readable: int | None = None):
        self.path = str(tmp_path / "1.seg")
        self.bodies = [body(i, n) for i, n in enumerate(sizes)]
        self.places = []
        off = 0
        for b in self.bodies:
            self.places.append((1, off, len(b)))
            off += len(b)
        with open(self.path, "wb") as f:
            f.write(b"".join(self.bodies))
        self.readable = off if readable is None else readable
        self.reader = DirectReader(lambda seg: self.path, lambda seg: self.readable if seg == 1 else 0)
        self.fills = {"ahead": 0, "asked": 0}
        real = DirectReader._fill

        def fill(chunk, fd):
            self.fills["ahead" if threading.current_thread().name == "relay-read-ahead" else "asked"] += 1
            return real(chunk, fd)

        self.reader._fill = fill

    def read(self, first: int, last: int) -> list[bytes]:
        """Bodies first..last (a run), as Segments.read_many reads them, then read ahead."""
        places = self.places[first:last + 1]
        pieces = self.reader.read(1, places[0][1], places[-1][1] + places[-1][2])
        assert pieces is not None
        got = segments_module._cut(pieces, places)
        self.reader.read_ahead(1, places[-1][1] + places[-1][2])
        return got


def test_reads_in_order_come_from_chunks_read_ahead(tmp_path, monkeypatch):
    """A consumer's window read run after run: after the first read, the
    chunks come from the thread, each starting where the one before it
    ends, so bodies across two chunks come back whole."""
    monkeypatch.setattr(direct, "CHUNK", 16 * ALIGN)
    reads = Reads(tmp_path, [3 * ALIGN + 100] * 40)
    try:
        for i in range(0, 40, 2):
            assert reads.read(i, i + 1) == reads.bodies[i:i + 2]
        # the first read, and at most the last few blocks (too few to read ahead)
        assert reads.fills["asked"] <= 2
        assert reads.fills["ahead"] >= 7  # 40 bodies of ~3 blocks, 16 blocks per chunk
    finally:
        reads.reader.close()


def test_scattered_reads_read_nothing_ahead(tmp_path, monkeypatch):
    """Reads that jump about (one body of each of many mailboxes) read only
    what they ask for: chunks read ahead would hold other mailboxes' bodies."""
    monkeypatch.setattr(direct, "CHUNK", 64 * ALIGN)  # (a run of an eighth of that reads on: not these)
    reads = Reads(tmp_path, [3 * ALIGN] * 60)
    try:
        for i in (50, 3, 40, 10, 30, 20):
            assert reads.read(i, i) == [reads.bodies[i]]
        assert reads.fills == {"ahead": 0, "asked": 6}
    finally:
        reads.reader.close()


def test_nothing_past_what_is_readable_is_read_or_served(tmp_path, monkeypatch):
    """A read never reaches past readable(seg) (what is synced): a body
    beyond it is refused (the caller reads it buffered), and one written
    and synced later comes from a new read, not from an older chunk."""
    monkeypatch.setattr(direct, "CHUNK", 64 * ALIGN)
    reads = Reads(tmp_path, [ALIGN + 1] * 20, readable=10 * (ALIGN + 1))
    try:
        assert reads.read(0, 4) == reads.bodies[:5]
        assert reads.reader.read(1, *(lambda p: (p[1], p[1] + p[2]))(reads.places[12])) is None
        with open(reads.path, "r+b") as f:  # body 12 rewritten, then "synced"
            f.seek(reads.places[12][1])
            reads.bodies[12] = body(99, ALIGN + 1)
            f.write(reads.bodies[12])
        reads.readable = 20 * (ALIGN + 1)
        assert reads.read(5, 12) == reads.bodies[5:13]
    finally:
        reads.reader.close()


def test_a_forgotten_segment_read_ahead_is_waited_for_and_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "CHUNK", 16 * ALIGN)
    reads = Reads(tmp_path, [3 * ALIGN] * 40)
    reads.read(0, 1)
    reads.read(2, 3)  # (in order: the thread reads on)
    reads.reader.forget(1)
    assert not reads.reader._ahead and reads.reader._last is None and not reads.reader._fds
    reads.reader.close()


# --- through the store -------------------------------------------------------------------


def large_rows(first: int, n: int, mailbox: int = 1) -> list[StoredMessage]:
    return [msg(seq, body(seq), mailbox) for seq in range(first, first + n)]


def in_windows(store, size: int, settle: bool = False) -> list[StoredMessage]:
    """Mailbox 1 read as a consumer's windows are, `size` rows after the
    last one each time (settle: each window deleted and committed)."""
    after, got = 0, []
    while True:
        window = store.load_ready(1, after, size)
        if not window:
            return got
        got += window
        after = window[-1].seq
        if settle:
            store.delete([m.seq for m in window])
            flush(store)


def test_a_long_batch_goes_around_the_page_cache_and_lone_sends_through_it(tmp_path, monkeypatch):
    """Batches of DIRECT_MIN bytes and up are written direct, lone sends
    buffered (their pages reused: store/segments.py), one after the other
    in the same segment at unaligned offsets; every body reads back whole,
    through the read-ahead and after a restart."""
    calls = []
    real = DirectWriter.write
    monkeypatch.setattr(DirectWriter, "write", lambda self, *a: (calls.append(a[2]), real(self, *a))[1])
    rows = large_rows(2, 8)
    s = SQLiteStore(str(tmp_path))
    try:
        s.commit_insert([msg(1, b"lone" * 3001)])  # 12,004 bytes: the next run starts unaligned
        s.insert(rows[:6])  # 384 KiB
        flush(s)
        s.commit_insert([rows[6]])
        s.insert([rows[7]])  # one body: below DIRECT_MIN
        flush(s)
        assert calls == [12004]
        assert [m.body for m in s.load_ready(1, 0, 100)] == [b"lone" * 3001] + [r.body for r in rows]
    finally:
        s.close()
    s = SQLiteStore(str(tmp_path))
    try:
        assert [m.body for m in s.load_ready(1, 0, 100)] == [b"lone" * 3001] + [r.body for r in rows]
    finally:
        s.close()


def test_a_backlog_reads_back_in_windows(tmp_path, monkeypatch):
    """A backlog of large bodies read as a consumer's windows are (a few
    rows after the last one each time) and settled as it goes."""
    monkeypatch.setattr(direct, "CHUNK", 32 * ALIGN)
    s = SQLiteStore(str(tmp_path))
    try:
        rows = large_rows(1, 60)
        for i in range(0, 60, 10):
            s.insert(rows[i:i + 10])
            flush(s)
        assert [m.body for m in in_windows(s, 3, settle=True)] == [r.body for r in rows]
        assert s._segments._reader._thread is not None  # (it read ahead)
    finally:
        s.close()


def test_a_file_system_without_direct_io_keeps_segments_buffered(tmp_path, monkeypatch):
    monkeypatch.setattr(segments_module, "open_direct", lambda path, flags: None)
    monkeypatch.setattr(direct, "open_direct", lambda path, flags: None)
    s = SQLiteStore(str(tmp_path))
    try:
        rows = large_rows(1, 8)
        s.insert(rows)
        flush(s)
        assert not s._segments._dfds
        assert [m.body for m in s.load_ready(1, 0, 100)] == [r.body for r in rows]
    finally:
        s.close()


def test_a_refused_direct_write_is_written_buffered_from_then_on(tmp_path, monkeypatch, caplog):
    def refuse(self, *args):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(DirectWriter, "write", refuse)
    s = SQLiteStore(str(tmp_path))
    try:
        rows = large_rows(1, 16)
        with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
            s.insert(rows[:8])
            flush(s)
            s.insert(rows[8:])
            flush(s)
        assert [r.message for r in caplog.records if "refuses direct I/O" in r.message] != []
        assert len([r for r in caplog.records if "refuses direct I/O" in r.message]) == 1
        assert not s._segments._direct and s._segments._reader._closed
        assert [m.body for m in s.load_ready(1, 0, 100)] == [r.body for r in rows]
    finally:
        s.close()


def test_a_refused_direct_read_is_read_buffered_from_then_on(tmp_path, monkeypatch, caplog):
    s = SQLiteStore(str(tmp_path))
    try:
        rows = large_rows(1, 8)
        s.insert(rows)
        flush(s)
        real = os.preadv

        def refuse(fd, buffers, offset):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        monkeypatch.setattr(direct.os, "preadv", refuse)
        with caplog.at_level(logging.WARNING, logger="murano_zmq.store"):
            assert [m.body for m in s.load_ready(1, 0, 100)] == [r.body for r in rows]
        assert any("direct reads fail" in r.message for r in caplog.records)
        monkeypatch.setattr(direct.os, "preadv", real)
        assert s._segments._reader._closed
        assert [m.body for m in s.load_ready(1, 0, 100)] == [r.body for r in rows]
    finally:
        s.close()


def test_direct_min_is_above_a_lone_send_of_the_usual_large_body():
    """A lone 64 KiB send stays buffered: its pages are reused (cheaper
    for one body than a direct write, docs/performance.md "Session 19")."""
    assert DIRECT_MIN > 2 * LARGE


def test_segments_close_stops_the_read_ahead(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "CHUNK", 16 * ALIGN)
    segs = Segments(str(tmp_path))
    written = [body(i, 3 * ALIGN) for i in range(10)]
    places = [segs.append(b) for b in written]
    segs.sync()
    assert segs.read_many(places[:2], str) + segs.read_many(places[2:4], str) == written[:4]
    assert segs._reader._thread is not None and segs._reader._ahead  # reading on
    segs.close()
    assert segs._reader._thread is None and not segs._reader._fds


def test_a_backlog_left_by_an_earlier_run_is_read_ahead_across_its_segments(tmp_path, monkeypatch):
    """After a restart the segments are older ones (never written again):
    read ahead up to each one's size, then on into the next, so only the
    first read of the backlog waits on the disk; a segment being deleted
    is read no more."""
    monkeypatch.setattr(direct, "CHUNK", 48 * ALIGN)  # (three bodies a chunk)
    s = SQLiteStore(str(tmp_path))
    s._segments.roll_bytes = 8 * LARGE
    rows = large_rows(1, 24)  # three segments
    s.insert(rows)
    flush(s)
    s.close()
    s = SQLiteStore(str(tmp_path))
    try:
        reader = s._segments._reader
        fills = []
        real = DirectReader._fill

        def fill(chunk, fd):
            fills.append((chunk.seg, threading.current_thread().name == "relay-read-ahead"))
            return real(chunk, fd)

        reader._fill = fill
        assert [m.body for m in in_windows(s, 2)] == [r.body for r in rows]
        assert [f for f in fills if not f[1]] == [(fills[0][0], False)]  # the first read only
        assert {seg for seg, ahead in fills if ahead} == {fills[0][0], fills[0][0] + 1, fills[0][0] + 2}
        assert s._segments._readable(fills[0][0]) == 8 * LARGE  # (its size)
        s.delete([r.seq for r in rows[:8]])
        flush(s)  # the first segment goes
        assert s._segments._readable(fills[0][0]) == 0
    finally:
        s.close()


def test_a_body_across_pieces_that_overlap_comes_out_once():
    """A chunk read ahead from an unaligned end begins at the block before
    it: the next piece may hold bytes the one before held too."""
    data = bytes(range(256)) * 64  # 16 KiB
    pieces = [(memoryview(data[0:6000]), 0), (memoryview(data[4096:12000]), 4096), (memoryview(data[8192:]), 8192)]
    places = [(1, 100, 50), (1, 5000, 2000), (1, 5990, 8000), (1, 15000, 1384)]
    assert segments_module._cut(pieces, places) == [data[o:o + n] for _, o, n in places]


def test_a_short_direct_write_is_a_full_disk_not_a_fall_back(tmp_path, monkeypatch):
    path = str(tmp_path / "seg")
    fd, dfd = open_pair(path)
    real = os.pwrite
    monkeypatch.setattr(direct.os, "pwrite", lambda f, v, o: real(f, v[:ALIGN], o) if f == dfd else real(f, v, o))
    try:
        with pytest.raises(OSError) as failed:
            DirectWriter().write(fd, dfd, 0, [body(1, 4 * ALIGN)])
        assert failed.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
        os.close(dfd)
