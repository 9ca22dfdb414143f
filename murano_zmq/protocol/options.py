"""Mailbox options, as a DECLARE carries them and the relay stores them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .constants import MAX_LIMIT, OVERFLOW_REJECT, OVERFLOWS
from .message import check_name, is_number, is_whole


@dataclass(frozen=True, slots=True)
class MailboxOptions:
    """What a declare may set.  None means "no limit" / "never".

    ttl: seconds without consumers and traffic before the mailbox is deleted.
    message_ttl: seconds a message lives when its sender gave no ttl.
    max_length / max_bytes: ready messages / body bytes the mailbox holds.
    overflow: what a full mailbox does with a new message: "reject" it
      (the sender gets MailboxFull) or "drop-head" (drop the oldest ready one).
    dead_letter: mailbox that receives expired, dropped and rejected messages.
    delivery_limit: deliveries a message may have; one that comes back after
      that many (NACK with requeue, or its consumer gone) leaves as a dead
      letter (reason "delivery_limit") instead: a poison message does not
      go round for ever at the head of its mailbox.
    """

    ttl: float | None = None
    message_ttl: float | None = None
    max_length: int | None = None
    max_bytes: int | None = None
    overflow: str = OVERFLOW_REJECT
    dead_letter: str | None = None
    delivery_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("ttl", "message_ttl"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_length", "max_bytes"):
            value = getattr(self, name)
            if value is not None and not (is_whole(value) and 0 <= value <= MAX_LIMIT):
                raise ValueError(f"{name} must be a whole number from 0 to {MAX_LIMIT}, got {value!r}")
        limit = self.delivery_limit
        if limit is not None and not (is_whole(limit) and 1 <= limit <= MAX_LIMIT):
            raise ValueError(f"delivery_limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOWS)}, got {self.overflow!r}")
        if self.dead_letter is not None:
            try:
                check_name(self.dead_letter, "dead-letter mailbox")
            except Exception as exc:
                raise ValueError(str(exc)) from None

    def check_for(self, mailbox: str) -> None:
        """ValueError if these options do not suit `mailbox`: one that
        dead-letters to itself would drop its dead letters
        (relay/deadletters.py), surely not what was meant."""
        if self.dead_letter == mailbox:
            raise ValueError(f"mailbox {mailbox!r} cannot be its own dead-letter mailbox "
                             "(its dead letters would be dropped)")

    def to_map(self) -> dict:
        # Not asdict(): it deep-copies each value (all scalars here), and a
        # CONSUME's reply and every status entry build this map.
        values = ((name, getattr(self, name)) for name in self.__dataclass_fields__)
        return {name: value for name, value in values if value is not None}

    @classmethod
    def from_stored(cls, data: Any) -> tuple["MailboxOptions", str | None]:
        """Options as a store holds them: checked when they were declared,
        maybe by an older release with looser rules (a dead-letter name
        ending in a newline passed before session 21).  Those that fail
        today's checks are kept as stored, not refused, and the second item
        says why (for a warning); an unknown option is left out."""
        try:
            return cls.from_map(data), None
        except ValueError as exc:
            options = cls()
            for name, value in (data.items() if isinstance(data, dict) else ()):
                if name in cls.__dataclass_fields__:
                    object.__setattr__(options, name, value)  # (frozen: as stored, unchecked)
            return options, str(exc)

    @classmethod
    def from_map(cls, data: Any) -> "MailboxOptions":
        """Options from a DECLARE map; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("options must be a map")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown mailbox option(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(**data)
