"""Packs: a run of messages stored as one row (the SQLite store, schema 3).

A pipelined SEND brings up to 256 messages for one mailbox, and the relay
stores them together and later settles them together.  A row per message
costs SQLite a row and two index entries to insert and as much again to
delete: bench/store_rows.py measured 6.5 µs of CPU per message to store
and 6.5 to settle, against 3.7 and 3.2 for a row per SEND.  So a run of at
least MIN_ROWS rows of one mailbox, with consecutive seqs, no expiry,
bodies kept in the database and clock ids (new_message_id()'s, not
idempotent_id()'s hashes), is written as one row of `packs`: its seqs are
first..last, its fields msgpack lists.  What happens to it afterwards
is kept beside it: the seqs settled (`pack_gone`, one row per run of seqs
a delete takes out of it) and delivery counts (`pack_deliveries`).  When
every seq of a pack is gone, its rows go.

The directory of packs (each one's seqs, mailbox, id range, the seqs gone
and the counts set) is held in memory: a million queued messages are about
4,000 packs.  It is read at start-up and again after a rollback, and
changed as the statements are written, under the store's commit lock, so
it tells what the writer's transaction holds.  Reads on the reader
connection take committed packs through it; the write batches
(store/batch.py) cover what is not committed yet, as for rows.

Ids: the message table's unique index skips a duplicate id; a pack has no
index on its ids (that is half the saving), so a row whose id may have
been stored already when it was inserted (the batch's `recheck`, from the
clock ceiling, store/ids.py) is looked up in the table and in the packs
whose id range reaches it before it is written, and skipped if found; a
pack also keeps only the first of an id repeated within it.  A sender's
new ids are above the ceiling and looked up nowhere.  Packs hold clock ids
only, so a pack's id range spans the milliseconds its ids were made in:
a lookup reads only the packs whose range reaches the ids asked (never
for a hashed id), not every pack.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left, bisect_right, insort
from itertools import chain, groupby, islice, repeat
from operator import itemgetter
from typing import Callable, Iterator

import msgpack

from .base import StoredMessage, field_body, field_msg_id, field_seq, new_row
from .batch import runs
from .ids import CLOCK_BOUND
from .sqlite_reads import table_ids_at

__all__ = ["Packs", "MIN_ROWS", "MAX_ROWS", "packed_rows", "stored_ids", "stored_count"]

MIN_ROWS = 16  # a shorter run is stored a row per message
MAX_ROWS = 256  # a longer one is cut into packs of this many (SEND_BATCH)

log = logging.getLogger("murano_zmq.store")

_pack = msgpack.Packer(use_bin_type=True).pack
_INSERT = ("INSERT INTO packs (first, last, mailbox, min_id, max_id, nbytes, ids, sizes, data) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


class Pack:
    __slots__ = ("first", "last", "mailbox", "min_id", "max_id", "gone", "counts")

    def __init__(self, first: int, last: int, mailbox: int, min_id: bytes, max_id: bytes):
        self.first, self.last, self.mailbox = first, last, mailbox
        self.min_id, self.max_id = min_id, max_id
        self.gone: set[int] = set()  # seqs deleted
        self.counts: dict[int, int] = {}  # seq -> deliveries, set after the pack was written


class Packs:
    """The packs' directory and their statements.  Writes run under the
    store's commit lock (from the loop's thread or the committer's) and
    change the directory under `lock`; reads, from the loop's thread, take
    `lock` for the lists they walk and look a pack up (one dict lookup) or
    test its `gone` and `counts` (one set or dict lookup) without it."""

    def __init__(self, db, min_rows: int = MIN_ROWS):
        """db: the writer connection (the directory is loaded from it)."""
        self.min_rows = min_rows
        self.lock = threading.Lock()
        self._cached: tuple[int, list] | None = None  # the last pack read: (first, its rows)
        self._damaged: set[int] = set()  # packs found damaged (logged once each)
        # True after a rollback that could not read the directory again:
        # the next write reads it first (reload_if_stale()).
        self.stale = False
        self.load(db)

    def load(self, db) -> None:
        """(Re)read the directory from `db`: at start-up, and after a
        rollback (then the writer sees the last commit)."""
        packs: dict[int, Pack] = {}
        for first, last, mailbox, min_id, max_id in db.execute(
                "SELECT first, last, mailbox, min_id, max_id FROM packs ORDER BY first"):
            packs[first] = Pack(first, last, mailbox, min_id, max_id)
        for first, gone in _gone(db.execute).items():
            if first in packs:
                packs[first].gone = gone
        for seq, first, count in db.execute("SELECT seq, first, count FROM pack_deliveries"):
            if first in packs:
                packs[first].counts[seq] = count
        by_mailbox: dict[int, list[int]] = {}
        for first, p in packs.items():
            by_mailbox.setdefault(p.mailbox, []).append(first)
        by_max_id = sorted((p.max_id, first) for first, p in packs.items())
        with self.lock:
            self._cached = None
            self.stale = False
            self._packs, self._firsts, self._by_mailbox = packs, sorted(packs), by_mailbox
            # (max_id, first), sorted: the packs an id lookup may need are
            # those whose highest id reaches the lowest id asked, the newest
            # ones mostly (ids rise with the clock).
            self._by_max_id = by_max_id

    @staticmethod
    def top_id(db) -> bytes | None:
        """The highest clock id stored, packed or not (store/ids.py's ceiling at start)."""
        packed = db.execute("SELECT max(max_id) FROM packs").fetchone()[0] or b""
        table = db.execute("SELECT max(msg_id) FROM messages WHERE msg_id < ?", (CLOCK_BOUND,)).fetchone()[0]
        return max(packed, table or b"") or None

    def __bool__(self) -> bool:
        return bool(self._packs)

    def reload_if_stale(self, db) -> None:
        """Before a write: the directory a failed rollback could not re-read, read now."""
        if self.stale:
            self.load(db)

    # --- writes (in the writer's open transaction, under the commit lock) ---------

    def store(self, db, rows: list[StoredMessage], threshold: int,
              recheck: set[bytes] | None) -> tuple[list[StoredMessage], int, int]:
        """Write the runs of `rows` that make packs; the rows left for the
        message table, how many rows were left out as duplicates, and the
        packed bodies' bytes.  recheck: ids that may be stored already (the
        rest surely are not): one found in the table or a pack is left out."""
        skipped = 0
        # (not the usual: ids a sender made before others' stored ones.  With
        # no pack stored and none to write, the table's unique index does it.)
        if recheck and (self._packs or len(rows) >= self.min_rows):
            present = self._stored_among(db, [r.msg_id for r in rows if r.msg_id in recheck])
            if present:
                kept = [r for r in rows if r.msg_id not in present]
                skipped, rows = len(rows) - len(kept), kept
        if len(rows) < self.min_rows:
            return rows, skipped, 0
        ids = list(map(field_msg_id, rows))
        if len(set(ids)) != len(ids):  # an id repeated: the first is kept, as the table's index would
            kept, seen = [], set()
            for r in rows:
                if r.msg_id not in seen:
                    seen.add(r.msg_id)
                    kept.append(r)
            skipped, rows = skipped + len(rows) - len(kept), kept
        rest: list[StoredMessage] = []
        nbytes = 0
        for mailbox, packable, run in _runs(rows, threshold):
            run = list(run)
            if not packable or len(run) < self.min_rows or not _consecutive(run):
                rest += run
                continue
            for at in range(0, len(run), MAX_ROWS):
                part = run[at:at + MAX_ROWS]
                if len(part) < self.min_rows:
                    rest += part
                else:
                    nbytes += self._write_pack(db, mailbox, part)
        return rest, skipped, nbytes

    def _write_pack(self, db, mailbox: int, rows: list[StoredMessage]) -> int:
        """INSERT the pack; its bodies' bytes."""
        first, last = rows[0].seq, rows[-1].seq
        ids = list(map(field_msg_id, rows))
        headers = list(map(_headers, rows))
        bodies = list(map(field_body, rows))
        sizes = list(map(len, bodies))
        data = [bodies, list(map(_created, rows)), list(map(_deliveries, rows)), headers if any(headers) else None]
        nbytes = sum(sizes)
        db.execute(_INSERT, (first, last, mailbox, min(ids), max(ids), nbytes, _pack(ids), _pack(sizes), _pack(data)))
        p = Pack(first, last, mailbox, min(ids), max(ids))
        with self.lock:
            self._packs[first] = p
            if not self._firsts or first > self._firsts[-1]:
                self._firsts.append(first)
            else:
                insort(self._firsts, first)
            mine = self._by_mailbox.setdefault(mailbox, [])
            if not mine or first > mine[-1]:
                mine.append(first)
            else:
                insort(mine, first)
            key = (p.max_id, first)
            if not self._by_max_id or key > self._by_max_id[-1]:
                self._by_max_id.append(key)
            else:
                insort(self._by_max_id, key)
        return nbytes

    def delete(self, db, seq_runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Take these runs of seqs out of the packs that hold them; the runs
        not wholly inside packs, whole (for the message table)."""
        if not self._packs:
            return seq_runs
        rest = []
        for lo, hi in seq_runs:
            covered = 0
            for p in self._overlapping(lo, hi):
                a, b = max(lo, p.first), min(hi, p.last)
                covered += b - a + 1
                new = [s for s in range(a, b + 1) if s not in p.gone] if p.gone else list(range(a, b + 1))
                if not new:
                    continue
                if len(p.gone) + len(new) > p.last - p.first:  # every seq gone: the pack goes
                    self._drop(db, p)
                else:
                    db.executemany("INSERT INTO pack_gone (first, lo, hi) VALUES (?, ?, ?)",
                                   [(p.first, x, y) for x, y in runs(new)])
                    with self.lock:
                        p.gone.update(new)
            if covered < hi - lo + 1:
                rest.append((lo, hi))
        return rest

    def _overlapping(self, lo: int, hi: int) -> list[Pack]:
        firsts, packs = self._firsts, self._packs
        out = []
        i = bisect_right(firsts, hi) - 1
        while i >= 0:
            p = packs[firsts[i]]
            if p.last < lo:
                break  # (packs do not overlap: the ones before end earlier)
            out.append(p)
            i -= 1
        return out

    def _drop(self, db, p: Pack) -> None:
        db.execute("DELETE FROM packs WHERE first=?", (p.first,))
        db.execute("DELETE FROM pack_gone WHERE first=?", (p.first,))
        if p.counts:
            db.execute("DELETE FROM pack_deliveries WHERE seq>=? AND seq<=?", (p.first, p.last))
        with self.lock:
            del self._packs[p.first]
            del self._firsts[bisect_left(self._firsts, p.first)]
            mine = self._by_mailbox[p.mailbox]
            del mine[bisect_left(mine, p.first)]
            del self._by_max_id[bisect_left(self._by_max_id, (p.max_id, p.first))]
            if not mine:
                del self._by_mailbox[p.mailbox]

    def set_deliveries(self, db, items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Record the (count, seq) pairs of packed seqs; the pairs left for
        the message table."""
        if not self._packs:
            return items
        rest, mine = [], []
        for count, seq in items:
            p = self.holding(seq)
            if p is None:
                rest.append((count, seq))
            elif seq not in p.gone:
                mine.append((seq, p.first, count))
        if mine:
            db.executemany("INSERT OR REPLACE INTO pack_deliveries (seq, first, count) VALUES (?, ?, ?)", mine)
            with self.lock:
                for seq, first, count in mine:
                    self._packs[first].counts[seq] = count
        return rest

    def drop_mailbox(self, db, mailbox: int) -> None:
        for first in list(self._by_mailbox.get(mailbox, ())):
            self._drop(db, self._packs[first])

    def _stored_among(self, db, msg_ids: list[bytes]) -> set[bytes]:
        """The ids among these that the writer's transaction holds (table or packs)."""
        if not msg_ids:
            return set()
        query = lambda sql, args: db.execute(sql, args).fetchall()  # noqa: E731
        return {m for _, _, m in chain(table_ids_at(query, msg_ids), self.ids_at(query, msg_ids))}

    # --- reads ----------------------------------------------------------------------

    def holding(self, seq: int) -> Pack | None:
        with self.lock:
            firsts = self._firsts
            i = bisect_right(firsts, seq) - 1
            if i < 0:
                return None
            p = self._packs[firsts[i]]
        return p if seq <= p.last else None

    def _rows(self, query: Callable, p: Pack) -> list[tuple] | None:
        """Every row of a committed pack, as it was written (None: not committed)."""
        cached = self._cached
        if cached is not None and cached[0] == p.first:
            return cached[1]
        found = query("SELECT ids, data FROM packs WHERE first=?", (p.first,))
        if not found:
            return None
        try:
            ids, (bodies, created, deliveries, headers) = decode_pack(p.first, p.last, *found[0])
        except DamagedPack as exc:
            self._lost(p, exc)
            self._cached = (p.first, [])
            return []
        rows = list(zip(range(p.first, p.last + 1), repeat(p.mailbox), ids, headers or repeat(b""), bodies,
                        created, repeat(None), deliveries))
        self._cached = (p.first, rows)
        return rows

    def _lost(self, p: Pack, exc: DamagedPack) -> None:
        """A pack that cannot be read: its messages are not delivered (nor
        found by id); every other pack and row is served as before."""
        if p.first not in self._damaged:
            self._damaged.add(p.first)
            log.error("messages %d..%d of mailbox #%d are lost: %s (a damaged page of the database; "
                      "`relay --check-config` counts them)", p.first, p.last, p.mailbox, exc)

    def _live(self, rows: list[tuple], p: Pack, after: int = -1) -> Iterator[tuple]:
        """The pack's rows not gone, with seq > after, their counts set."""
        start = max(0, after + 1 - p.first)
        gone, counts = p.gone, p.counts
        for r in rows[start:] if start else rows:
            seq = r[0]
            if gone and seq in gone:
                continue
            if counts and seq in counts:
                r = (*r[:7], counts[seq])
            yield r

    def rows_at(self, query: Callable, seqs: list[int]) -> dict[int, StoredMessage]:
        """The committed packed rows among these seqs, by seq."""
        by_pack: dict[int, list[int]] = {}
        for seq in seqs:
            p = self.holding(seq)
            if p is not None:
                by_pack.setdefault(p.first, []).append(seq)
        out = {}
        for first, mine in by_pack.items():
            p = self._packs.get(first)
            rows = self._rows(query, p) if p is not None else None
            if rows is None:
                continue
            wanted = set(mine)
            for r in self._live(rows, p):
                if r[0] in wanted:
                    out[r[0]] = new_row(StoredMessage, r)
        return out

    def ready(self, query: Callable, mailbox: int, after_seq: int) -> Iterator[tuple]:
        """The mailbox's committed packed rows with seq > after_seq, by seq (lazily: a pack is read when reached)."""
        with self.lock:
            mine = self._by_mailbox.get(mailbox, ())
            # from the pack that may hold after_seq + 1 on (packs do not overlap)
            mine = mine[max(0, bisect_right(mine, after_seq) - 1):]
        for first in mine:
            p = self._packs.get(first)
            if p is None or p.last <= after_seq:
                continue
            rows = self._rows(query, p)
            if rows is not None:
                yield from self._live(rows, p, after_seq)

    def has_mailbox(self, mailbox: int) -> bool:
        return mailbox in self._by_mailbox

    def ids_at(self, query: Callable, msg_ids: list[bytes]) -> list[tuple[int, int, bytes]]:
        """(seq, mailbox, msg_id) of the packed rows not gone with these ids."""
        if not self._packs:
            return []
        clock = [m for m in msg_ids if m < CLOCK_BOUND]  # (packs hold no other)
        if not clock:
            return []
        lo, hi = min(clock), max(clock)
        with self.lock:
            packs, by_max_id = self._packs, self._by_max_id
            candidates = [packs[first] for _, first in islice(by_max_id, bisect_left(by_max_id, (lo,)), None)
                          if packs[first].min_id <= hi]
        wanted = set(clock)
        out = []
        for p in candidates:
            found = query("SELECT ids FROM packs WHERE first=?", (p.first,))
            if not found:
                continue
            try:
                ids = decode_ids(p.first, p.last, found[0][0])
            except DamagedPack as exc:
                self._lost(p, exc)
                continue
            for seq, msg_id in enumerate(ids, p.first):
                if msg_id in wanted and seq not in p.gone:
                    out.append((seq, p.mailbox, msg_id))
        return out

    @staticmethod
    def stats(query: Callable) -> dict[int, tuple[int, int]]:
        """mailbox id -> (live packed messages, their body bytes), as committed
        (read through `query` alone: the directory holds writes not committed)."""
        gone = _gone(query)
        out: dict[int, tuple[int, int]] = {}
        for first, last, mailbox, nbytes in query("SELECT first, last, mailbox, nbytes FROM packs"):
            out_of = gone.get(first)
            n = last - first + 1
            if out_of:  # (the sizes alone are read, not the bodies)
                n -= len(out_of)
                try:
                    sizes = _checked(msgpack.unpackb(query("SELECT sizes FROM packs WHERE first=?", (first,))[0][0]),
                                     (int,), last - first + 1)
                except (DamagedPack, *_UNPACK_ERRORS):
                    sizes = ()  # (a damaged pack: its bytes counted whole; its reads say so)
                nbytes -= sum(size for seq, size in enumerate(sizes, first) if seq in out_of)
            n0, b0 = out.get(mailbox, (0, 0))
            out[mailbox] = (n0 + n, b0 + nbytes)
        return out


def packed_rows(db) -> Iterator[tuple[int, bytes]]:
    """(seq, msg_id) of every message the packs of a database hold (for the
    relay's check and for tests that read a database; none before schema 3)."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name='packs'").fetchall():
        return
    gone = _gone(db.execute)
    for first, last, packed in db.execute("SELECT first, last, ids FROM packs").fetchall():
        out = gone.get(first, ())
        try:
            ids = decode_ids(first, last, packed)
        except DamagedPack:
            continue  # (damaged_packs() counts them)
        for seq, msg_id in enumerate(ids, first):
            if seq not in out:
                yield seq, msg_id


def damaged_packs(db) -> tuple[int, int]:
    """(packs, messages not deleted) that cannot be read: a damaged page of
    the database (SQLite keeps no checksum of a row).  Reads every pack."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name='packs'").fetchall():
        return 0, 0
    gone = _gone(db.execute)
    packs = messages = 0
    for first, last, ids, data in db.execute("SELECT first, last, ids, data FROM packs"):
        try:
            decode_pack(first, last, ids, data)
        except DamagedPack:
            packs += 1
            messages += last - first + 1 - len(gone.get(first, ()))
    return packs, messages


class DamagedPack(ValueError):
    """A pack's blobs are not what _write_pack() wrote."""


# What msgpack raises on bytes it cannot read (ExtraData is a ValueError).
_UNPACK_ERRORS = (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException)


def decode_ids(first: int, last: int, ids: bytes) -> list:
    """A pack's ids, checked (DamagedPack)."""
    try:
        return _checked(msgpack.unpackb(ids), (bytes,), last - first + 1)
    except DamagedPack as exc:
        raise DamagedPack(f"pack {first}: its ids: {exc}") from None
    except _UNPACK_ERRORS as exc:
        raise DamagedPack(f"pack {first}: its ids cannot be read ({type(exc).__name__})") from None


def decode_pack(first: int, last: int, ids: bytes, data: bytes) -> tuple[list, list]:
    """(ids, [bodies, created, deliveries, headers or None]) of a pack, each
    list checked for its length and its items' types, so that a damaged
    pack costs its own messages, never the relay (DamagedPack)."""
    n = last - first + 1
    checked_ids = decode_ids(first, last, ids)
    try:
        bodies, created, deliveries, headers = fields = msgpack.unpackb(data)
        _checked(bodies, (bytes,), n)
        _checked(created, (float, int), n)
        _checked(deliveries, (int,), n)
        if headers is not None:
            _checked(headers, (bytes,), n)
    except DamagedPack as exc:
        raise DamagedPack(f"pack {first}: its data: {exc}") from None
    except _UNPACK_ERRORS as exc:
        raise DamagedPack(f"pack {first}: its data cannot be read ({type(exc).__name__})") from None
    return checked_ids, fields


def _checked(values, kinds: tuple, n: int) -> list:
    """`values`, if it is a list of `n` items of these exact types (a bool is no int)."""
    if type(values) is not list or len(values) != n or not set(map(type, values)) <= set(kinds):
        raise DamagedPack(f"a list of {n} {'/'.join(k.__name__ for k in kinds)} expected")
    return values


def stored_ids(db) -> set[bytes]:
    """Every stored message's id, packed or not."""
    return {r[0] for r in db.execute("SELECT msg_id FROM messages")} | {m for _, m in packed_rows(db)}


def stored_count(db) -> int:
    """How many messages a database holds, packed or not."""
    return db.execute("SELECT count(*) FROM messages").fetchone()[0] + sum(1 for _ in packed_rows(db))


def _gone(query: Callable) -> dict[int, set[int]]:
    """pack (its first seq) -> the seqs deleted from it, from `pack_gone` through `query(sql)`."""
    gone: dict[int, set[int]] = {}
    for first, lo, hi in query("SELECT first, lo, hi FROM pack_gone"):
        gone.setdefault(first, set()).update(range(lo, hi + 1))
    return gone


def _consecutive(run: list[StoredMessage]) -> bool:
    seqs = list(map(field_seq, run))
    return seqs[-1] - seqs[0] == len(seqs) - 1 and all(map(int.__lt__, seqs, seqs[1:]))


# StoredMessage's other fields as functions in C (base.py has the first ones)
_mailbox, _headers, _created, _expires, _deliveries = (itemgetter(i) for i in (1, 3, 5, 6, 7))


def _runs(rows: list[StoredMessage], threshold: int):
    """(mailbox, may it be packed?, its rows) for each run of rows of one
    mailbox and kind.  A packed row has no expiry (the expiry index is the
    table's), its body is kept in the database (a segment's bytes are
    counted by row) and its id is a clock id (see the module's doc)."""
    if (list(map(_expires, rows)).count(None) == len(rows) and max(map(len, map(field_body, rows))) < threshold
            and max(map(field_msg_id, rows)) < CLOCK_BOUND):
        for mailbox, run in groupby(rows, _mailbox):  # (the usual: every row may be; the key in C)
            yield mailbox, True, run
        return
    for (mailbox, packable), run in groupby(
            rows, lambda r: (r[1], r[6] is None and len(r[4]) < threshold and r[2] < CLOCK_BOUND)):
        yield mailbox, packable, run

