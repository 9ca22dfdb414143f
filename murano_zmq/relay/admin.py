"""The relay's admin commands: PURGE, MOVE and PEEK (docs/protocol.md).

They run in the relay loop like every command, through the engine's
dispatch table (RelayEngine._HANDLERS takes HANDLERS), and use the engine's
own primitives, so the in-memory counters, the READY window and the store
stay in step.  Each needs the `admin` permission on every mailbox it names
when the relay checks permissions (docs/security.md).

- PURGE drops a mailbox's ready messages; unacked ones stay with their
  consumers, as RabbitMQ's queue.purge does.  Its REPLY goes after the commit.
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
from ..protocol.errors import Malformed, MailboxFull, MailboxNotFound
from ..protocol.frames import Cmd, encode
from ..protocol.options import MailboxOptions
from .state import Mailbox

# Messages one PEEK returns at most, and the body bytes after which it stops
# (at least one message is returned, whatever its size).
PEEK_MAX = 1000
PEEK_BYTES = 4 * 1024 * 1024


def _mailbox(engine, name: str) -> Mailbox:
    engine._check("admin", name)
    mb = engine.mailboxes.get(name)
    if mb is None:
        raise MailboxNotFound(f"mailbox {name!r} does not exist")
    return mb


def _next_ready(engine, mb: Mailbox):
    """Pop the head of the ready queue (from memory, refilled from disk), or None."""
    if not mb.ready and not engine._fill(mb):
        return None
    return mb.ready.popleft()


def on_purge(engine, peer, now: float, req: int, name: str) -> None:
    mb = _mailbox(engine, name)
    seqs, nbytes = [], 0
    while (row := _next_ready(engine, mb)) is not None:
        seqs.append(row.seq)
        nbytes += len(row.body)
    if seqs:
        engine._delete(seqs)
        mb.count -= len(seqs)
        mb.nbytes -= nbytes
    mb.last_used = now
    engine.counters["purged"] = engine.counters.get("purged", 0) + len(seqs)
    engine._after_commit.append((peer.identity, encode(Cmd.REPLY, req, {"mailbox": name, "purged": len(seqs)})))


def _fits(target: Mailbox, size: int) -> bool:
    """Would `target` take a message of `size` body bytes without refusing it?"""
    opts = target.options
    if opts.max_bytes is not None and size > opts.max_bytes:
        return False
    if opts.overflow != OVERFLOW_REJECT:
        return True  # drop-head makes room
    return not ((opts.max_length is not None and target.ready_count + 1 > opts.max_length)
                or (opts.max_bytes is not None and target.ready_bytes + size > opts.max_bytes))


def on_move(engine, peer, now: float, req: int, name: str, target_name: str, limit: int | None) -> None:
    if target_name == name:
        raise Malformed("MOVE needs two different mailboxes")
    if limit is not None and limit < 0:
        raise Malformed(f"MOVE limit must be >= 0, got {limit}")
    mb = _mailbox(engine, name)
    engine._check("admin", target_name)
    target = engine.mailboxes.get(target_name) or engine._create_mailbox(target_name, MailboxOptions(), False, now)
    moved, stopped = 0, None
    while limit is None or moved < limit:
        row = _next_ready(engine, mb)
        if row is None:
            break
        if not _fits(target, len(row.body)):
            mb.ready.appendleft(row)
            stopped = f"mailbox {target_name!r} is full"
            break
        engine._delete([row.seq])  # before the insert: the id is unique per relay
        mb.count -= 1
        mb.nbytes -= len(row.body)
        try:
            engine._enqueue(target, row.msg_id, row.headers, row.body, row.created, row.expires, 0, now)
        except MailboxFull as exc:  # _fits() said it would fit: put it back as it was
            engine._insert(row)
            mb.ready.appendleft(row)
            mb.count += 1
            mb.nbytes += len(row.body)
            stopped = exc.text
            break
        moved += 1
    mb.last_used = now
    engine.counters["moved"] = engine.counters.get("moved", 0) + moved
    result = {"mailbox": name, "to": target_name, "moved": moved, "left": mb.ready_count, "stopped": stopped}
    engine._after_commit.append((peer.identity, encode(Cmd.REPLY, req, result)))


def on_peek(engine, peer, now: float, req: int, name: str, count: int) -> None:
    if not 1 <= count <= PEEK_MAX:
        raise Malformed(f"PEEK count must be 1..{PEEK_MAX}, got {count}")
    mb = _mailbox(engine, name)
    rows, size = [], 0
    for row in mb.ready:
        if len(rows) >= count or (rows and size + len(row.body) > PEEK_BYTES):
            break
        rows.append(row)
        size += len(row.body)
    if len(rows) < count and mb.disk_after is not None and size <= PEEK_BYTES:
        engine._flush_writes()
        for row in engine.store.load_ready(mb.id, mb.disk_after, count - len(rows)):
            if row.seq in engine._unacked:
                continue
            if rows and size + len(row.body) > PEEK_BYTES:
                break
            rows.append(row)
            size += len(row.body)
    records = [[r.seq, r.msg_id, mb.name, msgpack.unpackb(r.headers), r.body, r.created, r.expires, r.deliveries]
               for r in rows]
    engine._reply_now(peer.identity, Cmd.REPLY, req,
                      {"mailbox": name, "ready": mb.ready_count, "messages": records})


HANDLERS = {
    Cmd.PURGE: on_purge,
    Cmd.MOVE: on_move,
    Cmd.PEEK: on_peek,
}
