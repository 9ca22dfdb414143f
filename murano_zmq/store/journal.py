"""The lone-send journal: a one-at-a-time send made durable by one synced
write, its SQLite row written after its CONFIRM left.

A lone send committed through SQLite costs BEGIN, the INSERT into the
table and its indexes, the COMMIT's WAL frames and the Python around them,
~45 µs, all before the fsync and so before the CONFIRM
(docs/performance.md, "Session 26").  Here the row is appended to a
preallocated file and fdatasynced (an overwrite of written blocks: no
metadata, one device flush, as the WAL's own), the CONFIRM goes out, and
the rows are then written into SQLite, OWED_ROWS at a time, by a
transaction that is not synced: the next synced commit, a checkpoint or
the journal's wrap makes them durable there.  A large body (a segment's,
store/segments.py) is in its record too: written to a segment after the
CONFIRM, it is synced before the transaction of its row (by a thread of
the store's, OWED_LARGE_ROWS bodies at a time, while the relay goes on),
so that the mark below never covers a row whose body is not on the disk.

What makes a crash safe: every such transaction also writes its top seq
as the `journal` mark in `meta`.  SQLite's recovery keeps a prefix of the
committed transactions, so after a crash the mark says which journal
records the database reflects (seq <= mark: present, or settled by a
later transaction that is durable too); a record above it is written again
at start (before anything reads the store).  Its ack cannot have been
durable either (a later transaction), so writing it again only delivers
again what a lost ack would (the contract's line 2): its seq is under the
relay's next boot_seq, so it goes out marked redelivered.

A journal belongs to one database: `meta` keeps a random id, and each
record's CRC covers it, so a journal left beside a new or restored
database (or copied from another data directory) reads as holding nothing.

The file is a ring of SIZE bytes: records from offset 0 on, each
[magic, length, seq, crc32] + msgpack payload, zero-padded to a multiple
of ALIGN bytes.  Where the file system takes it, a record is written with
O_DIRECT | O_DSYNC: one pwrite() that returns once it is on the device and
flushed, without the page cache's write-back that an fdatasync() waits
for (1 KiB records on this disk, p50 / p90: 41-50 / 48-61 µs against
50-78 / 87-104 µs; docs/performance.md, "Session 30"); elsewhere (tmpfs,
a file system refusing it) a pwrite() and an fdatasync().  Before the ring wraps,
the rows owed are written and the WAL is synced, so every record it
overwrites is reflected by a durable mark.  A scan reads every record
whose magic and CRC match, skipping bytes that do not (the torn tail of a
crash, the zeros of a new file, another database's records): a record is
written only after the one before it returned from its sync, so what
follows a torn one is the lap before's, under the mark; records above
the mark past unreadable bytes mean a damaged disk (read_records' gaps).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
import zlib

import msgpack

from .segments import sync_path

log = logging.getLogger(__name__)

__all__ = ["Journal", "FILE_NAME", "SIZE", "MAX_RECORD", "ALIGN", "OWED_ROWS", "OWED_LARGE_ROWS", "read_records", "check_file"]

FILE_NAME = "lone.journal"
# The ring: 4,096 lone sends of 1 KiB, or 240 of 64 KiB, between the WAL
# syncs that a wrap costs.  A wrap waits before a CONFIRM for the owed rows'
# write and the WAL's sync (~0.9 ms with 64 KiB bodies): with a 2 MiB ring
# that was one lone 64 KiB send in 30, the one-at-a-time p99 itself
# (docs/performance.md, "Session 31").  Written as zeros at the first
# start (~10 ms here) and read whole at each (~15 ms).
SIZE = 16 << 20
# The largest record (body and headers, and the rest of the row) the ring
# takes: larger bodies are written to a segment and synced, before their CONFIRM.
MAX_RECORD = 512 << 10
# Records start at multiples of this: a direct write's offset, length and
# buffer must be multiples of the device's logical block (512 or 4096
# bytes), and one smaller than the file system's block costs ext4 a lock
# and, over unwritten blocks, zeroing around it.
ALIGN = 4096
MAGIC = 0x4A5A4D31  # "1MZJ" little-endian
# Lone sends whose rows are written into the database in one transaction
# (SQLiteStore.write_owed): 1 KiB one-at-a-time sends through Node, p50 /
# p99, bench/lone_paths.py: one row a transaction 268-275 / 610-667 µs,
# 16 rows 227-230 / 396-406 µs (the floor relay 224-226 / 378-383 µs).
OWED_ROWS = 16
# ... and of lone sends whose bodies were written early into a segment
# (8 KiB and up): their segment's sync, in a thread, begins once this many
# are owed, and the first CONFIRM's turn after it ends writes their rows.
# Against 16, alternated: the 64 KiB one-at-a-time p99 927 against 1,036 µs,
# its p50 429 against 448; 4 rows gave a p50 of 495 against 465
# (docs/performance.md, "Session 32").
OWED_LARGE_ROWS = 8
ID_SIZE = 16
_HEADER = struct.Struct("<IIQI")  # magic, payload length, seq, crc32 of the database's id, the seq, the payload
_SEQ = struct.Struct("<Q")
_MAGIC_BYTES = MAGIC.to_bytes(4, "little")  # (what a scan past unreadable bytes looks for)
_SCAN_BUDGET = 64 << 20  # bytes such a scan checksums at most (~30 ms here)
_WRITE_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(ALIGN))

_pack = msgpack.Packer(use_bin_type=True).pack


def _crc(owner: bytes, seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq), zlib.crc32(owner)))


def check_file(path: str) -> str | None:
    """Why the relay cannot use `path` as its journal (a directory, a FIFO,
    a device, or a link to one), or None (a regular file, or none yet)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file: move it aside (it holds no lone send of this relay's)"
    return None


def read_records(path: str, owner: bytes, gaps: list | None = None,
                 mark: int = 0) -> list[tuple[int, list | None]]:
    """Every whole record of the database `owner` in the file: (seq,
    fields), in file order; [] if there is no file.  Unreadable bytes
    between records are skipped: a crash leaves at most the record it was
    writing torn, with only the lap before's records (their rows in the
    database) after it, but a damaged disk may leave records confirmed
    after the damage.  `gaps`: (offset, length, how many records came
    before it) of each such stretch followed by a record is added to it.
    `mark`: the fields of records whose seq is at most this are not
    unpacked (None): their rows are in the database."""
    try:
        with open(path, "rb") as f:
            size = min(SIZE, os.fstat(f.fileno()).st_size)
            if size == 0:
                return []
            # Read into pages of its own, not a bytes: the relay's heap
            # keeps what it frees (murano_zmq/heap.py), and 16 MiB would
            # stay.  (Not the file mapped: a read error would be a SIGBUS.)
            with mmap.mmap(-1, size) as data:
                f.readinto(data)  # (a file cut meanwhile leaves zeros: no record)
                return _scan(data, owner, gaps, mark)
    except FileNotFoundError:
        return []


def _scan(data, owner: bytes, gaps: list | None, mark: int) -> list[tuple[int, list | None]]:
    out, at = [], 0
    budget = [_SCAN_BUDGET]
    while True:
        found = _record_at(data, at, owner, mark=mark)
        if found is None and at % ALIGN:
            # Zeros pad a record to ALIGN (a journal written before them
            # has none: its next record was tried at `at`).
            padded = _aligned(at)
            if data[at:padded] == _ZEROS[:padded - at]:
                at = padded
                found = _record_at(data, at, owner, mark=mark)
        if found is None:
            after = _next_record(data, at + 1, owner, budget, mark)
            if after is None:
                return out
            if gaps is not None:
                gaps.append((at, after[0] - at, len(out)))
            found = after[1]  # (read there already)
        seq, fields, at = found
        out.append((seq, fields))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _record_at(data, at: int, owner: bytes, budget: list[int] | None = None,
               mark: int = 0) -> tuple[int, list | None, int] | None:
    """The record of `owner` at `at`: (seq, fields, where it ends), or None;
    fields None at or under `mark`.  `budget`: bytes a scan past
    unreadable ones may still checksum, less this one's."""
    if at + _HEADER.size > len(data):
        return None
    magic, length, seq, crc = _HEADER.unpack_from(data, at)
    end = at + _HEADER.size + length
    if budget is not None:
        # Each lookalike costs a block at least, so that their number is
        # bounded too; one longer than a record of this release's (it may
        # claim the rest of the ring) is not checksummed.
        if length > MAX_RECORD:
            budget[0] -= ALIGN
            return None
        budget[0] -= max(length, ALIGN)
    if magic != MAGIC or end > len(data):
        return None
    payload = data[at + _HEADER.size:end]
    if _crc(owner, seq, payload) != crc:
        return None
    if seq <= mark:
        return seq, None, end
    try:
        return seq, msgpack.unpackb(payload, raw=False), end
    except Exception:  # (a CRC match on bytes that are not ours: not expected)
        return None


def _next_record(data, start: int, owner: bytes, budget: list[int],
                 mark: int) -> tuple[int, tuple[int, list | None, int]] | None:
    """The first record of `owner` at or after `start`: where it begins,
    and what _record_at() read there.  A body may hold the magic, and look
    like records' headers, many times over: once `budget` is spent the
    scan gives up, and says so."""
    at = data.find(_MAGIC_BYTES, start)
    while at >= 0:
        if budget[0] <= 0:
            log.error("stopped looking for lone-send journal records past offset %d: too many lookalikes "
                      "of a record's start in the bytes there; sends confirmed in records after it, if any, "
                      "are not written in", start)
            return None
        found = _record_at(data, at, owner, budget, mark)
        if found is not None:
            return at, found
        at = data.find(_MAGIC_BYTES, at + 1)
    return None


class Journal:
    """The ring in DATA_DIR/FILE_NAME, its records the database `owner`'s.
    append() is called under the store's commit lock, one writer at a
    time."""

    def __init__(self, data_dir: str, owner: bytes):
        self.path = os.path.join(data_dir, FILE_NAME)
        self._owner = owner
        existed = os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = None
        try:
            size = os.fstat(fd).st_size
            if size < SIZE + ALIGN:
                # Written zeros, not a hole or fallocate()'s unwritten
                # extents: the first write over either changes the block
                # map, which an fdatasync then journals.  (The block past
                # the ring is where _open_direct() tries a direct write.)
                # An older relay's smaller ring grows here, once it is read.
                _fill_zeros(fd, SIZE + ALIGN)
                os.fsync(fd)
                sync_path(data_dir, os.O_DIRECTORY, os.fsync)
        except OSError as exc:
            try:
                if not existed:
                    os.unlink(self.path)
                elif size is not None:  # (one that was there may hold records: it stays as it was)
                    os.ftruncate(fd, size)
            except OSError as undo:  # (the first error is the one to act on: a full disk, say)
                log.warning("%s: could not undo a failed start of the lone-send journal (%s)", self.path, undo)
            finally:
                os.close(fd)
            raise exc
        self._fd = fd
        self._direct_fd = _open_direct(self.path)
        try:
            self._buffer = mmap.mmap(-1, 16 * ALIGN)  # (page-aligned, as a direct write's must be)
        except BaseException:
            self._close_fds()
            raise
        self._view = memoryview(self._buffer)
        self._head = 0  # where the next record goes: the ring's start (its records are in the database)

    @property
    def direct(self) -> bool:
        """Are records written with O_DIRECT | O_DSYNC (else write + fdatasync)?"""
        return self._direct_fd is not None

    def records(self) -> list[tuple[int, list]]:
        return read_records(self.path, self._owner)

    @staticmethod
    def fits(nbytes: int) -> bool:
        """Can a record whose body and headers come to `nbytes` go in the journal at all?"""
        return nbytes + 4096 <= min(MAX_RECORD, SIZE // 4)

    def record(self, seq: int, fields: list) -> tuple[bytes, bytes]:
        """The record of `fields`: its header and payload."""
        payload = _pack(fields)
        return _HEADER.pack(MAGIC, len(payload), seq, _crc(self._owner, seq, payload)), payload

    def room(self, record: tuple[bytes, bytes]) -> bool:
        """Does `record` fit before the ring's end?  If not, the caller
        makes every record written so far reflected by a durable mark (a
        sync of the WAL), then wrap()s."""
        return self._head + _aligned(len(record[0]) + len(record[1])) <= SIZE

    def wrap(self) -> None:
        self._head = 0

    def append(self, record: tuple[bytes, bytes]) -> None:
        """Write one record, padded, where the last ended: durable when
        this returns.  An OSError leaves the journal unusable."""
        header, payload = record
        size = len(header) + len(payload)
        padded = _aligned(size)
        if padded > len(self._buffer):
            self._drop_buffer()
            self._buffer = mmap.mmap(-1, padded)
            self._view = memoryview(self._buffer)
        view = self._view
        view[:len(header)] = header
        view[len(header):size] = payload
        view[size:padded] = _ZEROS[:padded - size]
        if self._direct_fd is not None:
            try:
                written = os.pwrite(self._direct_fd, view[:padded], self._head)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # (refused before any I/O: an alignment this device or file system will not take)
                _say_buffered(self.path, "direct writes", exc.strerror)  # (not exc: its traceback holds a view)
                os.close(self._direct_fd)
                self._direct_fd = None
        if self._direct_fd is None:
            written = os.pwrite(self._fd, view[:padded], self._head)
            if written == padded:
                os.fdatasync(self._fd)
        if written != padded:
            raise OSError(errno.EIO, f"short write to {self.path}")
        self._head += padded

    def close(self) -> None:
        try:
            self._close_fds()
        finally:
            self._drop_buffer()

    def _close_fds(self) -> None:
        fds, self._fd, self._direct_fd = (self._fd, self._direct_fd), -1, None
        try:
            if fds[0] >= 0:
                os.close(fds[0])
        finally:
            if fds[1] is not None:
                os.close(fds[1])

    def _drop_buffer(self) -> None:
        self._view.release()
        try:
            self._buffer.close()
        except BufferError:  # (a view of it still held, by a failure's traceback: unmapped with the last)
            pass


def _open_direct(path: str) -> int | None:
    """A descriptor of `path` that writes with O_DIRECT | O_DSYNC, or None
    where the file system will not open it so (tmpfs before Linux 6.6, ...)
    or fails a direct write of zeros to the block past the ring (some FUSE
    and network file systems take the flag and refuse the writes): there a
    first lone send's would be a failed sync, and stop the relay."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    except (OSError, AttributeError) as exc:  # (AttributeError: no O_DIRECT on this platform)
        _say_buffered(path, "O_DIRECT", exc)
        return None
    try:
        with mmap.mmap(-1, ALIGN) as zeros:
            if os.pwrite(fd, zeros, SIZE) != ALIGN:
                raise OSError(errno.EIO, "short write")
    except OSError as exc:
        os.close(fd)
        _say_buffered(path, "direct writes", exc.strerror)
        return None
    return fd


def _say_buffered(path: str, refused: str, why) -> None:
    log.info("lone-send journal written through the page cache: %s refuses %s (%s)", path, refused, why)


def _fill_zeros(fd: int, size: int) -> None:
    zeros = bytes(_WRITE_CHUNK)
    at = os.fstat(fd).st_size
    while at < size:
        at += os.pwrite(fd, zeros[:min(_WRITE_CHUNK, size - at)], at)
