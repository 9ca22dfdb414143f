"""ClientCore's CONFIRM: the usual one (no errors) takes a short way past
decode(); every other shape goes the general way, with the same checks."""

from __future__ import annotations

import os

import msgpack
import pytest

from murano_zmq.protocol.client import ClientCore, Confirmed, RelayLost
from murano_zmq.protocol.constants import ACK_EARLY_MIN_PREFETCH, DEFAULT_HEARTBEAT, HEARTBEAT_LIVENESS, SIGNATURE
from murano_zmq.protocol.errors import RemoteProtocolError
from murano_zmq.protocol.frames import Cmd, encode
from murano_zmq.protocol.message import new_message_id, pack_body, send_record

CONFIRM = bytes([Cmd.CONFIRM])


def ready_core() -> ClientCore:
    core = ClientCore("n", os.urandom(16))
    core.connection_made(0.0)
    core.receive(encode(Cmd.WELCOME, "relay", 5.0, 1 << 20), 0.0)
    return core


def record(now: float) -> list:
    return send_record(new_message_id(now), "m", b"", pack_body(b"x"), now, None)


def test_a_confirm_without_errors_settles_its_send_once():
    core = ready_core()
    first, second = core.send([record(1.0)], 1.0), core.send([record(1.0)], 1.0)
    assert core.receive(encode(Cmd.CONFIRM, first, []), 6.0) == [Confirmed(first, {})]
    silent_for = core.heartbeat * HEARTBEAT_LIVENESS
    assert 6.0 > silent_for, "(else the tick below proves nothing)"
    assert not any(isinstance(ev, RelayLost) for ev in core.tick(6.0 + silent_for - 0.01)), \
        "a CONFIRM counts as word from the relay"
    assert core.receive(encode(Cmd.CONFIRM, first, []), 3.0) == [], "a resend's second CONFIRM"
    assert core.unconfirmed == 1
    [confirmed] = core.receive(encode(Cmd.CONFIRM, second, [[0, 413, "too large"]]), 3.0)
    assert confirmed.req == second and list(confirmed.errors) == [0]
    assert core.unconfirmed == 0


@pytest.mark.parametrize("frames", [
    [SIGNATURE, CONFIRM, msgpack.packb([True, []])],  # a bool is no request id
    [SIGNATURE, CONFIRM, msgpack.packb([1, "x"])],
    [SIGNATURE, CONFIRM, msgpack.packb([1])],
    [SIGNATURE, CONFIRM, b"\xc1"],  # not msgpack
    [SIGNATURE, CONFIRM, msgpack.packb([1, []]), b"more"],
    [b"ZMP9", CONFIRM, msgpack.packb([1, []])],
    [SIGNATURE, CONFIRM, msgpack.packb([1, [[0, 413]]])],  # an error entry short of its text
], ids=["bool-req", "str-errors", "one-field", "bad-msgpack", "four-frames", "signature", "short-entry"])
def test_any_other_confirm_is_refused_and_changes_nothing(frames):
    core = ready_core()
    req = core.send([record(1.0)], 1.0)
    assert req == 1
    with pytest.raises(RemoteProtocolError):
        core.receive(frames, 2.0)
    assert core.unconfirmed == 1


def test_acks_are_due_early_at_half_the_smallest_window():
    """ack_early: half the smallest prefetch, none under
    ACK_EARLY_MIN_PREFETCH, and again when a consumer goes."""
    core = ready_core()
    assert core.ack_early == 0 and not core.acks_due
    big, _ = core.consume("a", 100)
    assert core.ack_early == 50
    small, _ = core.consume("b", ACK_EARLY_MIN_PREFETCH)
    assert core.ack_early == ACK_EARLY_MIN_PREFETCH // 2
    core._pending_acks.extend(range(ACK_EARLY_MIN_PREFETCH // 2 - 1))
    assert not core.acks_due
    core._pending_acks.append(99)
    assert core.acks_due
    core.flush_acks()
    assert not core.acks_due
    core.cancel(small)
    assert core.ack_early == 50
    _, refused = core.consume("c", ACK_EARLY_MIN_PREFETCH - 1)
    assert core.ack_early == 0, "a small window acks at the application's pause"
    core.receive(encode(Cmd.ERROR, refused, 403, "not yours"), 1.0)  # the relay refused that CONSUME
    assert core.ack_early == 50


def test_a_replay_counts_ttls_down_and_leaves_out_records_whose_ttl_passed():
    """A relay counts a ttl from its receipt: a SEND replayed after the relay
    went away carries what is left of its records' ttls; a record whose ttl
    passed meanwhile is left out and fails, the others (the same SEND's
    records without a ttl among them) are replayed."""
    from murano_zmq.protocol.errors import MailboxFull, RelayUnavailable
    from murano_zmq.protocol.frames import decode

    core = ready_core()
    keep = send_record(new_message_id(1.0), "m", b"", pack_body(1), 1.0, 10.0)
    gone = send_record(new_message_id(1.0), "m", b"", pack_body(2), 1.0, 2.0)
    plain = send_record(new_message_id(1.0), "m", b"", pack_body(3), 1.0, None)
    later = send_record(new_message_id(1.0), "m", b"", pack_body(4), 1.0, 4.0)
    alone, mixed = core.send([gone], 1.0), core.send([keep, gone[:], plain, later], 1.0)
    core.drain()
    [failed] = core.connection_made(4.0)  # three seconds later
    assert failed.req == alone and isinstance(failed.errors[0], RelayUnavailable)
    assert "its ttl passed" in str(failed.errors[0])
    [replay] = [decode(f) for f in core.drain() if f[1] == bytes([Cmd.SEND])]
    assert replay.fields[0] == mixed and [r[0] for r in replay.fields[1]] == [keep[0], plain[0], later[0]]
    assert (keep[5], plain[5], later[5]) == (7.0, None, 1.0) and keep[6] is True
    assert core.unconfirmed == 1
    assert core.connection_made(5.5) == []  # (counted from the last replay: `later` passes now)
    [replay] = [decode(f) for f in core.drain() if f[1] == bytes([Cmd.SEND])]
    assert [r[0] for r in replay.fields[1]] == [keep[0], plain[0]] and keep[5] == 5.5
    [confirmed] = core.receive(encode(Cmd.CONFIRM, mixed, [[1, MailboxFull.code, "full"]]), 6.0)
    assert sorted(confirmed.errors) == [1, 2, 3]  # the replay's index 1 is `plain`, the first SEND's 2
    assert isinstance(confirmed.errors[2], MailboxFull)
    assert all(isinstance(confirmed.errors[i], RelayUnavailable) for i in (1, 3))
    assert core.unconfirmed == 0 and not core._left_out and not core._sent_at


def test_with_another_relay_to_try_a_session_without_welcome_is_lost_sooner():
    """A node with several relays waited HEARTBEAT_LIVENESS (5 s) on one that
    refused its connection before it tried the next."""
    from murano_zmq.protocol.constants import MIN_WELCOME_WAIT, WELCOME_LIVENESS

    wait = max(DEFAULT_HEARTBEAT * WELCOME_LIVENESS, MIN_WELCOME_WAIT)
    assert wait < DEFAULT_HEARTBEAT * HEARTBEAT_LIVENESS
    for quick in (False, True):
        core = ClientCore("n", os.urandom(16))
        core.quick_failover = quick
        core.connection_made(0.0)
        lost = [ev for ev in core.tick(wait + 0.01) if isinstance(ev, RelayLost)]
        assert bool(lost) == quick and (not lost or "no WELCOME" in lost[0].reason)
    core.receive(encode(Cmd.WELCOME, "relay", 5.0, 1 << 20), 0.5)  # (a session that is up waits the usual)
    assert not [ev for ev in core.tick(wait + 0.6) if isinstance(ev, RelayLost)]


def test_a_confirm_index_past_a_replay_is_dropped_not_moved():
    """After a replay that left a record out, an index past the replayed
    SEND (a relay's bug) matched the first SEND's record of that number."""
    core = ready_core()
    records = [send_record(new_message_id(1.0), "m", b"", pack_body(i), 1.0, ttl) for i, ttl in
               enumerate([2.0, None, None])]
    req = core.send(records, 1.0)
    core.connection_made(4.0)  # (records[0]'s ttl passed: the replay is records 1 and 2)
    [confirmed] = core.receive(encode(Cmd.CONFIRM, req, [[2, 429, "full"]]), 5.0)
    assert sorted(confirmed.errors) == [0]  # (the left-out record's; index 2 of the replay is no record)
