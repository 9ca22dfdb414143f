"""A lone commit's segment bodies flushed by the WAL's sync alone.

A commit with large bodies writes and fdatasyncs them, then COMMITs and
fdatasyncs the WAL: two device flushes, one after the other (a virtual
disk's flush is its host's fsync).  A lone send's body can share the
second one: it is written over blocks an earlier sync made durable (the
zeros segments.py writes ahead), so it needs no metadata, only its data on
the device before the WAL's flush.  sync_file_range() starts that write
before the COMMIT and waits for it after; the WAL's fdatasync then flushes
the device's cache, which holds both.  Saves 35-50 µs of a 64 KiB lone
send (docs/performance.md, "Session 20").

The price is the order: the WAL's frames may reach the disk before the
body does, so a crash in between can leave a row (never confirmed) whose
body is not there.  Such a row keeps its body's CRC-32 (seg_crc), and the
store checks the last commit's rows at start (store/sqlite.py).

This holds where an overwrite stays in place and an fdatasync ends with a
flush of the whole device: ext2/3/4 (but for data=journal) and XFS, with
the segments on the same device as the database.  Elsewhere (btrfs writes
elsewhere and needs its metadata; tmpfs has no device) the bodies get their
own sync as before.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("murano_zmq.store")

__all__ = ["start_write", "wait_written", "shares_flush"]

# sync_file_range(2)'s flags.
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4

# File systems whose fdatasync ends with a flush of the device's cache and
# which write over a file's written blocks in place.
_IN_PLACE = {"ext2", "ext3", "ext4", "xfs"}


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


def _call(fd: int, start: int, length: int, flags: int) -> None:
    if _sync_file_range(fd, start, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_write(fd: int, start: int, length: int) -> None:
    """Start writing these bytes' dirty pages to the device (no wait)."""
    _call(fd, start, length, _WRITE)


def wait_written(fd: int, start: int, length: int) -> None:
    """Return once these bytes are on the device (in its cache: a flush
    makes them durable); a failed write raises OSError."""
    _call(fd, start, length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)


def _mount_of(dev: int, mountinfo: str) -> tuple[str, str] | None:
    """(file system type, its options) of the mount of device `dev`."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) > 2 and fields[2] == wanted:
            parts = tail.split()
            return (parts[0], parts[2] if len(parts) > 2 else "")
    return None


def shares_flush(segment_dir: str, db_dir: str, mountinfo: str | None = None) -> bool:
    """Can a body written in `segment_dir` be made durable by the flush of
    an fdatasync in `db_dir`?  (See the module's text.)"""
    if _sync_file_range is None:
        return False
    try:
        dev = os.stat(segment_dir).st_dev
        if os.stat(db_dir).st_dev != dev:
            return False
        if mountinfo is None:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
    except OSError:
        return False
    mount = _mount_of(dev, mountinfo)
    if mount is None:
        return False
    fstype, options = mount
    return fstype in _IN_PLACE and "data=journal" not in options.split(",")
