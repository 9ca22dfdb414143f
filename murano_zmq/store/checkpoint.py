"""The WAL checkpoint, off the commit path.

SQLite's auto-checkpoint runs inside the COMMIT that takes the WAL past
1,000 pages: that one commit copies the pages into the database and syncs
it, and its confirm waits (a tail of milliseconds every ~250 lone sends).
The writer connection runs with wal_autocheckpoint=0 instead, and
Checkpointer runs PASSIVE checkpoints from a connection and thread of its
own once enough commits or bytes have gone into the WAL.

The WAL is written from its start again (not grown) only when a write
begins after a checkpoint that copied every frame: a WAL that keeps growing
also makes every commit's fsync journal the file's new size.  So the
thread checkpoints again while commits came during its checkpoint (each
time only their few frames are left), and then once more holding the
store's commit lock (a commit in progress may have been missed): then
the next commit restarts the WAL.  If the thread falls far behind (a loaded machine), the
committing thread checkpoints itself, so the WAL stays bounded either way.

Crash safety is SQLite's: a checkpoint copies only committed frames and
syncs the database before it marks them copied; the WAL is reused only
after that (this connection runs at FULL; the writer's NORMAL also syncs
the WAL before a checkpoint and the database after one).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from .faults import is_disk_full

log = logging.getLogger("murano_zmq.store")

# A checkpoint after this many commits or bytes of small bodies written,
# whichever comes first (SQLite's own default is 1,000 pages: ~4 MiB).
CHECKPOINT_COMMITS = 200
CHECKPOINT_BYTES = 4 << 20
# The committing thread checkpoints itself past this many times the above
# (the thread fell behind).
BEHIND = 8
# Checkpoints tried while commits go on before the one that holds them off.
TRIES = 3
# A failing checkpoint is logged at most this often, in seconds.
LOG_EVERY = 60.0


class Checkpointer:
    def __init__(self, path: str, commit_lock: threading.Lock, writer: sqlite3.Connection,
                 commits: int = CHECKPOINT_COMMITS, nbytes: int = CHECKPOINT_BYTES):
        self._commit_lock = commit_lock
        self._writer = writer  # used only under the commit lock (the fall-back)
        self._every_commits, self._every_bytes = commits, nbytes
        self._commits = self._bytes = 0  # since the last checkpoint asked for
        self._behind = 0  # commits since the last checkpoint that finished
        self._count = 0  # commits ever
        self._logged = 0.0
        # The last checkpoint found no room to grow the database: the WAL
        # then grows with every commit, deletes included, past the relay's
        # reserve (a full disk's acks failed after ~100 purges, each failure
        # a reload).  The relay refuses sends on it and gives its reserve
        # back, for retry() to use.
        self.out_of_space = False
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=FULL")
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relay-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, nbytes: int) -> None:
        """A commit went into the WAL with about `nbytes` of rows (called
        under the commit lock, after the COMMIT)."""
        self._count += 1
        self._commits += 1
        self._bytes += nbytes
        self._behind += 1
        if self._commits >= self._every_commits or self._bytes >= self._every_bytes:
            self._commits = self._bytes = 0
            if self._behind >= BEHIND * self._every_commits:
                self._checkpoint(self._writer)  # the thread fell behind: here, with no commit running
                self._behind = 0
            else:
                self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            # A checkpoint copies the frames there when it starts; commits
            # during it leave frames behind, and the WAL then grows on.  Try
            # again while that happens (each try has only those few frames
            # to copy), then once holding off commits: that one finds
            # nothing or little left, and leaves the WAL all copied.
            for _ in range(TRIES):
                before = self._count
                if self._checkpoint(self._db) and self._count == before:
                    break
            with self._commit_lock:
                self._checkpoint(self._db)
            self._behind = 0  # (a commit counted meanwhile is lost: a bound, not a count)

    def _checkpoint(self, db: sqlite3.Connection) -> bool:
        """One PASSIVE checkpoint; True if it copied every frame there when
        it started."""
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # (a full disk): the WAL keeps the data; try again later
            self.out_of_space = is_disk_full(exc)
            now = time.monotonic()
            if now - self._logged > LOG_EVERY:
                self._logged = now
                log.warning("WAL checkpoint failed (the WAL keeps growing until one succeeds): %s", exc)
            return False
        self.out_of_space = False
        return copied >= frames

    def retry(self) -> None:
        """Checkpoint again soon (from the thread), whatever the counts say."""
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(10)
        self._db.close()
