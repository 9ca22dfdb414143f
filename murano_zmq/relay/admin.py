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

import itertools

from ..protocol.constants import ADMIN_BATCH, PEEK_BYTES, PEEK_MAX
from ..protocol.errors import LocalProtocolError, Malformed, MailboxFull, MailboxNotFound
from ..protocol.frames import Cmd
from ..protocol.message import check_name
from .state import Mailbox


class _Engine:
    """The few engine operations the admin commands use, in one place (the
    engine's rooms: sessions, mailboxes, delivery, dead letters, turn)."""

    def __init__(self, engine, ctx):
        self.engine, self.ctx, self.now = engine, ctx, ctx.now

    def mailbox(self, name: str) -> Mailbox:
        """An existing mailbox the identity may administer."""
        _valid_name(name)
        self.engine.sessions.check(self.ctx.user, "admin", name)
        mb = self.engine.boxes.get(name)
        if mb is None:
            raise MailboxNotFound(f"mailbox {name!r} does not exist")
        return mb

    def target(self, name: str) -> Mailbox | None:
        """A mailbox the identity may administer, if it exists."""
        _valid_name(name)
        self.engine.sessions.check(self.ctx.user, "admin", name)
        return self.engine.boxes.get(name)

    def create(self, name: str) -> Mailbox:
        return self.engine.boxes.get_or_create(name, self.now)

    def head(self, mb: Mailbox):
        """The oldest ready message (the window refilled from disk), or None."""
        if not mb.ready and not self.engine.boxes.fill(mb, self.engine.delivery.unacked):
            return None
        return mb.ready[0]

    def take_head(self, mb: Mailbox):
        """Remove the oldest ready message from the queue, the store (in the
        open batch) and the counts; returns it."""
        row = self.engine.boxes.pop_head(mb, self.engine.delivery.unacked)
        mb.removed(len(row.body))
        return row

    def restore(self, mb: Mailbox, row) -> None:
        """Undo take_head() within the same batch (same seq, same place)."""
        self.engine.store.insert([row])
        mb.window_push_front(row)
        mb.added(len(row.body))

    def enqueue(self, target: Mailbox, row) -> None:
        """Store a copy of `row` in `target`, in the open batch (a new seq;
        delivery count 0); a full target refuses it, whatever its overflow
        (see DeadLetters.enqueue)."""
        self.engine.dead.enqueue(target, row.msg_id, row.headers, row.body, row.created, row.expires, 0,
                                 self.now, self.engine.delivery.unacked, make_room=False)

    def on_disk(self, mb: Mailbox, limit: int) -> list:
        """Ready rows past the memory window, without taking them."""
        if mb.disk_after is None or limit <= 0:
            return []
        unacked = self.engine.delivery.unacked
        held = {r.seq for r in mb.ready}  # (several relays: the window's claims are on disk too)
        return [r for r in self.engine.store.load_ready(mb.id, mb.disk_after, limit, PEEK_BYTES)
                if r.seq not in unacked and r.seq not in held]

    def count(self, key: str, n: int) -> None:
        self.engine.counters[key] = self.engine.counters.get(key, 0) + n

    def reply_after_commit(self, req: int, result) -> None:
        self.engine.turn.reply_after_commit(self.ctx.identity, Cmd.REPLY, req, result)

    def reply_now(self, req: int, result) -> None:
        self.engine.turn.reply_now(self.ctx.identity, Cmd.REPLY, req, result)


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except LocalProtocolError as exc:
        raise Malformed(str(exc)) from None


def _fits(target: Mailbox, size: int) -> bool:
    """Would `target` take a moved message of `size` body bytes?  (Never by
    dropping its head: a move is not a SEND, and the heads of a target that
    dead-letters into the source would come back to be moved again.)"""
    opts = target.options
    if opts.max_bytes is not None and size > opts.max_bytes:
        return False
    return not ((opts.max_length is not None and target.ready_count + 1 > opts.max_length)
                or (opts.max_bytes is not None and target.ready_bytes + size > opts.max_bytes))


def purge(e: _Engine, req: int, name: str) -> None:
    mb = e.mailbox(name)
    purged = 0
    while purged < ADMIN_BATCH and e.head(mb) is not None:
        e.take_head(mb)  # (a body leaves memory with its row)
        purged += 1
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
        head = e.head(mb)
        if head is None:
            break
        if target is None:
            target = e.create(target_name)  # (made only when something moves into it)
        if not _fits(target, len(head.body)):
            stopped = f"mailbox {target_name!r} is full"
            break
        row = e.take_head(mb)  # deleted before the insert: the id is unique per relay
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
    candidates = list(itertools.islice(mb.ready, count))
    if len(candidates) < count:
        candidates += e.on_disk(mb, count - len(candidates))
    for row in candidates:
        if rows and size + len(row.body) > PEEK_BYTES:
            break
        rows.append(row)
        size += len(row.body)
    # DELIVER records (headers packed, as stored), tag and all: not a delivery.
    records = [[r.seq, r.msg_id, mb.name, r.headers, r.body, r.created, r.expires, r.deliveries] for r in rows]
    e.reply_now(req, {"mailbox": name, "ready": mb.ready_count, "messages": records})


def _handler(command):
    def handle(engine, ctx, *fields) -> None:
        command(_Engine(engine, ctx), *fields)
    return handle


# For RelayEngine._HANDLERS: (engine, ctx, *fields), as its own handlers.
HANDLERS = {
    Cmd.PURGE: _handler(purge),
    Cmd.MOVE: _handler(move),
    Cmd.PEEK: _handler(peek),
}
