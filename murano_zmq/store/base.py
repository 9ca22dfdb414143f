"""The relay's store interface: what the relay engine needs from disk.

Writes go into one open transaction that commit() makes durable (group
commit: one fsync for everything a relay loop turn wrote).  The engine
confirms a send only after the commit that holds it.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Protocol


class StoredMessage(NamedTuple):
    seq: int  # relay-assigned, increasing: FIFO order and delivery tag
    mailbox_id: int
    msg_id: bytes  # sender-assigned, unique: the dedup key
    headers: bytes  # msgpack map
    body: bytes  # msgpack value, opaque to the relay
    created: float
    expires: float | None
    deliveries: int  # times handed to a consumer before


class MailboxRow(NamedTuple):
    id: int
    name: str
    options: dict  # MailboxOptions.to_map()
    declared: bool  # declared explicitly (vs created by a send)


class Store(Protocol):
    def load_mailboxes(self) -> list[MailboxRow]: ...

    def mailbox_stats(self) -> dict[int, tuple[int, int]]:
        """mailbox id -> (messages, body bytes)."""

    def reserve_seq(self, seq: int) -> None:
        """Record, durably at once, that seqs up to `seq` may be in use
        (max_seq() never returns less afterwards)."""

    def max_seq(self) -> int:
        """The highest seq ever stored (not only among live messages)."""

    def save_mailbox(self, row: MailboxRow) -> None: ...

    def delete_mailbox(self, mailbox_id: int) -> None:
        """Delete the mailbox and every message in it."""

    def insert(self, messages: list[StoredMessage]) -> int:
        """Store new messages; returns how many were new (an id already
        stored is skipped)."""

    def get(self, seq: int) -> StoredMessage | None: ...

    def mailboxes_of(self, msg_ids: list[bytes]) -> dict[bytes, int]:
        """Where stored ids are: msg_id -> mailbox id."""

    def existing_seqs(self, seqs: list[int]) -> set[int]: ...

    def existing_ids(self, msg_ids: list[bytes]) -> set[bytes]: ...

    def delete(self, seqs: Iterable[int]) -> None: ...

    def load_ready(self, mailbox_id: int, after_seq: int, limit: int) -> list[StoredMessage]:
        """Up to `limit` messages of the mailbox with seq > after_seq, by seq."""

    def set_deliveries(self, counts: Iterable[tuple[int, int]]) -> None:
        """Record (deliveries, seq) pairs: the relay writes them on redelivery only."""

    def expired(self, now: float, limit: int, skip: int = 0) -> list[tuple[int, int]]:
        """(seq, mailbox id) of messages whose expiry is <= now, oldest first,
        after skipping the first `skip` of them."""

    def next_expiry(self, after: float) -> float | None:
        """The earliest expiry later than `after`, or None."""

    @property
    def in_transaction(self) -> bool:
        """True while writes wait for commit()."""

    def commit(self) -> None: ...

    def close(self) -> None: ...
