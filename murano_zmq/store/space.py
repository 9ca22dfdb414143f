"""Disk space for a relay whose disk fills: a probe, and a reserve.

The reserve (DATA_DIR/relay.reserve, RESERVE_BYTES) is held while the disk
has room and given back when it fills, so acks (deletes) and dead-letter
moves can still commit on a full disk.
"""

from __future__ import annotations

import os
from typing import Callable

# Bytes that must be free beside the reserve (and beside SPACE_LOW_BYTES)
# before a relay that found its disk full accepts sends again.
SPACE_PROBE_BYTES = 1 << 20
RESERVE_BYTES = 4 << 20
# Free bytes, beyond the WAL's size, below which the relay refuses sends
# before its disk is full (RabbitMQ's disk_free_limit).  A WAL checkpoint
# grows the database by the pages new since the last one, at most the
# WAL's size (several MiB after a burst of small mailboxes, past the
# reserve); without that room it failed, every delete then grew the WAL,
# and purges failed after about a hundred, each failure a reload.  The
# rest is for the acks and purges that follow.
SPACE_LOW_BYTES = 16 << 20
RESERVE_NAME = "relay.reserve"
PROBE_NAME = "relay.space-probe"  # (also made in segments/ by Segments.writable())


def space_available(data_dir: str, nbytes: int = SPACE_PROBE_BYTES) -> bool:
    """True if `nbytes` can be allocated in `data_dir` now."""
    probe = os.path.join(data_dir, PROBE_NAME)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def space_low(data_dir: str, wal: str, free_pages: Callable[[], int], margin: int = 0) -> bool:
    """True if `data_dir`'s file system has less than SPACE_LOW_BYTES plus
    the size of the WAL file `wal` (plus `margin`) free for this user,
    counting the free pages inside the database (`free_pages()`, bytes,
    asked only then): SQLite fills those before it grows the file."""
    try:
        st = os.statvfs(data_dir)
    except OSError:
        return False  # (the writes will tell)
    try:
        wal_size = os.stat(wal).st_size
    except OSError:
        wal_size = 0
    need = SPACE_LOW_BYTES + wal_size + margin
    free = st.f_bavail * st.f_frsize
    return free < need and free + free_pages() < need


def hold_reserve(data_dir: str) -> bool:
    """Allocate the reserve if it is not held; False if the disk has no room
    for it (then nothing is held)."""
    path = os.path.join(data_dir, RESERVE_NAME)
    try:
        if os.path.getsize(path) >= RESERVE_BYTES:
            return True
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
        return True
    except OSError:
        os.ftruncate(fd, 0)
        return False
    finally:
        os.close(fd)


def drop_reserve(data_dir: str) -> None:
    """Give the reserve back to the file system (for SQLite's use)."""
    try:
        os.unlink(os.path.join(data_dir, RESERVE_NAME))
    except OSError:  # (gone already; a read-only file system: it frees nothing then)
        pass
