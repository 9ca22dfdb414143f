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
flush of the whole device: ext2/3/4 with barriers, without data=journal or
DAX (as a mount option, the file system's default, or the directory's
flag), with the segments on the same device as the database.  Elsewhere
the bodies get their own sync as before: XFS and btrfs may copy a shared
extent on write (reflinks), whose remapping the WAL's flush does not
commit; tmpfs has no device.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import logging
import os
import struct

log = logging.getLogger("murano_zmq.store")

__all__ = ["start_write", "wait_written", "shares_flush"]

# sync_file_range(2)'s flags.
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4

# File systems that write over a file's written blocks in place (no
# reflinks) and whose fdatasync ends with a flush of the device's cache.
_IN_PLACE = {"ext2", "ext3", "ext4"}
# ...unless one of these options is on.
_REFUSED_OPTIONS = {"data=journal", "nobarrier", "barrier=0", "dax", "dax=always", "dax=inode"}
# A directory's inode flags (FS_IOC_GETFLAGS) its new files inherit:
# journalled data, DAX.
_FS_IOC_GETFLAGS = 0x80006601 | struct.calcsize("l") << 16  # _IOR('f', 1, long)
_REFUSED_FLAGS = 0x00004000 | 0x02000000


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
    """Start writing these bytes' dirty pages to the device (no wait; a
    hint: nothing where the C library has no sync_file_range)."""
    if _sync_file_range is not None:
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


def _all_options(dev: int) -> str:
    """Every option of the ext4 driver's mount of `dev`, defaults included
    (mountinfo leaves out those the superblock sets), one per line; "" if
    they cannot be read."""
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    try:
        with open(f"/proc/fs/ext4/{name}/options") as f:
            return f.read()
    except OSError:
        return ""


def shares_flush(segment_dir: str, db_dir: str, mountinfo: str | None = None,
                 fs_options: str | None = None) -> bool:
    """Can a body written in `segment_dir` be made durable by the flush of
    an fdatasync in `db_dir`?  (See the module's text.)  mountinfo,
    fs_options: /proc/self/mountinfo's text and the file system's options
    (/proc/fs/ext4/DEV/options), for tests."""
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
    if mount is None or mount[0] not in _IN_PLACE:
        return False
    all_options = set((_all_options(dev) if fs_options is None else fs_options).split())
    if "barrier" not in all_options:
        return False  # (options that cannot be read may hide a default of data=journal or nobarrier)
    if (set(mount[1].split(",")) | all_options) & _REFUSED_OPTIONS:
        return False
    try:
        fd = os.open(segment_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        start_write(fd, 0, 0)  # (a sandbox may refuse the call itself)
    except OSError:
        return False
    finally:
        os.close(fd)
    return not flags[0] & _REFUSED_FLAGS
