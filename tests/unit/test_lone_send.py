"""A lone send's shortcut through NodeCore (NodeCore._send_alone and
PathTable.relay_only): taken only where the general routing would give the
relay the record with nothing to look up, and leaving the same state."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from murano_zmq.node.common import build_record
from murano_zmq.node.core import NodeCore
from murano_zmq.protocol.client import Confirmed
from murano_zmq.protocol.errors import MessageTooLarge
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.paths import LOOKUP_TTL, PathTable

from test_node_core import T0, FakeFabric, Waiter  # (tests/unit is on sys.path: no package)

pytestmark = pytest.mark.timeout(60)


def _table(endpoints, discovered, pending, learned, unconfirmed, undrained, relay_up) -> PathTable:
    table = PathTable()
    table.relay_up = relay_up
    if learned is not None:
        table.looked_up("m", {"depth": 5, "direct": [["n", e] for e in endpoints]}, learned)
    if discovered:
        table.discovered("m", {"tcp://d:1"}, T0)
    path = table._path("m")
    path.lookup_pending = pending
    path.relay_unconfirmed = unconfirmed
    path.relay_undrained = undrained
    return table


@pytest.mark.parametrize("endpoints,discovered,pending,learned,unconfirmed,undrained,relay_up", list(itertools.product(
    [[], ["tcp://a:1"]], [False, True], [False, True], [None, T0 - 1, T0 - LOOKUP_TTL - 1], [0, 2],
    [False, True], [False, True])))
def test_relay_only_says_yes_only_where_choose_gives_the_relay_and_no_lookup_is_due(
        endpoints, discovered, pending, learned, unconfirmed, undrained, relay_up):
    args = (endpoints, discovered, pending, learned, unconfirmed, undrained, relay_up)
    expected = not endpoints and not discovered and not pending and learned == T0 - 1
    assert _table(*args).relay_only("m", T0) == expected
    if expected:
        table = _table(*args)
        assert table.choose("m", lambda e: True, T0) is None
        assert table.wants_lookup("m", T0) is False


def test_relay_only_for_a_mailbox_never_looked_up_is_no():
    assert PathTable().relay_only("m", T0) is False


def _looked_up(tmp_path) -> tuple[FakeFabric, list]:
    """A fabric whose sender's first send asked LOOKUP and the relay
    answered (no direct consumer); and what each _send_alone call returned."""
    net = FakeFabric(tmp_path)
    [first] = net.send("first")  # held back until the LOOKUP's answer, then to the relay
    net.turns(10, until=first.done)
    assert net.sender.paths.relay_only("fifo", net.now)
    taken: list = []
    general = net.sender._send_alone
    net.sender._send_alone = lambda pair, now: taken.append(general(pair, now)) or taken[-1]
    return net, taken


def test_a_lone_send_takes_the_shortcut_and_is_confirmed_as_by_the_general_path(tmp_path):
    net, taken = _looked_up(tmp_path)
    paths = net.sender.paths
    for n in range(5):
        before = net.relay_sends
        [waiter] = net.send(n)
        net.turn()
        assert taken[-1] is True, "a lone send in the usual case takes the shortcut"
        assert net.relay_sends == before + 1
        assert waiter.done() and waiter.error is None and len(waiter.result) == 16
        assert paths._path("fifo").relay_unconfirmed == 0, "the confirm counted down what the send counted"
    assert net.sender.sent == {"direct": 0, "relay": 6}


def test_two_sends_in_one_turn_take_the_general_path(tmp_path):
    net, taken = _looked_up(tmp_path)
    waiters = net.send(1, 2)
    net.turn()
    assert taken == [] and all(w.done() and w.error is None for w in waiters)


def test_a_record_over_the_relays_limit_still_fails_as_the_general_path_fails_it():
    core = NodeCore("n", b"n" * 16, 1.0)
    core.relay_connected(T0)
    core.relay_out(T0)
    core.relay_frames(encode(Cmd.WELCOME, "relay", 1.0, 100), T0)
    core.sender.paths.looked_up("m", {"depth": 0, "direct": []}, T0)
    waiter = Waiter()
    core.route(deque([(build_record("m", b"x" * 200, None, None, T0, None), waiter)]), T0)
    assert isinstance(waiter.error, MessageTooLarge)
    assert [decode(f).cmd for f in core.relay_out(T0)] == [], "nothing went to the relay"
    assert core.sender.paths._path("m").relay_unconfirmed == 0


def test_the_shortcut_leaves_what_the_general_path_leaves():
    """The same lone send routed by a core with the shortcut and by one
    without: the same SEND frame, path table counts and bookkeeping."""
    cores = []
    for shortcut in (True, False):
        core = NodeCore("n", b"n" * 16, 1.0)
        if not shortcut:
            core._send_alone = lambda pair, now: False
        core.relay_connected(T0)
        core.relay_out(T0)
        core.relay_frames(encode(Cmd.WELCOME, "relay", 1.0, 1 << 20), T0)
        core.sender.paths.looked_up("m", {"depth": 3, "direct": []}, T0)
        record = build_record("m", b"body", None, 5.0, T0, None, msg_id=b"i" * 16)
        core.route(deque([(record, Waiter())]), T0 + 1)
        assert record[5] == 4.0  # (its ttl counted from its making, on either path)
        cores.append(core)
    a, b = cores
    assert a.relay_out(T0 + 1) == b.relay_out(T0 + 1)
    assert a.sender.paths._path("m") == b.sender.paths._path("m")
    assert a._relay_sends == b._relay_sends and a.sent == b.sent
    assert list(a.dispatch.sends) == list(b.dispatch.sends)
    assert a.session.unconfirmed == b.session.unconfirmed == 1
    events = a.session.receive(encode(Cmd.CONFIRM, 1, []), T0 + 1)
    assert events == [Confirmed(1, {})]


def test_a_lone_send_whose_ttl_passed_on_its_way_fails_as_the_general_path_fails_it():
    """The shortcut sent it with its whole ttl, where take_batch fails it."""
    from murano_zmq.protocol.errors import RelayUnavailable

    core = NodeCore("n", b"n" * 16, 1.0)
    core.relay_connected(T0)
    core.relay_out(T0)
    core.relay_frames(encode(Cmd.WELCOME, "relay", 1.0, 1 << 20), T0)
    core.sender.paths.looked_up("m", {"depth": 0, "direct": []}, T0)
    waiter = Waiter()
    core.route(deque([(build_record("m", b"x", None, 2.0, T0 - 5, None), waiter)]), T0)  # (made 5 s before)
    assert isinstance(waiter.error, RelayUnavailable) and "its ttl passed" in str(waiter.error)
    assert Cmd.SEND not in [decode(f).cmd for f in core.relay_out(T0)], "it went to the relay"


def _ready_core(limit: int = 1 << 20) -> NodeCore:
    """A core with a relay session up and mailbox "m" looked up (no direct consumer)."""
    core = NodeCore("n", b"n" * 16, 1.0)
    core.relay_connected(T0)
    core.relay_out(T0)
    core.relay_frames(encode(Cmd.WELCOME, "relay", 1.0, limit), T0)
    core.sender.paths.looked_up("m", {"depth": 3, "direct": []}, T0)
    return core


def test_send_now_gives_the_frames_route_and_relay_out_would_write():
    """NodeCore.send_now(), the runners' way for a lone send: the same
    SEND, path counts and bookkeeping as route() then relay_out(), and the
    frames count as written (the next heartbeat is due a heartbeat later)."""
    a, b = _ready_core(), _ready_core()
    record_a = build_record("m", b"body", None, 5.0, T0, None, msg_id=b"i" * 16)
    record_b = list(record_a)
    frames = a.send_now((record_a, Waiter()), T0 + 1)
    b.route(deque([(record_b, Waiter())]), T0 + 1)
    assert [frames] == b.relay_out(T0 + 1)
    assert record_a == record_b and record_a[5] == 4.0
    assert a.relay_out(T0 + 1) == [], "nothing left to write"
    assert a.sender.paths._path("m") == b.sender.paths._path("m")
    assert a._relay_sends == b._relay_sends and a.sent == b.sent
    assert list(a.dispatch.sends) == list(b.dispatch.sends)
    assert a.session.unconfirmed == b.session.unconfirmed == 1
    assert a.next_deadline() == b.next_deadline()


@pytest.mark.parametrize("ahead", ["ack", "request", "relay queue", "held", "not ready", "over the limit",
                                   "new mailbox"])
def test_send_now_declines_with_nothing_changed_when_output_or_a_decision_waits(ahead):
    """Whatever must go out first, or needs the general routing, makes
    send_now() say None and change nothing: the record (its ttl too) and
    every count are as before, for route() to take."""
    core = _ready_core(limit=100)
    mailbox, body = "m", b"x"
    if ahead == "ack":
        core.session._pending_acks.append(7)
    elif ahead == "request":
        core.request(Cmd.STATUS, waiter=Waiter())
    elif ahead == "relay queue":
        core._relay_queue.append((build_record("m", b"q", None, None, T0, None), Waiter()))
    elif ahead == "held":
        core._held.append((build_record("m", b"h", None, None, T0, None), Waiter()))
    elif ahead == "not ready":
        core.relay_dropped()
        core.session.state = type(core.session.state).CONNECTING
    elif ahead == "over the limit":
        body = b"x" * 200
    elif ahead == "new mailbox":
        mailbox = "never.looked.up"
    record = build_record(mailbox, body, None, 5.0, T0, None)
    before = (list(record), core.session._next_req, dict(core.dispatch.sends), core.sent.copy(),
              core.session.unconfirmed)
    assert core.send_now((record, Waiter()), T0 + 1) is None
    assert (record, core.session._next_req, dict(core.dispatch.sends), core.sent, core.session.unconfirmed) \
        == before


def test_take_confirm_takes_only_the_usual_confirm_and_receive_the_rest():
    """ClientCore.take_confirm(): the request id of a CONFIRM with no errors
    of a SEND awaiting it (settled); None with nothing changed for a confirm
    with errors, of a request not awaited, or of a replay that left records
    out, and for any other command; receive() answers those as before."""
    from murano_zmq.protocol.errors import RemoteProtocolError

    core = _ready_core()
    session = core.session
    reqs = [session.send([build_record("m", b"x", None, None, T0, None)], T0) for _ in range(3)]
    assert session.take_confirm(encode(Cmd.CONFIRM, reqs[0], []), T0 + 1) == reqs[0]
    assert session.unconfirmed == 2 and session._last_heard == T0 + 1
    assert session.take_confirm(encode(Cmd.CONFIRM, reqs[0], []), T0 + 2) is None, "confirmed already"
    assert session.receive(encode(Cmd.CONFIRM, reqs[0], []), T0 + 2) == []
    with_error = encode(Cmd.CONFIRM, reqs[1], [[0, 413, "too large"]])
    assert session.take_confirm(with_error, T0 + 3) is None and session.unconfirmed == 2
    [event] = session.receive(with_error, T0 + 3)
    assert event.req == reqs[1] and 0 in event.errors
    session._left_out[reqs[2]] = ([1], {0: "left out"})
    assert session.take_confirm(encode(Cmd.CONFIRM, reqs[2], []), T0 + 4) is None and session.unconfirmed == 1
    assert session.receive(encode(Cmd.CONFIRM, reqs[2], []), T0 + 4) == [Confirmed(reqs[2], {0: "left out"})]
    assert session.take_confirm(encode(Cmd.HEARTBEAT), T0 + 5) is None
    bad = encode(Cmd.CONFIRM, 99, [])
    bad[2] = b"\xc1"  # (not msgpack)
    assert session.take_confirm(bad, T0 + 5) is None
    with pytest.raises(RemoteProtocolError):
        session.receive(bad, T0 + 5)


def test_a_confirm_read_by_the_core_settles_a_lone_send_and_a_send_many_of_one():
    """NodeCore.relay_frames() on the usual CONFIRM (the shortcut with no
    event): the waiter gets its id, a send_many's group of one record
    resolves, and the path table counts the records down."""
    from murano_zmq.node.common import SendGroup

    core = _ready_core()
    lone = Waiter()
    record = build_record("m", b"x", None, None, T0, None)
    frames = core.send_now((record, lone), T0)
    group_future = Waiter()
    group_record = build_record("m", b"y", None, None, T0, None)
    core.route(deque([(group_record, SendGroup(group_future, [group_record[0]]))]), T0)
    core.relay_out(T0)
    assert core.sender.paths._path("m").relay_unconfirmed == 2
    req = decode(frames).fields[0]
    core.relay_frames(encode(Cmd.CONFIRM, req, []), T0 + 1)
    assert lone.result == record[0] and not group_future.done()
    core.relay_frames(encode(Cmd.CONFIRM, req + 1, []), T0 + 1)
    assert group_future.result == [group_record[0]]
    assert core.sender.paths._path("m").relay_unconfirmed == 0
    assert core.dispatch.sends == {} and core._relay_sends == {}
