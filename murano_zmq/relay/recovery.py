"""The relay engine's start: where message numbering resumes, and the
mailboxes loaded back from the store."""

from __future__ import annotations

import logging

from ..protocol.constants import SEQ_GAP_AFTER_START

log = logging.getLogger("murano_zmq.relay")

__all__ = ["recover"]


def recover(engine, now: float) -> None:
    """Start numbering messages and load the mailboxes (RelayEngine's start)."""
    if engine.fabric is not None:
        # Seqs from a block no other relay numbers in.  A message
        # another relay may have delivered is marked by its claim
        # (store/claims.py), not by its seq.
        engine.delivery.boot_seq = 0
        engine.fabric.shared.release_all()
        engine.boxes.recover(now)
        engine.dead.start(engine.fabric.shared.seq_start())
        return
    # Messages stored before this start may have been out for delivery.
    boot_seq = engine.store.max_seq()
    engine.delivery.boot_seq = boot_seq
    # Deliveries go out before their commit, so a crashed relay may have
    # handed out tags above the last committed seq; a node may still ack
    # one of them.  Numbering past every such tag keeps a late ACK from
    # settling a newer message.
    seq = boot_seq + SEQ_GAP_AFTER_START
    engine.store.reserve_seq(seq)  # durable now: a crash before any commit skips them too
    engine.boxes.recover(now)
    engine.dead.start(seq)
    if engine.boxes.by_name:
        log.info("recovered %d mailboxes, %d messages", len(engine.boxes.by_name),
                 sum(mb.count for mb in engine.boxes.by_name.values()))
