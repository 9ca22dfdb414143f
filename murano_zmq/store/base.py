"""The relay's store interface: what the relay engine needs from disk.

Writes are buffered in batches.  seal() closes the current batch; commit()
makes every sealed batch durable in one transaction (group commit: one fsync
for a relay loop turn).  The engine seals only between two operations, so a
message's move (delete here, insert there) is never split across commits.

commit() may run in a thread of its own while the engine goes on writing and
reading: reads see every write made so far, committed or not, and never wait
for a commit in flight.  The engine confirms a send only after the commit
that holds it.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Iterable, NamedTuple, Protocol


class StoredMessage(NamedTuple):
    seq: int  # relay-assigned, increasing: FIFO order and delivery tag
    mailbox_id: int
    msg_id: bytes  # sender-assigned, unique: the dedup key
    headers: bytes  # msgpack map, packed by the sender (empty: none)
    body: bytes  # msgpack value, opaque to the relay
    created: float
    expires: float | None
    deliveries: int  # times handed to a consumer before


# A StoredMessage from its fields as one tuple, made in C: new_row(StoredMessage,
# fields).  StoredMessage(...) runs namedtuple's __new__ in Python, ~2,900
# instructions a row on the pipelined path (bench/callgrind_lone.py pipe),
# and _make() a Python classmethod too.  For the hot paths, whose tuples are
# whole rows by construction.
new_row = tuple.__new__

# StoredMessage's fields as functions in C, for map() and groupby() over a
# batch's rows (a Python loop costs several hundred instructions a row).
field_seq, field_mailbox, field_msg_id = itemgetter(0), itemgetter(1), itemgetter(2)
field_headers, field_body = itemgetter(3), itemgetter(4)


class MailboxRow(NamedTuple):
    id: int
    name: str
    options: dict  # MailboxOptions.to_map()
    declared: bool  # declared explicitly (vs created by a send)


class Store(Protocol):
    # --- at start-up (committed state only) ---

    def load_mailboxes(self) -> list[MailboxRow]: ...

    def mailbox_stats(self) -> dict[int, tuple[int, int]]:
        """mailbox id -> (messages, body bytes)."""

    def max_seq(self) -> int:
        """The highest seq ever stored (not only among live messages)."""

    def reserve_seq(self, seq: int) -> None:
        """Record, durably at once, that seqs up to `seq` may be in use
        (max_seq() never returns less afterwards)."""

    # --- reads (see every write, committed or not) ---

    def get(self, seq: int) -> StoredMessage | None: ...

    def get_many(self, seqs: list[int]) -> list[StoredMessage]:
        """The stored messages among `seqs`, in seq order."""

    def mailboxes_of(self, msg_ids: list[bytes]) -> dict[bytes, int]:
        """Where stored ids are: msg_id -> mailbox id."""

    def load_ready(self, mailbox_id: int, after_seq: int, limit: int,
                   max_bytes: int | None = None) -> list[StoredMessage]:
        """Up to `limit` messages of the mailbox with seq > after_seq, by seq;
        with max_bytes, stop before the bodies pass it (one at least)."""

    def expired(self, now: float, limit: int, after: tuple[float, int] | None = None
                ) -> list[tuple[float, int, int]]:
        """(expires, seq, mailbox id) of messages whose expiry is <= now, by
        (expires, seq), starting after the key `after`."""

    def next_expiry(self, after: float) -> float | None:
        """The earliest expiry later than `after`, or None."""

    # --- writes (buffered until sealed and committed) ---

    def save_mailbox(self, row: MailboxRow) -> None: ...

    def delete_mailbox(self, mailbox_id: int) -> None:
        """Delete the mailbox and every message in it."""

    def insert(self, messages: list[StoredMessage]) -> None:
        """Store new messages.  Their ids must not be stored already (see
        mailboxes_of()); a duplicate is skipped."""

    def delete(self, seqs: Iterable[int]) -> None: ...

    def set_deliveries(self, counts: Iterable[tuple[int, int]]) -> None:
        """Record (deliveries, seq) pairs: the relay writes them on redelivery only."""

    # --- commit ---

    def seal(self) -> None:
        """End the current batch: later writes go to the next commit.  Call
        it from the writing thread, between two operations."""

    def open_deletes(self) -> int | None:
        """How many rows the open batch deletes, if deletes are all it holds;
        None if it holds anything else, or if this store's deletes must not
        wait for a later commit (relay/turn.py holds them)."""

    def held_deletes(self) -> int | None:
        """How many rows the writes not committed yet (sealed, perhaps
        written ahead, and open) delete, if deletes are all they hold; None
        if they hold anything else, or if this store's deletes must not
        wait for a later commit."""

    @property
    def in_transaction(self) -> bool:
        """True while sealed writes wait for commit()."""

    @property
    def writing(self) -> bool:
        """True while a commit's writes hold the writer (a commit now would
        wait for them); False while a commit in flight only syncs."""

    def writable(self) -> bool:
        """A probe: can the store write its files now?"""

    def check_held(self, now: float) -> float:
        """(between commits) StoreError if the store is no longer this
        relay's (another relay took its lock); when to ask again."""

    def commit(self) -> None:
        """Make every sealed batch durable, in one transaction (safe from
        another thread while the writer goes on)."""

    def commit_insert(self, messages: list[StoredMessage]) -> None:
        """insert(), seal() and commit() in one call, from the writing
        thread with no commit in flight: durable when it returns (a lone
        send's path, relay/engine.py send_alone())."""

    def write_owed(self, at_least: int = 1) -> None:
        """(the relay loop) Write what commit_insert() made durable elsewhere
        (the SQLite store's journal), if at least `at_least` rows wait."""

    def close(self) -> None:
        """Seal, commit and close."""
