"""A lone commit's bodies made durable by the WAL's flush (store/writeback.py):
which commits take that path, the checksums their rows keep, the rows of a
last commit whose bodies never reached the disk dropped at start, and the
file systems it is used on.  The store's logic is tested on any file system
(shares_flush forced true); one test checks the real one where it is ext4."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import zlib

import pytest

from murano_zmq.store import segments as segments_module
from murano_zmq.store import writeback
from murano_zmq.store.base import StoredMessage
from murano_zmq.store.segments import SEGMENT_DIR, ZERO_AHEAD
from murano_zmq.store.sqlite import SQLiteStore
from tests.helpers import segment_files, without_journal

LARGE = 64 * 1024
PER_FILL = ZERO_AHEAD // LARGE + 1  # lone bodies per growth of the segment: the first syncs its own


@pytest.fixture(autouse=True)
def flush_shared(monkeypatch):
    """As on ext4, wherever the tests' directory is (sync_file_range()
    works on any file, tmpfs's included)."""
    monkeypatch.setattr(writeback, "shares_flush", lambda *args: True)


def body(seq: int) -> bytes:
    return bytes([seq]) * LARGE


def msg(seq: int, body: bytes) -> StoredMessage:
    return StoredMessage(seq, 1, seq.to_bytes(16, "big"), b"", body, 1.0, None, 0)


def checksums(store: SQLiteStore) -> dict[int, int | None]:
    return dict(store._db.execute("SELECT seq, seg_crc FROM messages ORDER BY seq"))


def test_lone_bodies_over_the_zeros_ahead_take_no_sync_of_their_own(tmp_path, monkeypatch):
    """The first lone body grows the segment (and writes zeros ahead): synced
    before its COMMIT.  The next ones land on those zeros: written, waited
    for, and flushed by the WAL's sync; their rows keep their CRC-32."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    calls = []
    real_sync, real_wait, real_fdatasync = s._segments.sync, s._segments.wait_unsynced, os.fdatasync
    monkeypatch.setattr(s._segments, "sync", lambda **kw: (calls.append("segment sync"), real_sync(**kw))[1])
    monkeypatch.setattr(s._segments, "wait_unsynced", lambda: (calls.append("wait"), real_wait())[1])
    monkeypatch.setattr(s, "_sync_wal", lambda: (calls.append("wal sync"), real_fdatasync(s._wal_fd))[1])
    try:
        for seq in range(1, PER_FILL + 2):
            s.commit_insert([msg(seq, body=body(seq))])
        assert calls == (["segment sync", "wal sync"] + ["wait", "wal sync"] * (PER_FILL - 1)
                         + ["segment sync", "wal sync"])
        crcs = checksums(s)
        assert crcs[1] is None and crcs[PER_FILL + 1] is None
        assert all(crcs[seq] == zlib.crc32(body(seq)) for seq in range(2, PER_FILL + 1))
        assert [m.body for m in s.get_many(list(crcs))] == [body(seq) for seq in crcs]
        assert s._segments._synced[1] == (PER_FILL + 1) * LARGE  # (reads may reach them now)
    finally:
        s.close()


def test_a_batch_and_a_refusing_file_system_sync_their_bodies(tmp_path):
    s = without_journal(SQLiteStore(str(tmp_path)))
    try:
        s.commit_insert([msg(1, body=body(1))])  # (zeros ahead: the next would fit)
        s.insert([msg(2, body=body(2))])
        s.seal()
        s.commit()
        s._segments._flush_shared = False  # (btrfs, tmpfs, data=journal...)
        s.commit_insert([msg(3, body=body(3))])
        assert checksums(s) == {1: None, 2: None, 3: None}
    finally:
        s.close()


def test_a_last_lone_body_that_never_reached_the_disk_is_dropped_at_start(tmp_path, caplog, monkeypatch):
    """A crash after the WAL's frames reached the disk and before the body
    did (no confirm went out): at start the row's checksum does not match,
    it is logged and deleted; the rows before it are delivered, and the
    newest segment is synced (a process crash leaves its bodies in the page
    cache only)."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    for seq in range(1, 4):
        s.commit_insert([msg(seq, body=body(seq))])
    assert checksums(s)[3] is not None
    s.close()
    path = os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[0])
    with open(path, "r+b") as f:  # what the disk holds there: the zeros written ahead
        f.seek(2 * LARGE + 100)
        f.write(bytes(LARGE - 100))
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(segments_module.os, "fdatasync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                                     real(fd))[1])
    with caplog.at_level(logging.ERROR, logger="murano_zmq.store"):
        s = without_journal(SQLiteStore(str(tmp_path)))
    try:
        assert [m.body for m in s.load_ready(1, 0, 10)] == [body(1), body(2)]
        assert "message 00000000000000000000000000000003 (seq 3, mailbox id 1) was never confirmed" in caplog.text
        assert [p for p in synced if p.endswith(".seg")] == [path]  # (the WAL too: store/journal.py)
        assert 3 not in checksums(s)
    finally:
        s.close()


def test_a_last_lone_body_found_whole_at_start_is_written_again(tmp_path, monkeypatch):
    """After a failed write-back the page cache may hold a body clean that
    the disk lacks: a body of the last commit whose checksum matches is
    written again before the start's sync of the newest segment."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    for seq in range(1, 3):
        s.commit_insert([msg(seq, body=body(seq))])
    s.close()
    events = []
    real_pwrite, real_fdatasync = os.pwrite, os.fdatasync
    name = lambda fd: os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))  # noqa: E731
    monkeypatch.setattr(segments_module.os, "pwrite", lambda fd, data, off: (
        events.append(("write", name(fd), off, len(data))), real_pwrite(fd, data, off))[1])
    monkeypatch.setattr(segments_module.os, "fdatasync", lambda fd: (
        events.append(("sync", name(fd))), real_fdatasync(fd))[1])
    s = without_journal(SQLiteStore(str(tmp_path)))
    try:
        segment = segment_files(tmp_path)[0]
        # (the start also syncs the WAL and writes the journal's zeros: store/journal.py)
        assert [e for e in events if e[1] == segment] == [("write", segment, LARGE, LARGE), ("sync", segment)]
        assert [m.body for m in s.load_ready(1, 0, 10)] == [body(1), body(2)]
    finally:
        s.close()


def test_only_the_last_commits_bodies_are_read_at_start(tmp_path, monkeypatch):
    """Only the last commit can have a body the disk lacks (each waits for
    the flush of the one before: tests/integration/test_confirm_contract.py):
    the bodies before it are not read at start."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    for seq in range(1, PER_FILL + 1):
        s.commit_insert([msg(seq, body=body(seq))])
    s.close()
    read = []
    real = segments_module.Segments.rewrite_if_whole
    monkeypatch.setattr(segments_module.Segments, "rewrite_if_whole",
                        lambda self, seg, off, length, crc: (read.append(off), real(self, seg, off, length, crc))[1])
    s = without_journal(SQLiteStore(str(tmp_path)))
    try:
        # The last commit's bodies end the newest segment, under DIRECT_MIN bytes.
        assert read and all(off >= PER_FILL * LARGE - segments_module.DIRECT_MIN for off in read)
        assert len(s.load_ready(1, 0, 10)) == PER_FILL
    finally:
        s.close()


MOUNTINFO = """\
27 1 {dev} / / rw,relatime - {fstype} /dev/vda rw,{options}
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683784k
"""


# (the real function: the fixture above replaces the module's attribute)
shares_flush = writeback.shares_flush
# /proc/fs/ext4/DEV/options: one option per line, defaults included.
EXT4_DEFAULTS = "\n".join(["rw", "bsddf", "delalloc", "barrier", "auto_da_alloc", "user_xattr", "acl",
                            "data=ordered"]) + "\n"


@pytest.mark.parametrize("fstype, options, defaults, shared", [
    ("ext4", "discard", EXT4_DEFAULTS, True),
    ("ext3", "", EXT4_DEFAULTS, True),
    ("ext4", "data=journal", EXT4_DEFAULTS, False),
    ("ext4", "", EXT4_DEFAULTS.replace("data=ordered", "data=journal"), False),  # (tune2fs -o journal_data)
    ("ext4", "", EXT4_DEFAULTS.replace("barrier", "nobarrier"), False),  # (tune2fs -o nobarrier)
    ("ext4", "", EXT4_DEFAULTS + "dax=always\n", False),
    ("ext4", "discard", "", False),  # (the options could not be read: a default may hide)
    ("xfs", "attr2,inode64", "", False),  # (reflinks: an overwrite may be a copy)
    ("btrfs", "ssd,space_cache=v2", "", False),
    ("tmpfs", "size=1k", "", False),
])
def test_the_file_systems_whose_flush_is_shared(tmp_path, fstype, options, defaults, shared):
    dev = os.stat(tmp_path).st_dev
    info = MOUNTINFO.format(dev=f"{os.major(dev)}:{os.minor(dev)}", fstype=fstype, options=options)
    flags = array.array("i", [0])
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x80086601, flags, True)  # FS_IOC_GETFLAGS
    except OSError:
        pytest.skip("the test's file system has no inode flags")
    finally:
        os.close(fd)
    if flags[0] & 0x02004000:
        pytest.skip("the test's directory has journalled data or DAX")
    assert shares_flush(str(tmp_path), str(tmp_path), info, defaults) is shared


def test_no_shared_flush_across_devices_or_for_an_unknown_mount(tmp_path):
    dev = os.stat(tmp_path).st_dev
    info = MOUNTINFO.format(dev=f"{os.major(dev)}:{os.minor(dev)}", fstype="ext4", options="discard")
    assert not shares_flush(str(tmp_path), str(tmp_path), MOUNTINFO.format(dev="0:0", fstype="ext4", options=""),
                            EXT4_DEFAULTS)
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != dev:
        assert not shares_flush(str(tmp_path), "/dev/shm", info, EXT4_DEFAULTS)


def test_this_machines_file_system(tmp_path):
    """The real answer for the tests' directory: yes on ext2/3/4 with the
    usual options (as on the machines these tests run on), no on tmpfs."""
    with open("/proc/self/mountinfo") as f:
        fstype = writeback._mount_of(os.stat(tmp_path).st_dev, f.read())
    if fstype is None or fstype[0] not in ("ext4", "tmpfs"):
        pytest.skip(f"tmp_path is on {fstype}")
    if fstype[0] == "ext4":  # (read from /proc/fs/ext4, the device found through /sys/dev/block)
        assert "barrier" in writeback._all_options(os.stat(tmp_path).st_dev).split()
    assert shares_flush(str(tmp_path), str(tmp_path)) is (fstype[0] == "ext4")


def test_a_spares_old_bytes_are_no_room_until_zeros_are_written_over_them(tmp_path):
    """A reused spare is written blocks, but not this store's: the room for
    bodies flushed by the WAL's sync is only what zeros written (and synced)
    over it made."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    s._segments.roll_bytes = 8 * LARGE
    try:
        for seq in range(1, 17):  # two segments; the first, whole and unreferenced, becomes the spare at the roll
            s.commit_insert([msg(seq, body=body(seq))])
            if seq == 8:
                s.delete(list(range(1, 9)))
                s.seal()
                s.commit()
        assert os.path.exists(os.path.join(tmp_path, SEGMENT_DIR, segments_module.SPARE_NAME))
        s.delete(list(range(9, 17)))
        s.seal()
        s.commit()
        s.commit_insert([msg(17, body=body(17))])  # the third segment is the spare, renamed
        assert s._segments._durable == LARGE + ZERO_AHEAD
        path = os.path.join(tmp_path, SEGMENT_DIR, segment_files(tmp_path)[-1])
        with open(path, "rb") as f:  # zeros after the first body, then the spare's old bytes (the first segment's)
            assert f.read(LARGE + ZERO_AHEAD + LARGE)[LARGE:] == bytes(ZERO_AHEAD) + body(1 + PER_FILL)
        for seq in range(18, 22):
            s.commit_insert([msg(seq, body=body(seq))])
        crcs = checksums(s)
        assert crcs[17] is None and crcs[21] is None  # (the first: a new directory entry; the fifth: past the zeros)
        assert all(crcs[seq] == zlib.crc32(body(seq)) for seq in range(18, 18 + PER_FILL - 1))
    finally:
        s.close()


def test_a_failed_write_of_a_lone_body_commits_nothing(tmp_path, monkeypatch):
    """pwrite fails on the path without a sync of its own: nothing is
    committed, and the next body goes to a new segment (as after a failed
    sync: the failed one's state is unknown)."""
    s = without_journal(SQLiteStore(str(tmp_path)))
    try:
        s.commit_insert([msg(1, body=body(1))])
        assert s._segments.fits_unsynced(LARGE)
        real = os.pwrite

        def failing(fd, data, off):
            raise OSError(5, "Input/output error (injected)")

        monkeypatch.setattr(segments_module.os, "pwrite", failing)
        with pytest.raises(Exception) as failed:
            s.commit_insert([msg(2, body=body(2))])
        assert "Input/output error" in str(failed.value)
        s.rollback()
        monkeypatch.setattr(segments_module.os, "pwrite", real)
        assert s.get(2) is None and s._segments._current is None
        s.commit_insert([msg(2, body=body(2))])
        assert len(segment_files(tmp_path)) == 2
        assert [m.body for m in s.get_many([1, 2])] == [body(1), body(2)]
    finally:
        s.close()
