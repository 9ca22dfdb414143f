"""The lone-send journal: a one-at-a-time send made durable by one small
write and one fdatasync, its SQLite row written after its CONFIRM left.

A lone send committed through SQLite costs BEGIN, the INSERT into the
table and its indexes, the COMMIT's WAL frames and the Python around them,
~45 µs, all before the fsync and so before the CONFIRM
(docs/performance.md, "Session 26").  Here the row is appended to a
preallocated file and fdatasynced (an overwrite of written blocks: no
metadata, one device flush, as the WAL's own), the CONFIRM goes out, and
the row is then written into SQLite by a transaction that is not synced:
the next synced commit, a checkpoint or the journal's wrap makes it
durable there.  Its cost overlaps the sender's next round trip.

What makes a crash safe: every such transaction also writes its top seq
as the `journal` mark in `meta`.  SQLite's recovery keeps a prefix of the
committed transactions, so after a crash the mark says which journal
records the database reflects (seq <= mark: present, or settled by a
later transaction that is durable too); a record above it is written again
at start (replay(), in seq order, before anything reads the store).  Its
ack cannot have been durable either (a later transaction), so replaying
only delivers again what a lost ack would (the contract's line 2): the
record's seqs are under the relay's next boot_seq, so it goes out marked
redelivered.

The file is a ring of SIZE bytes: records from offset 0 on, each
[magic, length, seq, crc32] + msgpack payload.  Before the ring wraps,
the WAL is synced, so every record it overwrites is reflected by a durable
mark.  A scan stops at the first record whose magic or CRC does not match
(the torn tail of a crash, or the zeros of a new file): a record is
written only after the one before it returned from its sync.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
import msgpack

__all__ = ["Journal", "FILE_NAME", "SIZE", "OWED_ROWS"]

FILE_NAME = "lone.journal"
SIZE = 2 << 20  # ~1,800 lone sends of 1 KiB between the WAL syncs that a wrap costs
MAGIC = 0x4A5A4D31  # "1MZJ" little-endian
# Lone sends whose rows are written into the database in one transaction
# (SQLiteStore.write_owed): 1 KiB one-at-a-time sends through Node, p50 /
# p99, bench/lone_paths.py: one row a transaction 268-275 / 610-667 µs,
# 16 rows 227-230 / 396-406 µs (the floor relay 224-226 / 378-383 µs).
OWED_ROWS = 16
_HEADER = struct.Struct("<IIQI")  # magic, payload length, seq, crc32 of the seq and the payload
_SEQ = struct.Struct("<Q")
_WRITE_CHUNK = 1 << 20

_pack = msgpack.Packer(use_bin_type=True).pack


class Journal:
    """The ring in DATA_DIR/FILE_NAME.  append() is called under the
    store's commit lock, one writer at a time."""

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, FILE_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                # (a short file holds no record: records follow the fill's sync)
                _fill_zeros(fd, SIZE)
                os.fsync(fd)
                _sync_dir(data_dir)
        except OSError:
            os.close(fd)
            if os.path.getsize(self.path) < SIZE:
                os.unlink(self.path)
            raise
        self._fd = fd
        self._head = 0  # where the next record goes

    def records(self) -> list[tuple[int, list]]:
        """Every whole record from the ring's start: (seq, fields), in the
        order written."""
        data = os.pread(self._fd, SIZE, 0)
        out, at = [], 0
        while at + _HEADER.size <= len(data):
            magic, length, seq, crc = _HEADER.unpack_from(data, at)
            end = at + _HEADER.size + length
            if magic != MAGIC or end > len(data):
                break
            payload = data[at + _HEADER.size:end]
            if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
                break
            try:
                fields = msgpack.unpackb(payload, raw=False)
            except Exception:  # (a CRC match on bytes that are not ours: not expected)
                break
            out.append((seq, fields))
            at = end
        return out

    @staticmethod
    def fits(nbytes: int) -> bool:
        """Can a record with a body of `nbytes` go in the journal at all?"""
        return nbytes + 4096 <= SIZE // 4

    @staticmethod
    def record(seq: int, fields: list) -> bytes:
        payload = _pack(fields)
        return _HEADER.pack(MAGIC, len(payload), seq, zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))) + payload

    def room(self, record: bytes) -> bool:
        """Does `record` fit before the ring's end?  If not, the caller
        makes every record written so far reflected by a durable mark (a
        sync of the WAL), then wrap()s."""
        return self._head + len(record) <= SIZE

    def wrap(self) -> None:
        self._head = 0

    def append(self, record: bytes) -> None:
        """Write one record where the last ended and fdatasync it: durable
        when this returns.  An OSError leaves the journal unusable."""
        written = os.pwrite(self._fd, record, self._head)
        if written != len(record):
            raise OSError(errno.EIO, f"short write to {self.path}")
        os.fdatasync(self._fd)
        self._head += len(record)

    def restart(self) -> None:
        """(at start, once the records are reflected by a durable mark) Write from the start again."""
        self._head = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fill_zeros(fd: int, size: int) -> None:
    """Written zeros, not a hole or fallocate()'s unwritten extents: the
    first write over either changes the block map, which an fdatasync
    then journals."""
    zeros = bytes(_WRITE_CHUNK)
    at = os.fstat(fd).st_size
    while at < size:
        at += os.pwrite(fd, zeros[:min(_WRITE_CHUNK, size - at)], at)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
