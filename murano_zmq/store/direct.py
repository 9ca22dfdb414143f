"""Segment bodies written and read around the page cache (O_DIRECT).

On this VM kind every page the kernel hands out afresh costs the vCPU a
fault to its host on first touch (the guest reports free memory to the
host, which takes it back): a buffered write of a body copies it into
such pages, and a buffered read of bytes the device wrote copies out of
them.  With pipelined 64 KiB sends that copy was 73 % of the relay's CPU
(perf, docs/performance.md "Session 19").  Direct I/O moves the bytes
between the device and buffers the relay keeps and reuses, so nothing
faults.

DirectWriter writes a run of consecutive bodies: the bytes up to the first
ALIGN boundary through the file's usual descriptor, the rest through an
O_DIRECT one from an aligned buffer, the last block padded with zeros
(bytes past the run that no row references; the next body written there
overwrites them).  DirectReader reads bodies back in aligned reads of up
to CHUNK bytes, and the next AHEAD chunks of a segment in a thread of its
own while the relay loop delivers what it has.  Both are only used where the
file system takes O_DIRECT (open_direct); elsewhere segments stay buffered.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections import deque
from typing import Callable

log = logging.getLogger("murano_zmq.store")

__all__ = ["ALIGN", "AHEAD", "CHUNK", "WRITE_CHUNK", "DirectReader", "DirectWriter", "aligned_up", "open_direct",
           "pwrite_all"]

# Offsets, lengths and buffer addresses of direct I/O are multiples of
# this (ext4's block size; a device's logical block is 512 or 4096).
ALIGN = 4096
# The most one direct write moves (the device's largest request here,
# /sys/block/vda/queue/max_sectors_kb, is 4 MiB): DirectWriter keeps a
# buffer of up to this size.
WRITE_CHUNK = 8 << 20
# The size of a read, and how many are read ahead of the caller, in order:
# smaller reads let the caller go on sooner (a Node consumer acking one
# message at a time read a 64 KiB backlog at 16,700-18,900 msg/s with 2 MiB
# x 8, 14,700-16,700 with 8 MiB x 3; docs/performance.md, "Session 19").
CHUNK = 2 << 20
AHEAD = 8


def aligned_up(n: int) -> int:
    return (n + ALIGN - 1) & -ALIGN


def open_direct(path: str, flags: int) -> int | None:
    """An O_DIRECT descriptor of `path`, or None where the platform or
    the file system has no direct I/O (then the caller stays buffered)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, flags | direct | os.O_CLOEXEC)
    except OSError:
        return None


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset` (a short write on a filling disk:
    the next one raises ENOSPC)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pwrite_direct(dfd: int, view: memoryview, offset: int) -> None:
    """One direct write of all of `view`; a short one is a full disk (the
    rest, no longer aligned, would fail with EINVAL instead)."""
    if os.pwrite(dfd, view, offset) != len(view):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class DirectWriter:
    """Writes runs of bodies for one writer thread at a time (the store's
    commit lock); keeps one aligned buffer of up to WRITE_CHUNK bytes."""

    def __init__(self):
        self._buf: mmap.mmap | None = None

    def _buffer(self, size: int) -> mmap.mmap:
        if self._buf is None or len(self._buf) < size:
            self.close()
            self._buf = mmap.mmap(-1, aligned_up(size))  # (page-aligned, zero-filled)
        return self._buf

    def write(self, fd: int, dfd: int, start: int, bodies: list) -> int:
        """Write `bodies`, consecutive from file offset `start`: the bytes
        before the first ALIGN boundary through `fd` (buffered), the rest
        through `dfd` (O_DIRECT).  Returns the end of what was written,
        the padding included."""
        views = [memoryview(b) for b in bodies]
        end = start + sum(map(len, views))
        pos = start
        head = min(aligned_up(start), end) - start
        while head:
            first = views[0]
            n = min(head, len(first))
            pwrite_all(fd, first[:n], pos)
            pos += n
            head -= n
            if n == len(first):
                views.pop(0)
            else:
                views[0] = first[n:]
        if pos == end:
            return end
        buf = self._buffer(min(aligned_up(end - pos), WRITE_CHUNK))
        space = memoryview(buf)
        try:
            cap, fill = len(buf), 0
            for view in views:
                while view:
                    n = min(len(view), cap - fill)
                    space[fill:fill + n] = view[:n]
                    fill += n
                    view = view[n:]
                    if fill == cap:
                        _pwrite_direct(dfd, space, pos)
                        pos, fill = pos + cap, 0
            if fill:
                padded = aligned_up(fill)
                space[fill:padded] = bytes(padded - fill)
                last = space[:padded]
                try:
                    _pwrite_direct(dfd, last, pos)
                finally:
                    last.release()  # (else a failed write's traceback keeps the buffer exported)
                pos += padded
        finally:
            space.release()
        return pos

    def close(self) -> None:
        if self._buf is not None:
            try:
                self._buf.close()
            except BufferError:  # (a view of it still lives somewhere: the collector frees it)
                pass
            self._buf = None


class _Chunk:
    """CHUNK bytes (or fewer) of one segment from `base`, read into `buf`."""

    __slots__ = ("seg", "base", "want", "end", "buf", "done")

    def __init__(self, seg: int, base: int, limit: int, buf: mmap.mmap):
        self.seg, self.base, self.buf = seg, base, buf
        self.want = min(base + CHUNK, limit)  # what the read asks for
        self.end = base  # what it got, once done
        self.done = False

    def covers(self, seg: int, start: int, end: int) -> bool:
        return seg == self.seg and self.base <= start and end <= self.end


class DirectReader:
    """Reads bodies for one caller at a time (Segments' lock), a chunk at a
    time, and the next AHEAD chunks of the segments it reads (in a thread
    of its own) while the caller delivers what it has.

    `path_of(seg)`: the segment's file.  `readable(seg)`: how far `seg`
    holds bytes no write changes any more (synced before their rows'
    commit): a read never reaches past it, so a body written later is
    never served from an older read."""

    def __init__(self, path_of: Callable[[int], str], readable: Callable[[int], int]):
        self._path_of, self._readable = path_of, readable
        self._fds: dict[int, int] = {}  # seg -> O_DIRECT descriptor
        self._cond = threading.Condition()  # guards _jobs; the thread says `done` under it
        self._jobs: deque[tuple[_Chunk, int]] = deque()  # for the thread: (chunk, fd), in order
        self._ahead: deque[_Chunk] = deque()  # read or being read by the thread, not used yet
        self._last: _Chunk | None = None  # what the last read() served from
        self._spare: list[mmap.mmap] = []  # buffers no chunk holds
        self._thread: threading.Thread | None = None
        self._closed = False
        self._prev: tuple[int, int] = (-1, 0)  # the segment and end of the last read
        self._streaming = False  # ... which went on where the one before ended (or was long)

    @staticmethod
    def longest() -> int:
        """The most bytes one read() takes (a longer run is read buffered)."""
        return CHUNK - ALIGN

    def read(self, seg: int, start: int, end: int) -> list[tuple[memoryview, int]] | None:
        """Bytes start..end of `seg`, as views (valid until the next call)
        that hold them in order, each with the file offset of its first
        byte; None if they cannot be read this way (the caller reads them
        buffered).  Chunks read ahead follow each other, so a body may
        begin in one and end in the next."""
        if self._closed:
            return None
        prev_seg, prev_end = self._prev
        self._streaming = (seg == prev_seg and 0 <= start - prev_end <= CHUNK // 4) or end - start >= CHUNK // 8
        self._prev = (seg, end)
        pieces = self._in_hand(seg, start, end)
        if pieces is None:
            self._drop_ahead()  # elsewhere than read ahead: what it read is of no use
            fd, limit = self._fd(seg), self._readable(seg)
            if fd is None or end > limit or end - start > self.longest():
                return None
            chunk = _Chunk(seg, start & -ALIGN, min(limit, aligned_up(end)), self._buffer())
            failed = self._fill(chunk, fd)
            chunk.done = True
            self._use(chunk)
            if failed is not None and failed.errno == errno.EINVAL:
                log.warning("segment files are read through the page cache: direct reads fail (%s)",
                            failed.strerror)
                self.close()
            if not chunk.covers(seg, start, end):
                return None
            pieces = [chunk]
        return [(memoryview(chunk.buf)[:chunk.end - chunk.base], chunk.base) for chunk in pieces]

    def _in_hand(self, seg: int, start: int, end: int) -> list[_Chunk] | None:
        """The chunks, the last one read and those read ahead after it
        (waited for), that hold start..end; None if they do not."""
        chain = [self._last, *self._ahead] if self._last is not None else list(self._ahead)
        first = next((i for i, c in enumerate(chain) if c.seg == seg and c.base <= start < c.want), None)
        if first is None:
            return None
        pieces, pos = [], start
        for chunk in chain[first:]:
            if chunk.seg != seg or chunk.base > pos:
                return None
            if chunk is not self._last:
                self._done(chunk)
            if chunk.end <= pos:
                return None  # (cut short: the file's end, or an error)
            pieces.append(chunk)
            pos = chunk.end
            if pos >= end:
                break
        else:
            return None
        # In hand: the chunks before the last of them are done with.
        used = chain.index(pieces[-1]) + (0 if self._last is not None else 1)
        for _ in range(used):
            self._use(self._ahead.popleft())
        return pieces

    def read_ahead(self, seg: int, pos: int) -> None:
        """The caller read `seg` up to `pos`: read on from there meanwhile
        (into the next segment at the end of this one), AHEAD chunks, if
        the caller reads on where it stopped (else chunks read ahead would
        mostly hold other mailboxes' bodies)."""
        if not self._streaming:
            return
        tail = self._ahead[-1] if self._ahead else self._last
        if tail is not None and tail.seg == seg and tail.base <= pos <= tail.want:
            seg, pos = tail.seg, tail.want  # (read on from what is read or asked for)
        elif self._ahead:
            return  # (what the thread reads is elsewhere: read() drops it if unused)
        while len(self._ahead) < AHEAD and not self._closed:
            limit = self._readable(seg)
            if limit <= pos:
                seg, pos = seg + 1, 0  # (read to its end: the next one, mostly the same mailbox's)
                limit = self._readable(seg)
            if limit - pos < CHUNK // 4:
                return  # little there: bodies just written, read when asked
            fd = self._fd(seg)
            if fd is None:
                return
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="relay-read-ahead", daemon=True)
                thread.start()  # (before any chunk waits for it)
                self._thread = thread
            chunk = _Chunk(seg, pos & -ALIGN, limit, self._buffer())
            with self._cond:
                self._jobs.append((chunk, fd))
                self._cond.notify_all()
            self._ahead.append(chunk)
            pos = chunk.want

    def forget(self, seg: int) -> None:
        """`seg` is being deleted: close its descriptor (once no read uses it)."""
        if any(chunk.seg == seg for chunk in self._ahead):
            self._drop_ahead()
        if self._last is not None and self._last.seg == seg:
            self._free(self._last)
            self._last = None
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """No more reads (each read() returns None from now on)."""
        self._drop_ahead()  # (waits for the chunk being read, if any)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._last is not None:
            self._free(self._last)
            self._last = None
        for buf in self._spare:
            try:
                buf.close()
            except BufferError:  # (a view of it still held: the collector frees it)
                pass
        self._spare.clear()

    def _fd(self, seg: int) -> int | None:
        fd = self._fds.get(seg)
        if fd is None:
            fd = open_direct(self._path_of(seg), os.O_RDONLY)  # (None: no such file, or no direct I/O)
            if fd is not None:
                self._fds[seg] = fd
        return fd

    def _buffer(self) -> mmap.mmap:
        # Kept and reused: a buffer touched once faults no more.
        return self._spare.pop() if self._spare else mmap.mmap(-1, CHUNK)

    def _free(self, chunk: _Chunk) -> None:
        self._spare.append(chunk.buf)

    def _use(self, chunk: _Chunk) -> None:
        if self._last is not None:
            self._free(self._last)
        self._last = chunk

    def _done(self, chunk: _Chunk, cancel: bool = False) -> _Chunk:
        """The chunk, once the thread has read it (its buffer is free to
        reuse then); cancel: or not read, if the thread has not begun it."""
        with self._cond:
            if cancel and not chunk.done:
                for job in self._jobs:
                    if job[0] is chunk:
                        self._jobs.remove(job)  # (not begun: it never will be)
                        chunk.done = True
                        break
            while not chunk.done:
                self._cond.wait()
        return chunk

    def _drop_ahead(self) -> None:
        while self._ahead:
            self._free(self._done(self._ahead.pop(), cancel=True))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                chunk, fd = self._jobs.popleft()
            try:
                self._fill(chunk, fd)
            finally:  # (whatever happened, no one waits for it forever: an empty chunk is read buffered)
                with self._cond:
                    chunk.done = True
                    self._cond.notify_all()

    @staticmethod
    def _fill(chunk: _Chunk, fd: int) -> OSError | None:
        """Read the chunk's bytes (fewer at the file's end; none on an
        error, returned: the caller then reads buffered, and says what
        failed)."""
        view = memoryview(chunk.buf)
        failed = None
        try:
            got = os.preadv(fd, [view[:aligned_up(chunk.want - chunk.base)]], chunk.base)
        except OSError as exc:
            got, failed = 0, exc
        finally:
            view.release()
        chunk.end = chunk.base + min(got, chunk.want - chunk.base)
        return failed
