"""Large message bodies in append-only segment files, beside SQLite.

SQLite in WAL mode writes a body twice (into the WAL, then into the
database at checkpoint) and checksums every WAL page of it.  A body of at
least THRESHOLD bytes goes instead to the end of DATA_DIR/segments/N.seg,
and its row keeps (segment, offset, length).  The order that keeps the
contract: a commit writes its bodies, fdatasyncs the segment files, and only
then commits the rows that point at them, so a committed row never points at
bytes that are not on disk.  A crash between the two leaves bytes no row
references: harmless, reclaimed with their segment.

A segment is written until it passes ROLL_BYTES, then a new one starts.  A
segment no committed row references, and which is not being written, is
deleted, or kept as the spare (SPARE_NAME) that the next segment reuses: an
fdatasync that extends a file also writes its new size and block map, one
that overwrites written blocks does not.  For the same reason a write past
what is written fills ZERO_AHEAD more with zeros.
The counts of referencing rows are rebuilt from the rows at start (each
start writes a new segment, so a torn tail is never appended to).

Where the file system takes O_DIRECT, a run of DIRECT_MIN bytes and up
(a batch's) is written around the page cache, and a consumer's reads of a
segment come in large aligned chunks, read ahead in a thread while it
delivers (store/direct.py): fresh page-cache pages cost this VM kind a
fault to its host each.

A lone commit's bodies that fit in what earlier syncs made durable may
instead be written without a sync of their own, made durable by the WAL's
(write_unsynced(), store/writeback.py).  A journaled lone send's body
(store/journal.py) is written after its CONFIRM, outside any transaction
(write_early()), and synced before the commit that writes its row: by a
thread (early_sync()) while the relay goes on, or by that commit.

Writes (append, sync, the commit hooks) run under the store's commit lock,
one writer at a time; reads come from the relay loop at any time.  append()
only places a body; sync() writes and syncs, so with a committer thread the
file I/O overlaps the relay loop's next turn instead of holding it up.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import zlib
from collections import Counter
from typing import Callable

from . import space, writeback
from .direct import ALIGN, DirectReader, DirectWriter, open_direct, pwrite_all

log = logging.getLogger("murano_zmq.store")

SEGMENT_DIR = "segments"
# Mode of a data directory the relay creates, and of its segment directory:
# the messages are for the relay's user alone (segment files are 0600).
PRIVATE_DIR = 0o700
SUFFIX = ".seg"
SPARE_NAME = "spare.seg-free"  # a retired segment, written over by the next one

# Bodies of this size and up go to segments.  Below it SQLite's double write
# costs less than a second fsync per commit (docs/performance.md, "64 KiB
# bodies: segment files").
THRESHOLD = 8 * 1024
ROLL_BYTES = 64 << 20
# Space past the last body written that a write smaller than this fills
# with zeros, when it passes what earlier writes filled: the next bodies'
# syncs then write over written blocks, and only every few lone sends' sync
# grows the file (and writes its new size and block map: 64 KiB appended
# and synced 153-214 µs here, written over 90-107 µs; docs/performance.md,
# "Session 18").  A write as large grows the file by as much anyway.
ZERO_AHEAD = 192 * 1024
_ZEROS = bytes(ZERO_AHEAD)
PAGE = os.sysconf("SC_PAGE_SIZE")

# A run of bodies this long and up is written around the page cache
# (store/direct.py); a shorter one, a lone send's mostly, is written into
# pages its last sync let go (sync(drop_cached=True)), which costs less.
DIRECT_MIN = 256 * 1024

# How many unreadable messages are logged one by one (then only counted).
LOG_LOST_MAX = 1000


def _cut(pieces: list[tuple[memoryview, int]], places: list[tuple[int, int, int]]) -> list[bytes]:
    """The bodies at `places` (in order) out of `pieces`, views of the
    bytes that hold them, in order, each with its first byte's offset."""
    out = []
    k, (view, base) = 0, pieces[0]
    for _, off, length in places:
        while off >= base + len(view):
            k += 1
            view, base = pieces[k]
        stop = off + length
        if stop <= base + len(view):
            out.append(bytes(view[off - base:stop - base]))
            continue
        parts = [view[off - base:]]  # (a body that goes on in the next piece)
        while stop > base + len(view):
            done = base + len(view)  # (the next piece may begin before it: from here on)
            k += 1
            view, base = pieces[k]
            parts.append(view[done - base:stop - base])
        out.append(b"".join(parts))
    for view, _ in pieces:
        view.release()
    return out


class SegmentFull(OSError):
    """A segment write or sync found the disk full (ENOSPC/EDQUOT).  Its text
    says so the way SQLite does, so the operator sees one cause."""


def _full(exc: OSError, path: str) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SegmentFull(exc.errno, f"database or disk is full: cannot write {path}: {exc.strerror}")
    return exc


def segment_number(name: str) -> int | None:
    """The segment a file of the segment directory is (NNN.seg), or None."""
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and "." + ext == SUFFIX and stem.isdigit() else None


def sync_path(path: str, flags: int, sync: Callable[[int], None]) -> None:
    """Open `path` read-only (with `flags`), `sync` it, close it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        sync(fd)
    finally:
        os.close(fd)


def _drop_cached(fd: int, start: int, end: int) -> None:
    """Let the kernel drop the whole pages of bytes start..end from its
    cache (it keeps a page the range covers only in part, which the next
    body's write shares: no read of it from the disk).  A hint: its
    failure changes nothing stored."""
    try:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


class EarlySync:
    """A sync of the bodies written early (Segments.early_sync()), run by a
    thread of the store's while the relay loop goes on: the sync of 16
    lone 64 KiB bodies took the loop ~250 µs, which the next lone send
    waited out (docs/performance.md, "Session 32").  Its descriptors share
    their open files with the store's, whose next sync would not see an
    error this one took: no other sync of the segments runs meanwhile
    (every write of the rows owed takes this one's outcome first)."""

    __slots__ = ("spans", "_fds")

    def __init__(self, spans: dict[int, tuple[int, int]], fds: dict[int, int]):
        self.spans = spans  # segment -> (start, end) of the bodies it syncs
        self._fds = fds  # segment -> a descriptor of this job's own

    def run(self) -> None:
        """fdatasync each segment, and let the kernel drop the bodies'
        pages (as sync(drop_cached=True)); raises the first OSError."""
        try:
            for seg, fd in self._fds.items():
                os.fdatasync(fd)
                _drop_cached(fd, *self.spans[seg])
        finally:
            self.close()

    def close(self) -> None:
        """Close this job's descriptors (run() does, at its end)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


class Segments:
    def __init__(self, data_dir: str, roll_bytes: int = ROLL_BYTES, flush_shared: bool | None = None):
        """flush_shared: may a lone commit's bodies be made durable by the
        WAL's flush (write_unsynced())?  None: where the file system allows
        (writeback.shares_flush)."""
        self.dir = os.path.join(data_dir, SEGMENT_DIR)
        self.roll_bytes = roll_bytes
        os.makedirs(self.dir, mode=PRIVATE_DIR, exist_ok=True)
        if flush_shared is None:
            flush_shared = writeback.shares_flush(self.dir, data_dir)
        self._flush_shared = flush_shared
        self._unsynced: tuple[int, int, int] | None = None  # (segment, start, end) of write_unsynced()
        self._lock = threading.Lock()  # the fd table, against reads from the loop
        self._fds: dict[int, int] = {}  # segment -> open fd
        self._live: Counter = Counter()  # segment -> committed rows referencing it
        self._pending: Counter = Counter()  # segment -> change in the open transaction
        self._current: int | None = None  # the segment being written
        self._end = 0  # its length: where the next body goes
        self._filled = 0  # ... and how far it is written (bodies, then zeros ahead: _zero_ahead)
        self._durable = 0  # ... and how far this store wrote and synced it: blocks with nothing left to allocate
        self._next = 1
        self._unwritten: list[tuple[int, int, bytes]] = []  # (segment, offset, body) placed, not written
        self._early: dict[int, tuple[int, int]] = {}  # segment -> (start, end) of write_early()'s bodies, no row yet
        self._early_failed = False  # ... and a write or sync failed since: their bytes are not to be trusted
        self._dirty: set[int] = set()  # written since the last sync
        self._dir_dirty = False  # a new file whose directory entry is not synced yet
        self._gone: set[int] = set()  # deleted by this store: a late read is of a deleted row
        self._lost_logged = 0
        # Direct I/O (store/direct.py), where the file system has it.
        self._direct = hasattr(os, "O_DIRECT")
        self._dfds: dict[int, int] = {}  # segment written here -> its O_DIRECT descriptor
        self._writer = DirectWriter()
        self._own: set[int] = set()  # segments this store created
        self._synced: dict[int, int] = {}  # ... how far each holds bodies synced
        self._sizes: dict[int, int] = {}  # an older segment -> its size (read ahead up to it)
        self._reader = DirectReader(self.path, self._readable) if self._direct else None

    def path(self, seg: int) -> str:
        return os.path.join(self.dir, f"{seg:012d}{SUFFIX}")

    # --- at start ---------------------------------------------------------------

    def on_disk(self) -> dict[int, int]:
        """segment -> file size, of the segment files in the directory."""
        found = {}
        for name in os.listdir(self.dir):
            seg = segment_number(name)
            if seg is not None:
                found[seg] = os.path.getsize(os.path.join(self.dir, name))
        return found

    def rewrite_if_whole(self, seg: int, off: int, length: int, crc: int) -> bool:
        """(at start, before start()) Are a segment's bytes off..off+length
        those whose CRC-32 is `crc`?  Then write them again: after a failed
        write-back the page cache may hold them clean and the disk not, and
        start() syncs the newest segment."""
        fd = os.open(self.path(seg), os.O_RDWR | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, off)
            if zlib.crc32(data) != crc:
                return False
            pwrite_all(fd, memoryview(data), off)
            return True
        finally:
            os.close(fd)

    def start(self, counts: dict[int, int], files: dict[int, int]) -> None:
        """Take the committed counts (segment -> rows); delete the files no
        row references (all their messages acked, or a crash's tail).  Sync
        the newest file left: the last commit's bodies may have been in the
        page cache only (write_unsynced(); the start-up checkpoint made their
        rows durable; see rewrite_if_whole())."""
        self._live = Counter({s: n for s, n in counts.items() if n > 0})
        self._next = max([*files, *counts, 0]) + 1
        for seg in files:
            if seg not in self._live:
                self._retire(seg)
        newest = max((seg for seg in self._live if seg in files), default=None)
        if newest is not None:
            sync_path(self.path(newest), 0, os.fdatasync)

    # --- writes (under the store's commit lock) ------------------------------------

    def append(self, body: bytes) -> tuple[int, int, int]:
        """Place `body` at the end of the current segment: (segment, offset,
        length).  Written and durable only after sync()."""
        if self._current is None or self._end >= self.roll_bytes:
            self._roll()
        seg, off = self._current, self._end
        self._unwritten.append((seg, off, body))
        self._end = off + len(body)
        self._pending[seg] += 1
        return seg, off, len(body)

    @property
    def unwritten(self) -> bool:
        """Are bodies placed that sync() has yet to write, or written early
        that it has yet to sync?"""
        return bool(self._unwritten) or bool(self._early) and (bool(self._dirty) or self._dir_dirty)

    def write_early(self, body: bytes) -> tuple[int, int, int]:
        """Write `body` at the end of the current segment now, outside any
        transaction, and start its write to the device: (segment, offset,
        length).  A journaled lone send's, after its CONFIRM (the journal
        holds it meanwhile), so that the commit of its row has only the
        sync left.  The transaction that inserts the row count()s it, and
        sync() makes it durable; until early_taken() its segment stays."""
        if self._unwritten:  # (not expected: the rows owed are written before anything is placed)
            raise OSError(errno.EBUSY, "bodies are placed for a transaction")
        if self._current is None or self._end >= self.roll_bytes:
            self._roll()
        seg, off = self._current, self._end
        fd = self._fds[seg]
        try:
            pwrite_all(fd, memoryview(body), off)
        except OSError as exc:
            self._current = None  # (as after a failed sync: the segment is written no more)
            if self._early:
                self._early_failed = True
            elif off == 0 and not self._live.get(seg) and not self._pending.get(seg):
                self._retire(seg)  # (just made for it: else every failing send would leave one)
            raise _full(exc, self.path(seg)) from None
        end = self._end = off + len(body)
        self._filled = max(self._filled, end)
        self._dirty.add(seg)
        start = self._early[seg][0] if seg in self._early else off
        self._early[seg] = (start, end)
        try:
            writeback.start_write(fd, off, len(body))
        except OSError:
            pass  # (a hint: sync() writes it, and reports a failure)
        return seg, off, len(body)

    def count(self, seg: int) -> None:
        """A row referencing `seg` (a body written early) is inserted in the open transaction."""
        self._pending[seg] += 1

    @property
    def early_failed(self) -> bool:
        """Did a write or sync fail since bodies were written early?  Then
        their bytes are not to be trusted (Linux reports a failed
        write-back once, and may keep the pages clean but unwritten)."""
        return self._early_failed

    def early_taken(self, kept: list[tuple[int, int, int]] = ()) -> None:
        """The rows of every body written early are committed, or will
        never point at them (their bodies go into the database), but for
        the bodies at `kept` (places), whose rows are still to come."""
        self._early.clear()
        for seg, off, length in kept:
            start, end = self._early.get(seg, (off, off + length))
            self._early[seg] = (min(start, off), max(end, off + length))
        if not kept:
            self._early_failed = False

    def early_sync(self) -> EarlySync | None:
        """(under the commit lock) The bodies written early and not synced
        yet, as a sync a thread may run while more are written: None where
        there are none, or a new file's directory entry wants its sync too
        (then sync(), as before)."""
        if self._dir_dirty or self._unwritten or self._early_failed:
            return None
        spans = {seg: span for seg, span in self._early.items() if seg in self._dirty and seg in self._fds}
        if not spans:
            return None
        fds: dict[int, int] = {}
        try:  # (its own descriptors: a segment retired meanwhile closes only the store's)
            for seg in spans:
                fds[seg] = os.dup(self._fds[seg])
        except OSError:
            for fd in fds.values():
                os.close(fd)
            return None
        return EarlySync(spans, fds)

    def early_synced(self, job: EarlySync, error: OSError | None) -> OSError | None:
        """(under the commit lock) `job` ran: its bodies are durable, or,
        after `error`, untrusted and the segment written no more, as after
        a failed sync(); then the error to raise."""
        if error is not None:
            self._current = None
            self._early_failed = True
            return _full(error, self.dir)
        for seg, (_, end) in job.spans.items():
            if seg not in self._fds:
                continue  # (retired meanwhile)
            self._synced[seg] = max(self._synced.get(seg, 0), end)
            if seg == self._current:
                self._durable = max(self._durable, end)
            if self._early.get(seg, (0, 0))[1] == end:  # (nothing written early since)
                self._dirty.discard(seg)
        return None

    def durable(self, place: tuple[int, int, int]) -> bool:
        """Is the body at `place` (segment, offset, length) synced?"""
        seg, off, length = place
        return off + length <= self._synced.get(seg, 0)

    def fits_unsynced(self, nbytes: int) -> bool:
        """Would bodies of `nbytes` placed next lie in the current segment,
        over blocks the last sync made durable (no size or block map to
        write), with nothing else written and not synced?  Then
        write_unsynced() may write them, and the WAL's flush make them
        durable.  (A run as long as DIRECT_MIN is a batch's: synced.)"""
        return (self._flush_shared and self._current is not None and not self._unwritten
                and not self._dirty and not self._dir_dirty and 0 < nbytes < DIRECT_MIN
                and self._end + nbytes <= min(self._durable, self.roll_bytes))

    def write_unsynced(self) -> None:
        """Write the bodies placed since fits_unsynced() said yes, and start
        their write to the device; the store calls wait_unsynced() after
        its COMMIT, then flushed() after the WAL's sync."""
        seg = self._current
        start, end = self._unwritten[0][1], self._end
        try:
            self._write_placed()
        except OSError:
            self._unwritten.clear()  # (as after a failed sync: the segment is written no more)
            self._current = None
            raise
        self._dirty.discard(seg)  # (made durable by the WAL's flush, not a sync of its own)
        self._unsynced = (seg, start, end)
        try:
            writeback.start_write(self._fds[seg], start, end - start)
        except OSError:
            pass  # (wait_unsynced() writes them, and reports a failure)

    @property
    def unsynced(self) -> bool:
        """Is a write of write_unsynced() waiting for wait_unsynced()/flushed()?"""
        return self._unsynced is not None

    def wait_unsynced(self) -> None:
        """Return once write_unsynced()'s bodies are on the device (not yet
        flushed): before the sync of the WAL that holds their rows begins.
        A failed write raises OSError, and the segment is written no more."""
        seg, start, end = self._unsynced
        try:
            writeback.wait_written(self._fds[seg], start, end - start)
        except OSError as exc:
            self._unsynced, self._current = None, None
            raise _full(exc, self.path(seg)) from None

    def flushed(self) -> None:
        """The WAL's sync after wait_unsynced() succeeded: the bodies are
        durable (readable from the file), their pages may go."""
        seg, start, end = self._unsynced
        self._unsynced = None
        self._synced[seg] = max(self._synced.get(seg, 0), end)
        fd = self._fds.get(seg)
        if fd is not None:
            _drop_cached(fd, start, end)

    def _write_placed(self) -> dict[int, tuple[int, int]]:
        """Write the bodies placed; segment -> (start, end) of the bodies written."""
        runs: dict[int, list[tuple[int, bytes]]] = {}
        for seg, off, body in self._unwritten:
            runs.setdefault(seg, []).append((off, body))
        written: dict[int, tuple[int, int]] = {}
        for seg, run in runs.items():
            start, end = run[0][0], run[-1][0] + len(run[-1][1])
            try:
                self._write_run(seg, run, start, end)
            except OSError as exc:
                raise _full(exc, self.path(seg)) from None
            self._dirty.add(seg)
            written[seg] = (start, end)
        self._unwritten.clear()
        return written

    def _write_run(self, seg: int, run: list[tuple[int, bytes]], start: int, end: int) -> None:
        """Write one segment's placed bodies (consecutive: append() placed them so)."""
        fd, dfd = self._fds[seg], self._dfds.get(seg)
        if dfd is not None and end - start >= DIRECT_MIN:
            try:
                self._writer.write(fd, dfd, start, [body for _, body in run])
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct(exc)  # and write it buffered
        for off, body in run:
            pwrite_all(fd, memoryview(body), off)

    def _no_direct(self, exc: OSError) -> None:
        """The file system refused a direct write: write buffered from now on."""
        log.warning("segment files are written through the page cache: %s refuses direct I/O (%s)",
                    self.dir, exc.strerror)
        self._direct = False
        for dfd in self._dfds.values():
            os.close(dfd)
        self._dfds.clear()
        with self._lock:
            if self._reader is not None:
                self._reader.close()

    def _zero_ahead(self, start: int, end: int) -> int:
        """The current segment's bodies were written from `start` to `end`:
        past them, fill ZERO_AHEAD bytes with zeros if earlier writes did
        not (synced with the bodies); how many were written.  A help, not a
        need: a disk with no room for them leaves them out (a real I/O
        error shows at the sync)."""
        filled = self._filled
        self._filled = max(filled, end)
        if end - start >= ZERO_AHEAD or end >= self.roll_bytes:
            return 0
        if end <= filled and not (self._flush_shared and end + ZERO_AHEAD > self._durable):
            return 0  # written blocks (a spare's), and no room for write_unsynced() wanted
        try:
            done = os.pwrite(self._fds[self._current], _ZEROS, end)
        except OSError:
            return 0
        self._filled = max(self._filled, end + done)
        return done

    def writable(self) -> bool:
        """Can a file be made and written in the segment directory now?  (A
        probe: a new segment would fail where it fails.)"""
        return space.space_available(self.dir, 1)

    def _roll(self) -> None:
        seg = self._next
        path = self.path(seg)
        try:
            if os.path.exists(self._spare):
                os.rename(self._spare, path)  # written over from its start
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _full(exc, path) from None
        try:
            filled = os.fstat(fd).st_size  # (the spare's: all of it)
        except OSError as exc:
            os.close(fd)
            raise _full(exc, path) from None
        self._own.add(seg)  # (first: a read of seg from now on stops at what is synced)
        self._next = seg + 1
        if self._direct:
            dfd = open_direct(path, os.O_WRONLY)
            if dfd is not None:
                self._dfds[seg] = dfd
        with self._lock:
            self._fds[seg] = fd
        self._current, self._end, self._filled, self._durable = seg, 0, filled, 0
        self._dir_dirty = True

    def release(self, seg: int, rows: int) -> None:
        """`rows` rows referencing `seg` are deleted in the open transaction."""
        self._pending[seg] -= rows

    def settled(self) -> bool:
        """Did the open transaction (now committed) change no segment's
        count of rows?  Then committed() deletes nothing, and the WAL's
        sync may come after it."""
        return not self._pending

    def holds_any(self) -> bool:
        """Might a stored row reference a segment?  (If not, deletes need no lookup.)"""
        return bool(self._live) or bool(self._pending)

    def sync(self, drop_cached: bool = False) -> None:
        """Write the bodies placed, fdatasync every segment written since
        the last sync (and the directory, for a new file): before the commit
        of the rows.  drop_cached: then let the kernel drop the pages of the
        bodies just written from its cache (a lone send's, which the relay
        delivers from memory while its mailbox's window holds it): the next
        body's write reuses them, where fresh pages cost this VM a fault to
        its host each (pwrite of 64 KiB 160 against 13 µs,
        docs/performance.md, "Session 18")."""
        try:
            written = self._write_placed()
            zeros = self._zero_ahead(*written[self._current]) if self._current in written else 0
            for seg, (start, end) in self._early.items():
                if seg in self._dirty:
                    at = written.get(seg)
                    written[seg] = (start, end) if at is None else (min(start, at[0]), max(end, at[1]))
            for seg in sorted(self._dirty):
                fd = self._fds.get(seg)
                if fd is not None:  # (None: retired since, after a failed sync)
                    os.fdatasync(fd)
                    if seg in written:
                        self._synced[seg] = max(self._synced.get(seg, 0), written[seg][1])
                        if seg == self._current:  # (the blocks of a spare's old bytes are not counted)
                            self._durable = max(self._durable, written[seg][1] + zeros)
                    if drop_cached and seg in written:
                        start, end = written[seg]
                        if zeros and seg == self._current:
                            if end % PAGE:  # the page the bodies end in stays
                                _drop_cached(fd, start, end)
                                start = end + PAGE - end % PAGE
                            end += zeros
                        _drop_cached(fd, start, end)
                self._dirty.discard(seg)
            if self._dir_dirty:
                sync_path(self.dir, os.O_DIRECTORY, os.fsync)
                self._dir_dirty = False
        except OSError as exc:
            # After a failed write or sync the file's state is unknown: write
            # on in a new segment (this one goes when no row references it).
            self._unwritten.clear()
            self._current = None
            if self._early:
                self._early_failed = True
            raise (exc if isinstance(exc, SegmentFull) else _full(exc, self.dir)) from None

    def committed(self) -> None:
        """The open transaction committed: its counts stand.  Segments no
        row references any more are deleted."""
        if not self._pending:
            return
        self._live.update(self._pending)
        self._pending.clear()
        for seg in [s for s, n in self._live.items() if n <= 0]:
            del self._live[seg]
            if seg != self._current and seg not in self._early:
                self._retire(seg)
        # A segment written before a roll and left with no rows goes too.
        with self._lock:  # read() (the relay loop) may open an old segment meanwhile
            stale = [s for s in self._fds if s != self._current and s not in self._live and s not in self._early]
        for seg in stale:
            self._retire(seg)

    def rolled_back(self) -> None:
        """The open transaction was undone: its bodies are bytes no row
        references (reclaimed with their segment)."""
        for seg, off, _ in self._unwritten:
            if seg == self._current:
                self._end = off  # placed, never written: the next body goes there
                break
        self._unwritten.clear()
        self._pending.clear()
        self._unsynced = None  # (written: bytes no row references)

    @property
    def _spare(self) -> str:
        return os.path.join(self.dir, SPARE_NAME)

    def _retire(self, seg: int) -> None:
        """No row references `seg`: keep it as the spare if it is a whole
        one and there is none, else delete it."""
        with self._lock:
            fd = self._fds.pop(seg, None)
            if fd is not None:
                os.close(fd)
            if self._reader is not None:
                self._reader.forget(seg)
            self._gone.add(seg)
        dfd = self._dfds.pop(seg, None)
        if dfd is not None:
            os.close(dfd)
        self._synced.pop(seg, None)
        self._sizes.pop(seg, None)
        self._dirty.discard(seg)
        path = self.path(seg)
        try:
            if os.path.getsize(path) >= self.roll_bytes and not os.path.exists(self._spare):
                os.rename(path, self._spare)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete segment %s: %s", path, exc)

    def drop_spare(self) -> None:
        """Give the spare's space back (the disk is full)."""
        try:
            os.unlink(self._spare)
        except OSError:  # (gone already; a directory it may not write)
            pass

    # --- reads ---------------------------------------------------------------------

    def _readable(self, seg: int) -> int:
        """How far `seg` holds bytes no write changes any more: what was
        synced of a segment this store writes, all of an older one (the
        last start's: never written again), nothing of one being deleted.
        (From the read-ahead, under _lock; the sets it reads change under
        it or, for _own, before the segment is written.)"""
        if seg in self._gone:
            return 0
        if seg in self._own or seg >= self._next:
            return self._synced.get(seg, 0)
        size = self._sizes.get(seg)
        if size is None:
            try:
                size = os.path.getsize(self.path(seg))
            except OSError:
                size = 0
            self._sizes[seg] = size
        return size

    def read_many(self, places: list[tuple[int, int, int]], what: Callable[[int], str]) -> list[bytes | None]:
        """The bodies at `places` [(seg, off, length)], in order; None for
        one that cannot be read (logged, naming what(i), as read() does).
        Bodies one after another in a segment are read together, around
        the page cache where it can (store/direct.py), and the rest of that
        segment is read ahead meanwhile."""
        reader = self._reader
        out: list[bytes | None] = []
        longest = reader.longest() if reader is not None else 0
        with self._lock:
            i, n = 0, len(places)
            while i < n:
                seg, start, length = places[i]
                end, j = start + length, i + 1
                while j < n and places[j][0] == seg and 0 <= places[j][1] - end < ALIGN \
                        and places[j][1] + places[j][2] - start <= longest:
                    end = places[j][1] + places[j][2]
                    j += 1
                pieces = reader.read(seg, start, end) if reader is not None and seg not in self._gone else None
                if pieces is None:
                    out += [self._read_locked(*places[k], what(k)) for k in range(i, j)]
                else:
                    out += _cut(pieces, places[i:j])
                i = j
            if reader is not None and n and places[-1][0] not in self._gone:
                reader.read_ahead(places[-1][0], places[-1][1] + places[-1][2])
        return out

    def read(self, seg: int, off: int, length: int, what: str) -> bytes | None:
        """The body at (seg, off, length), or None if it cannot be read
        (logged, naming `what`, unless its segment was deleted by this store:
        then the row was deleted under the reader)."""
        with self._lock:
            return self._read_locked(seg, off, length, what)

    def _read_locked(self, seg: int, off: int, length: int, what: str) -> bytes | None:
        fd = self._fds.get(seg)
        if fd is None:
            if seg in self._gone:
                return None
            try:
                fd = os.open(self.path(seg), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self._lost(what, f"{self.path(seg)}: {exc.strerror}")
                return None
            self._fds[seg] = fd
        try:
            data = os.pread(fd, length, off)
        except OSError as exc:
            self._lost(what, f"{self.path(seg)}: {exc.strerror}")
            return None
        if len(data) != length:
            self._lost(what, f"{self.path(seg)} ends before byte {off + length}")
            return None
        return data

    def _lost(self, what: str, why: str) -> None:
        self._lost_logged += 1
        if self._lost_logged <= LOG_LOST_MAX:
            log.error("the body of %s cannot be read (%s): it is not delivered", what, why)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._reader is not None:
                self._reader.close()
        for dfd in self._dfds.values():
            os.close(dfd)
        self._dfds.clear()
        self._writer.close()
