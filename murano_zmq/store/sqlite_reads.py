"""The SQLite store's reads, on its reader connection (store/sqlite.py):
the mailboxes and their counts at start-up, and the dialect store/batched.py
asks for each turn (rows by seq, ids already stored, a mailbox's ready
rows).  A body kept in a segment file is read from there; rows kept in a
pack (store/packs.py) are read through the packs' directory."""

from __future__ import annotations

from heapq import merge
from operator import itemgetter

import msgpack

from .base import MailboxRow, StoredMessage, new_row
from .batch import WriteBatch, overlay
from .schema import COLUMNS as _COLUMNS, ID_CHUNK

__all__ = ["SQLiteReads", "table_ids_at"]

_seq = itemgetter(0)

# A row as StoredMessage's columns, where a body in a segment comes as the
# text "seg,offset,length" (a stored body is always a BLOB): the common row
# needs no other test or copy on the way to StoredMessage (_message()).
_READ = _COLUMNS.replace(
    "body", "CASE WHEN seg IS NULL THEN body ELSE seg || ',' || seg_off || ',' || seg_len END")


class SQLiteReads:
    """SQLiteStore's reads (a mixin: it uses the store's `_reader`,
    `_read_lock` and `_segments`)."""

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _first(self, sql: str, args: tuple, wanted) -> tuple | None:
        """The first row that `wanted` accepts, reading none after it: a
        LIMIT widened by deletes not committed yet (up to 2,000 the relay
        holds for a later commit, relay/turn.py) is not fetched whole."""
        with self._read_lock:
            cursor = self._reader.execute(sql, args)
            try:
                for row in cursor:
                    if wanted(row):
                        return row
                return None
            finally:
                cursor.close()

    # --- at start-up ------------------------------------------------------------

    def load_mailboxes(self) -> list[MailboxRow]:
        return [
            MailboxRow(i, name, msgpack.unpackb(opts), bool(declared))
            for i, name, opts, declared in self._query(
                "SELECT id, name, options, declared FROM mailboxes ORDER BY id")
        ]

    def mailbox_stats(self) -> dict[int, tuple[int, int]]:
        stats = {
            mb: (n, b or 0)
            for mb, n, b in self._query(
                "SELECT mailbox, count(*), sum(coalesce(seg_len, length(body))) FROM messages GROUP BY mailbox")
        }
        for mb, (n, b) in self._packs.stats(self._query).items():
            n0, b0 = stats.get(mb, (0, 0))
            stats[mb] = (n0 + n, b0 + b)
        return stats

    def max_seq(self) -> int:
        journal = self._query("SELECT value FROM meta WHERE key='journal'")  # (store/journal.py)
        return max(super().max_seq(), self._query("SELECT coalesce(max(last), 0) FROM packs")[0][0],
                   journal[0][0] if journal else 0)

    # --- reads (the dialect of store/batched.py) ------------------------------------

    def _rows_at(self, seqs: list[int]) -> dict[int, StoredMessage]:
        on_disk = {}
        for i in range(0, len(seqs), ID_CHUNK):
            chunk = seqs[i:i + ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT {_READ} FROM messages WHERE seq IN ({marks})", tuple(chunk)):
                row = self._message(r)
                if row is not None:
                    on_disk[r[0]] = row
        if self._packs and len(on_disk) < len(seqs):
            on_disk.update(self._packs.rows_at(self._query, [s for s in seqs if s not in on_disk]))
        return on_disk

    def _message(self, r: tuple) -> StoredMessage | None:
        """A row read with _READ as a StoredMessage, its body read from its
        segment (None: the body cannot be read)."""
        if r[4].__class__ is not str:
            return new_row(StoredMessage, r)
        seg, off, length = map(int, r[4].split(","))
        body = self._segments.read(seg, off, length, f"message {r[2].hex()} (seq {r[0]})")
        if body is None:
            return None
        return StoredMessage(r[0], r[1], r[2], r[3], body, r[5], r[6], r[7])

    def _ids_at(self, msg_ids: list[bytes]) -> list[tuple[int, int, bytes]]:
        found = table_ids_at(self._query, msg_ids)
        if self._packs:
            found = found + self._packs.ids_at(self._query, msg_ids)
        return found

    def _ready_rows(self, mailbox_id: int, after_seq: int, limit: int, max_bytes: int | None,
                    wanted: int, batches: list[WriteBatch]) -> tuple[list[StoredMessage], int | None]:
        rows: list[StoredMessage] = []
        stopped_at = None
        size = 0
        deleted, counts = overlay(batches)  # (the mailbox itself is not dropped)
        new, cls = new_row, StoredMessage
        with self._read_lock:
            while True:
                cursor = self._reader.execute(
                    f"SELECT {_READ} FROM messages WHERE mailbox=? AND seq>? ORDER BY seq LIMIT ?",
                    (mailbox_id, after_seq, wanted))
                source = cursor
                if self._packs.has_mailbox(mailbox_id):
                    # Packed rows and table rows in seq order.  The cursor's
                    # LIMIT holds: at least `limit` of its `wanted` rows are
                    # not deleted, so the loop stops at or before its last.
                    packed = self._packs.ready(self._query, mailbox_id, after_seq)
                    source = merge(cursor, packed, key=_seq)
                placed: list = []  # rows whose bodies are in segments: (index in rows, (seg, off, length))
                for r in source:  # stop early: bodies past max_bytes are never read
                    after_seq = r[0]
                    if r[0] in deleted:
                        continue
                    if r[4].__class__ is not str:
                        row = new(cls, r)
                        length = len(row.body)
                    else:  # read below, with the others (Segments.read_many)
                        place = tuple(map(int, r[4].split(",")))
                        placed.append((len(rows), place))
                        row, length = r, place[2]
                    rows.append(row)
                    size += length
                    if len(rows) >= limit or (max_bytes is not None and size >= max_bytes):
                        stopped_at = r[0]  # rows after it were not read
                        break
                cursor.close()
                read = len(rows)
                if placed:
                    rows, size = self._with_bodies(rows, placed, size)
                if len(rows) == read:
                    break
                # Some bodies could not be read (left out, logged): read on
                # after the last row seen, in their place (until a read
                # loses none: the last finds no rows, or its bodies).
                stopped_at = None
        if counts:
            rows = [row._replace(deliveries=counts[row.seq]) if row.seq in counts else row for row in rows]
        return rows, stopped_at

    def _with_bodies(self, rows: list, placed: list, size: int) -> tuple[list[StoredMessage], int]:
        """The rows (StoredMessages, and rows read with _READ at the
        indexes in `placed`) as StoredMessages, the latter with their
        bodies read from their segments, and `size` (their bodies' bytes)
        less those of the ones that cannot be read, which are left out."""
        bodies = self._segments.read_many(
            [place for _, place in placed],
            lambda k: f"message {rows[placed[k][0]][2].hex()} (seq {rows[placed[k][0]][0]})")
        lost = False
        for (i, place), body in zip(placed, bodies):
            r = rows[i]
            if body is None:
                rows[i], lost = None, True
                size -= place[2]
            else:
                rows[i] = StoredMessage(r[0], r[1], r[2], r[3], body, r[5], r[6], r[7])
        return ([row for row in rows if row is not None] if lost else rows), size

    def _not_dropped(self, dropped: list[int]) -> tuple[str, tuple]:
        return f"NOT IN ({','.join('?' * len(dropped))})", tuple(dropped)


def table_ids_at(query, msg_ids: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(seq, mailbox, msg_id) of the message table's rows with these ids,
    read through `query(sql, args)` (the reader's, or the writer's to see
    its open transaction: store/packs.py)."""
    chunks = [query(f"SELECT seq, mailbox, msg_id FROM messages WHERE msg_id IN ({','.join('?' * len(chunk))})",
                    tuple(chunk))
              for chunk in (msg_ids[i:i + ID_CHUNK] for i in range(0, len(msg_ids), ID_CHUNK))]
    # (one chunk, the usual case, is passed on as it came: no copy)
    return chunks[0] if len(chunks) == 1 else [r for rows in chunks for r in rows]
