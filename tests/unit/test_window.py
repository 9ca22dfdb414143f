"""Mailbox.append_tails (a SEND's rows at once) and window_extend (a load's)
keep the counts and the window exactly as append_tail and window_push of
each row would, at the window's bounds too."""

import itertools
import random

from murano_zmq.protocol.options import MailboxOptions
from murano_zmq.relay import state as state_module
from murano_zmq.relay.state import Mailbox
from murano_zmq.store.base import StoredMessage


def state(mb: Mailbox) -> tuple:
    return mb.count, mb.nbytes, list(mb.ready), mb.ready_window_bytes, mb.disk_after


def test_append_tails_is_append_tail_of_each(monkeypatch):
    # A small window, so that every way of reaching its row and byte bounds is tried.
    monkeypatch.setattr(state_module, "READY_WINDOW", 6)
    monkeypatch.setattr(state_module, "READY_WINDOW_BYTES", 40)
    rnd = random.Random(7)
    seqs = itertools.count(1)

    def rows(n: int) -> list[StoredMessage]:
        return [StoredMessage(seq, 1, seq.to_bytes(16, "big"), rnd.choice([b"", b"\x80"]),
                              b"x" * rnd.randint(1, 12), 1.0, None, 0)
                for seq in itertools.islice(seqs, n)]

    for _ in range(3000):
        one, many = (Mailbox(1, "m", MailboxOptions(), False, 0.0) for _ in range(2))
        for step in range(rnd.randint(1, 5)):
            if step and rnd.random() < 0.3:  # a delivery takes some from the window's head
                for mb in (one, many):
                    for _ in range(min(len(mb.ready), 2)):
                        mb.window_pop()
            batch = rows(rnd.randint(1, 7))
            for row in batch:
                one.append_tail(row)
            many.append_tails(batch)
            assert state(many) == state(one), batch


def test_window_extend_is_window_push_of_each():
    rnd = random.Random(11)
    seqs = itertools.count(1)
    one, many = (Mailbox(1, "m", MailboxOptions(), False, 0.0) for _ in range(2))
    for _ in range(200):
        batch = [StoredMessage(seq, 1, seq.to_bytes(16, "big"), rnd.choice([b"", b"\x81\xa1k\x01"]),
                               b"x" * rnd.randint(0, 20), 1.0, None, 0)
                 for seq in itertools.islice(seqs, rnd.randint(0, 5))]
        for row in batch:
            one.window_push(row)
        many.window_extend(batch)
        if rnd.random() < 0.3 and one.ready:
            one.window_pop()
            many.window_pop()
        assert state(many) == state(one)
