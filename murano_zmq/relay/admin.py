"""The relay's admin commands: PURGE, MOVE and PEEK (docs/protocol.md).

They run in the relay loop like every command, through the engine's
dispatch table (RelayEngine._HANDLERS takes HANDLERS), and use the engine's
own primitives, so the in-memory counters, the READY window and the store
stay in step.  Each needs the `admin` permission on every mailbox it names
when the relay checks permissions (docs/security.md).

- PURGE drops a mailbox's ready messages; unacked ones stay with their
  consumers, as RabbitMQ's queue.purge does.  Its REPLY goes after the commit.
  PURGE and MOVE handle at most ADMIN_BATCH messages each and say how many
  are left; the caller repeats.
- MOVE takes ready messages from one mailbox to another (dead letters back
  to work).  Per message, the delete from the source and the insert into
  the target are buffered into the same store transaction, delete first
  (message ids are unique per relay): a crash either keeps the message
  where it was or has it in the target, never neither or both.  It stops at
  a target that would refuse the message (full, reject policy).  REPLY
  after the commit.
- PEEK returns copies of the first ready messages, taking nothing.
"""

from __future__ import annotations

import msgpack

from ..protocol.constants import OVERFLOW_REJECT
from ..protocol.errors import LocalProtocolError, Malformed, MailboxFull, MailboxNotFound
from ..protocol.frames import Cmd, encode
from ..protocol.message import check_name
from ..protocol.options import MailboxOptions
from .state import Mailbox

# Messages one PURGE or MOVE handles at most: one command is one loop turn
# and one commit, which other nodes wait behind.  The rest is `left` in the
# answer, for the caller to ask again (Admin.purge() and move() do).
ADMIN_BATCH = 10_000

# Messages one PEEK returns at most, and the body bytes after which it stops
# (at least one message is returned, whatever its size).
PEEK_MAX = 1000
PEEK_BYTES = 4 * 1024 * 1024


class _Engine:
    """The few engine operations the admin commands use, in one place: the
    engine's internals may be reorganised; only this adapter follows them."""

    def __init__(self, engine, peer, now: float):
        self.engine, self.peer, self.now = engine, peer, now

    def mailbox(self, name: str) -> Mailbox:
        """An existing mailbox the identity may administer."""
        _valid_name(name)
        self.engine._check("admin", name)
        mb = self.engine.mailboxes.get(name)
        if mb is None:
            raise MailboxNotFound(f"mailbox {name!r} does not exist")
        return mb

    def target(self, name: str) -> Mailbox:
        _valid_name(name)
        self.engine._check("admin", name)
        return self.engine.mailboxes.get(name) or self.engine._create_mailbox(name, MailboxOptions(), False,
                                                                              self.now)

    def pop_ready(self, mb: Mailbox):
        """Take the head of the READY queue (the window refilled from disk) out
        of memory, or None; remove() or put_back() must follow."""
        if not mb.ready and not self.engine._fill(mb):
            return None
        return mb.ready.popleft()

    def put_back(self, mb: Mailbox, row) -> None:
        mb.ready.appendleft(row)

    def remove(self, mb: Mailbox, rows: list) -> None:
        """Delete popped rows from the store and the mailbox's counts."""
        if rows:
            self.engine._delete([r.seq for r in rows])
            mb.count -= len(rows)
            mb.nbytes -= sum(len(r.body) for r in rows)

    def restore(self, mb: Mailbox, row) -> None:
        """Undo remove() of one row within the same turn (same seq, same place)."""
        self.engine._insert(row)
        mb.ready.appendleft(row)
        mb.count += 1
        mb.nbytes += len(row.body)

    def enqueue(self, target: Mailbox, row) -> None:
        """Store a copy of `row` in `target` (a new seq; delivery count 0)."""
        self.engine._enqueue(target, row.msg_id, row.headers, row.body, row.created, row.expires, 0, self.now)

    def on_disk(self, mb: Mailbox, limit: int) -> list:
        """Ready rows past the memory window, without taking them."""
        if mb.disk_after is None or limit <= 0:
            return []
        self.engine._flush_writes()
        return [r for r in self.engine.store.load_ready(mb.id, mb.disk_after, limit)
                if r.seq not in self.engine._unacked]

    def count(self, key: str, n: int) -> None:
        self.engine.counters[key] = self.engine.counters.get(key, 0) + n

    def reply_after_commit(self, req: int, result) -> None:
        self.engine._after_commit.append((self.peer.identity, encode(Cmd.REPLY, req, result)))

    def reply_now(self, req: int, result) -> None:
        self.engine._reply_now(self.peer.identity, Cmd.REPLY, req, result)


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except LocalProtocolError as exc:
        raise Malformed(str(exc)) from None


def _fits(target: Mailbox, size: int) -> bool:
    """Would `target` take a message of `size` body bytes without refusing it?"""
    opts = target.options
    if opts.max_bytes is not None and size > opts.max_bytes:
        return False
    if opts.overflow != OVERFLOW_REJECT:
        return True  # drop-head makes room
    return not ((opts.max_length is not None and target.ready_count + 1 > opts.max_length)
                or (opts.max_bytes is not None and target.ready_bytes + size > opts.max_bytes))


def purge(e: _Engine, req: int, name: str) -> None:
    mb = e.mailbox(name)
    purged, rows = 0, []
    while purged + len(rows) < ADMIN_BATCH and (row := e.pop_ready(mb)) is not None:
        rows.append(row)
        if len(rows) >= 1000:  # bodies leave memory as they go
            e.remove(mb, rows)
            purged, rows = purged + len(rows), []
    e.remove(mb, rows)
    purged += len(rows)
    mb.last_used = e.now
    e.count("purged", purged)
    e.reply_after_commit(req, {"mailbox": name, "purged": purged, "left": mb.ready_count})


def move(e: _Engine, req: int, name: str, target_name: str, limit: int | None) -> None:
    if target_name == name:
        raise Malformed("MOVE needs two different mailboxes")
    if limit is not None and limit < 0:
        raise Malformed(f"MOVE limit must be >= 0, got {limit}")
    mb = e.mailbox(name)
    target = e.target(target_name)  # both checked before anything moves
    most = ADMIN_BATCH if limit is None else min(limit, ADMIN_BATCH)
    moved, stopped = 0, None
    while moved < most:
        row = e.pop_ready(mb)
        if row is None:
            break
        if not _fits(target, len(row.body)):
            e.put_back(mb, row)
            stopped = f"mailbox {target_name!r} is full"
            break
        e.remove(mb, [row])  # before the insert: the id is unique per relay
        try:
            e.enqueue(target, row)
        except MailboxFull as exc:  # _fits() said it would fit: put it back as it was
            e.restore(mb, row)
            stopped = exc.text
            break
        moved += 1
    mb.last_used = e.now
    e.count("moved", moved)
    e.reply_after_commit(req, {"mailbox": name, "to": target_name, "moved": moved, "left": mb.ready_count,
                               "stopped": stopped})


def peek(e: _Engine, req: int, name: str, count: int) -> None:
    if not 1 <= count <= PEEK_MAX:
        raise Malformed(f"PEEK count must be 1..{PEEK_MAX}, got {count}")
    mb = e.mailbox(name)
    rows, size = [], 0
    candidates = list(mb.ready)[:count]
    if len(candidates) < count:
        candidates += e.on_disk(mb, count - len(candidates))
    for row in candidates:
        if rows and size + len(row.body) > PEEK_BYTES:
            break
        rows.append(row)
        size += len(row.body)
    records = [[r.seq, r.msg_id, mb.name, msgpack.unpackb(r.headers), r.body, r.created, r.expires, r.deliveries]
               for r in rows]
    e.reply_now(req, {"mailbox": name, "ready": mb.ready_count, "messages": records})


def _handler(command):
    def handle(engine, peer, now: float, *fields) -> None:
        command(_Engine(engine, peer, now), *fields)
    return handle


# For RelayEngine._HANDLERS: (engine, peer, now, *fields), as its own handlers.
HANDLERS = {
    Cmd.PURGE: _handler(purge),
    Cmd.MOVE: _handler(move),
    Cmd.PEEK: _handler(peek),
}
