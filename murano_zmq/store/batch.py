"""Writes not yet committed, and how reads see through them.

A store buffers the relay's writes in WriteBatch objects: the open one, and
sealed ones waiting for (or inside) a commit.  Reads query the database's
committed state and then replay the batches over the result, in order, so
the relay sees its own writes without waiting for a commit in flight.  A
batch is dropped only after its commit returned, and a read takes its list
of batches before it queries the database: a row is then seen in a batch
or on disk, never in neither; in both when a commit ends between the two,
so a read that merges them keeps one of each seq (store/batched.py).

Nothing here does I/O; a SQL store (SQLite, PostgreSQL) runs the batch's
operations in order inside one transaction.
"""

from __future__ import annotations

from itertools import groupby
from typing import Iterable, Iterator

from .base import MailboxRow, StoredMessage, field_mailbox, field_msg_id, field_seq


class WriteBatch:
    __slots__ = ("ops", "inserted", "ids", "by_mailbox", "deleted", "deliveries", "dropped", "top_seq",
                 "written", "recheck")

    def __init__(self) -> None:
        # In order: ("insert", [row...]), ("delete", [seq...]),
        # ("deliveries", [(count, seq)...]), ("mailbox", MailboxRow),
        # ("drop_mailbox", mailbox id).
        self.ops: list[tuple[str, object]] = []
        self.inserted: dict[int, StoredMessage] = {}
        self.ids: dict[bytes, int] = {}  # msg_id -> seq, of rows inserted here
        self.by_mailbox: dict[int, list[int]] = {}  # mailbox id -> seqs inserted here, in order
        self.deleted: set[int] = set()
        self.deliveries: dict[int, int] = {}  # seq -> count
        self.dropped: set[int] = set()  # mailbox ids deleted here
        self.top_seq = 0  # the highest seq inserted here (kept, deleted or not)
        self.written = False  # its statements ran in the store's open transaction
        # Ids inserted here that may have been stored before (a store whose
        # rows are not all under one unique index looks them up as it
        # writes: store/packs.py); None: none.
        self.recheck: set[bytes] | None = None

    def __bool__(self) -> bool:
        return bool(self.ops)

    def _op(self, kind: str, items: list) -> None:
        if self.ops and self.ops[-1][0] == kind:
            self.ops[-1][1].extend(items)
        else:
            self.ops.append((kind, list(items)))

    def insert(self, rows: list[StoredMessage]) -> None:
        # (the hot path: a SEND's rows at once; the per-row work is map()
        # and zip() in C, the Python loop below runs once per mailbox run)
        if not rows:
            return
        seqs = list(map(field_seq, rows))
        self.inserted.update(zip(seqs, rows))
        self.ids.update(zip(map(field_msg_id, rows), seqs))
        by_mailbox = self.by_mailbox
        for mailbox_id, run in groupby(rows, field_mailbox):
            by_mailbox.setdefault(mailbox_id, []).extend(map(field_seq, run))
        top = max(seqs)
        if top > self.top_seq:
            self.top_seq = top
        # Writes to these seqs before they existed touched nothing.
        if self.deleted:
            self.deleted.difference_update(seqs)
        if self.deliveries:
            for seq in seqs:
                self.deliveries.pop(seq, None)
        ops = self.ops
        if ops and ops[-1][0] == "insert":
            ops[-1][1].extend(rows)
        else:
            ops.append(("insert", list(rows)))

    def delete(self, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        self.deleted.update(seqs)
        self._op("delete", seqs)

    def set_deliveries(self, counts: Iterable[tuple[int, int]]) -> None:
        counts = list(counts)
        for count, seq in counts:
            self.deliveries[seq] = count
        self._op("deliveries", counts)

    def save_mailbox(self, row: MailboxRow) -> None:
        self.ops.append(("mailbox", row))

    def delete_mailbox(self, mailbox_id: int) -> None:
        # Rows inserted here before go with it; rows inserted after (the id
        # used again) stay: `dropped` hides only rows from before this batch.
        for seq, row in list(self.inserted.items()):
            if row.mailbox_id == mailbox_id:
                del self.inserted[seq]
                if self.ids.get(row.msg_id) == seq:
                    del self.ids[row.msg_id]
        self.by_mailbox.pop(mailbox_id, None)
        self.dropped.add(mailbox_id)
        self.ops.append(("drop_mailbox", mailbox_id))

    def statements(self) -> Iterator[tuple[str, object]]:
        """The operations to run, in order; a row inserted and deleted in
        this same batch is neither (the transaction is atomic)."""
        gone = self.deleted & self.inserted.keys()
        for kind, items in self.ops:
            if gone and kind == "insert":
                items = [r for r in items if r.seq not in gone]
            elif gone and kind == "delete":
                items = [s for s in items if s not in gone]
            if kind in ("mailbox", "drop_mailbox") or items:
                yield kind, items


def replay(row: StoredMessage | None, batches: list[WriteBatch], own: bool = False) -> StoredMessage | None:
    """`row` as the batches leave it (None: deleted).  own: the row was
    inserted by the first of them (whose mailbox deletes came before it)."""
    for i, b in enumerate(batches):
        if row is None:
            return None
        if row.seq in b.deleted or (row.mailbox_id in b.dropped and not (own and i == 0)):
            return None
        count = b.deliveries.get(row.seq)
        if count is not None:
            row = row._replace(deliveries=count)
    return row


def overlay(batches: list[WriteBatch]) -> tuple[set[int], dict[int, int]]:
    """What the batches do to committed rows of a mailbox none of them
    drops, at once: the seqs they delete, and the delivery counts they leave
    (replay() for many rows, without a loop over the batches per row).  For
    reading only: when one batch alone deletes or counts, they are its own
    set and dict (no copy, per window read, of the deletes the relay holds
    for a later commit: relay/turn.py)."""
    writing = [b for b in batches if b.deleted or b.deliveries]
    if not writing:
        return set(), {}
    if len(writing) == 1:
        return writing[0].deleted, writing[0].deliveries
    deleted: set[int] = set()
    counts: dict[int, int] = {}
    for b in writing:
        deleted |= b.deleted
        counts.update(b.deliveries)
    return deleted, counts


def runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Seqs as (first, last) runs of consecutive numbers, in sorted order.
    A run holds only the listed seqs: seq is the key, so every stored row
    in [first, last] is one of them."""
    out: list[tuple[int, int]] = []
    first = last = None
    for s in sorted(set(seqs)):
        if last is not None and s == last + 1:
            last = s
            continue
        if first is not None:
            out.append((first, last))
        first = last = s
    if first is not None:
        out.append((first, last))
    return out


def inserted_rows(batches: list[WriteBatch], mailbox_id: int | None = None) -> Iterator[StoredMessage]:
    """Rows the batches insert and leave alive, as they leave them (of one
    mailbox, if given)."""
    for i, b in enumerate(batches):
        if mailbox_id is None:
            rows = list(b.inserted.values())
        else:
            rows = [b.inserted[s] for s in b.by_mailbox.get(mailbox_id, ()) if s in b.inserted]
        for row in rows:
            row = replay(row, batches[i:], own=True)
            if row is not None:
                yield row


def hidden_count(batches: list[WriteBatch]) -> int:
    """How many stored rows the batches' deletes may hide (to widen a LIMIT by)."""
    return sum(len(b.deleted) for b in batches)


def dropped_mailboxes(batches: list[WriteBatch]) -> list[int]:
    """Mailboxes whose stored rows the batches delete (a query leaves them out)."""
    return sorted({m for b in batches for m in b.dropped})


def visible(seq: int, mailbox_id: int, batches: list[WriteBatch]) -> bool:
    """Is a stored (committed) row still there after the batches?"""
    return not any(seq in b.deleted or mailbox_id in b.dropped for b in batches)


def find(seq: int, on_disk: StoredMessage | None, batches: list[WriteBatch]) -> StoredMessage | None:
    """The row `seq` given its committed version (or None)."""
    for i, b in enumerate(batches):
        if seq in b.inserted:
            return replay(b.inserted[seq], batches[i:], own=True)
    return replay(on_disk, batches)


def cap(rows: list[StoredMessage], limit: int, max_bytes: int | None) -> list[StoredMessage]:
    """The first `limit` rows, stopping once their bodies reach max_bytes (one at least)."""
    rows = rows[:limit]
    if max_bytes is None:
        return rows
    size = 0
    for i, row in enumerate(rows):
        size += len(row.body)
        if size >= max_bytes:
            return rows[:i + 1]
    return rows
