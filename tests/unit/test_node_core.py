"""NodeCore with no sockets: two node cores and a relay engine on a fake
link, time a number the test moves.  FIFO and exactly-once to the
application across direct -> relay -> direct, and the inbox keeping a
CONFIRM its ROUTER could not pass on."""

from __future__ import annotations

from collections import deque

import pytest

from murano_zmq.node.common import build_record
from murano_zmq.node.core import NodeCore
from murano_zmq.node.links import OPEN
from murano_zmq.protocol.client import State
from murano_zmq.protocol.dedup import DedupWindow
from murano_zmq.protocol.inbox import DirectInbox
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import check_peer_name, pack_body, send_record
from murano_zmq.protocol.paths import HOLD, HOLD_LIMIT, PathTable
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.store.sqlite import SQLiteStore

T0 = 1_000_000.0
STEP = 0.02  # seconds per turn
ENDPOINT = "tcp://consumer:1"


class Waiter:
    """What a runner's future does, minus the waiting."""

    def __init__(self):
        self.result = self.error = None
        self._done = False

    def done(self):
        return self._done

    def set_result(self, value):
        self.result, self._done = value, True

    def set_exception(self, error):
        self.error, self._done = error, True


class FakeFabric:
    """A relay engine, a sender core and a consumer core; one turn moves
    every outbox once, as the runners and the relay loop would."""

    def __init__(self, tmp_path):
        self.now = T0
        self.engine = RelayEngine(SQLiteStore(str(tmp_path / "relay")), self.now)
        self.sender = NodeCore("sender", b"s" * 16, 1.0, direct_timeout=0.5)
        self.consumer = NodeCore("consumer", b"c" * 16, 1.0)
        self.consumer.endpoint = ENDPOINT
        self.cores = {b"consumer": self.consumer, b"sender": self.sender}  # acks reach the relay first
        self.link_identity = b""
        self.links_opened = 0
        self.relay_sends = 0  # SEND commands from the sender to the relay
        self.incoming: deque = deque()
        self.app: list = []  # messages the consumer's application holds, in order
        self.seen: list = []  # bodies handed to the application, in order
        for core in self.cores.values():
            core.relay_connected(self.now)
        self.turns(5)

    def turn(self) -> None:
        self.now += STEP
        now = self.now
        for identity, core in self.cores.items():
            core.tick(now)
            core.route(self.incoming if core is self.sender else (), now)
            if core is self.sender:
                self.incoming = deque()
            for frames in core.relay_out(now):
                if core is self.sender and decode(frames).cmd == Cmd.SEND:
                    self.relay_sends += 1
                self.engine.receive(identity, frames, now)
        self.engine.tick(now)
        self.engine.pump(now)
        out = self.engine.take_output(now)
        self.engine.commit()
        for identity, frames in out + self.engine.take_output(now):
            self.cores[identity].relay_frames(frames, now)
        links = self.sender.links_out(now)
        for op in self.sender.sender.socket_ops:  # a new DEALER: a new routing id
            if op[0] == OPEN:
                self.links_opened += 1
                self.link_identity = b"link-%d" % self.links_opened
        self.sender.sender.socket_ops.clear()
        for endpoint, frames in links:
            assert endpoint == ENDPOINT
            self.consumer.inbox_frames(self.link_identity, frames, now)
        for identity, frames in self.consumer.inbox_out(now):
            if identity == self.link_identity:
                self.sender.link_frames(ENDPOINT, frames, now)

    def turns(self, n: int, until=None) -> None:
        for _ in range(n):
            self.turn()
            if until is not None and until():
                return
        assert until is None, "condition not reached"

    def send(self, *bodies) -> list[Waiter]:
        waiters = []
        for body in bodies:
            waiter = Waiter()
            self.incoming.append((build_record("fifo", body, None, None, self.now, None), waiter))
            waiters.append(waiter)
        return waiters

    def feed(self, messages) -> None:
        self.app.extend(messages)
        self.seen.extend(m.body for m in messages)

    def ack_all(self) -> None:
        while self.app:
            self.consumer.settle(self.app.pop(0), "ack", False)


def test_fifo_and_exactly_once_across_direct_relay_direct(tmp_path):
    net = FakeFabric(tmp_path)
    net.consumer.consume("fifo", 1000, True, net.feed, Waiter())
    net.turns(5)
    direct = net.sender.paths
    body = iter(range(10_000))
    waiters: list[Waiter] = []

    def stream_until(condition, turns: int = 400) -> None:
        """Send one message a turn (the application acks) until `condition`."""
        for _ in range(turns):
            if condition():
                return
            waiters.extend(net.send(next(body)))
            net.turn()
            net.ack_all()
        raise AssertionError("condition not reached")

    def stream(n: int) -> None:
        for _ in range(n):
            waiters.extend(net.send(next(body)))
            net.turn()
            net.ack_all()

    # 1. Relay first (nothing known yet), then direct once LOOKUP says drained.
    stream_until(lambda: net.links_opened == 1)
    stream(5)
    before = net.relay_sends
    stream(30)
    assert direct.is_direct("fifo") and net.relay_sends == before, "direct: the relay sees none"

    # 2. The consumer's application stalls: the link times out, its
    # unconfirmed records and those behind them take the relay, in order.
    acking, net.ack_all = net.ack_all, lambda: None
    stream_until(lambda: not direct.is_direct("fifo"), turns=200)
    stream(20)
    net.turns(60)  # relay copies of what the application holds arrive: not handed out twice
    net.ack_all = acking
    assert net.relay_sends > before, "the stalled link's records took the relay"

    # 3. Back to direct over a new link once the relay has drained.
    stream_until(lambda: net.links_opened == 2)
    stream(5)
    before = net.relay_sends
    stream(30)
    assert net.relay_sends == before
    net.turns(400, until=lambda: (net.ack_all(), all(w.done() for w in waiters))[1])
    assert all(w.error is None for w in waiters)
    assert net.seen == list(range(len(waiters))), "FIFO and exactly-once across both switches"


def test_a_stalled_link_gives_the_relay_a_copy_and_its_sends_return_once_stored(tmp_path):
    net = FakeFabric(tmp_path)  # the sender's direct timeout is 0.5 s: its links stall after 0.25 s
    net.consumer.consume("fifo", 1000, True, net.feed, Waiter())
    net.turns(5)
    first = net.send(*range(40))
    net.turns(40, until=lambda: all(w.done() for w in first))  # 0.8 s: before the link would fail (1 s)
    assert all(w.error is None for w in first) and net.links_opened == 1
    assert net.sender.sent == {"direct": 40, "relay": 40}, "out direct, then a copy at the relay"
    assert [m.body for m in net.app] == list(range(40)), "the application holds the direct copies"
    later = net.send(*range(40, 60))
    net.turns(20, until=lambda: all(w.done() for w in later))
    assert net.sender.sent["direct"] == 40, "the mailbox's next sends take the relay, behind the copies"
    net.turns(400, until=lambda: (net.ack_all(), len(net.seen) == 60 and not net.app)[1])
    net.turns(20)
    net.ack_all()
    assert net.seen == list(range(60)), "FIFO, and the relay's copies are not handed out again"


def test_a_stalled_link_to_one_of_competing_consumers_keeps_its_records():
    """A copy at the relay could reach another live consumer: not made."""
    from murano_zmq.node.links import DirectSender

    sender = DirectSender("s", b"s" * 16, 1.0, timeout=5.0)
    sender.paths.looked_up("m", {"depth": 0, "direct": [["a", "tcp://a:1"], ["b", "tcp://b:1"]]}, T0)
    waiter = Waiter()
    endpoint = sender.route(build_record("m", 1, None, None, T0, None), waiter, T0)
    link = sender._links[endpoint]
    link.receive(encode(Cmd.WELCOME, "a", 1.0, 1 << 20), T0)
    sender.flush(T0)
    assert link.in_flight == 1 and sender.escrow(T0 + 4) == [] and not waiter.done()
    sender.paths.looked_up("m", {"depth": 0, "direct": [["a", endpoint]]}, T0 + 4)  # now the only one
    [(copy, escrow)] = sender.escrow(T0 + 4.1)
    assert copy[6] is True and escrow.waiter is waiter


def test_an_escrowed_send_completes_once_and_a_relay_refusal_waits_for_the_link():
    from murano_zmq.node.common import SendGroup
    from murano_zmq.node.links import _Escrow

    group = SendGroup(Waiter(), [b"a", b"b"])
    a, b = _Escrow(group), _Escrow(group)
    a.set_result(b"a")  # stored by the relay ...
    a.link_done(b"a")  # ... and settled by the peer: counted once
    assert not group.future.done()
    b.set_exception(RuntimeError("the relay refused the copy"))
    assert not group.future.done(), "the peer may still settle it"
    b.link_done(b"b")
    assert group.future.result == [b"a", b"b"] and group.future.error is None
    c = _Escrow(Waiter())
    c.set_exception(RuntimeError("refused"))
    c.link_failed()  # neither path has it: the caller hears of it
    assert isinstance(c.waiter.error, RuntimeError)


def test_inbox_keeps_a_confirm_its_router_could_not_pass_on():
    inbox = DirectInbox("c", 1 << 20, DedupWindow())
    peer = b"link-1"
    inbox.receive(peer, encode(Cmd.HELLO, "sender", b"i" * 16, 1.0), T0, {"m": 7})
    record = send_record(b"x" * 16, "m", None, pack_body("body"), T0, None)
    [delivered] = inbox.receive(peer, encode(Cmd.SEND, 1, [record]), T0, {"m": 7})
    inbox.drain()
    inbox.settle(delivered.messages[0], "ack", False)
    [(identity, confirm)] = inbox.drain()
    assert decode(confirm).cmd == Cmd.CONFIRM
    inbox.send_failed(identity, confirm)  # no connection from the peer right now
    inbox.send_failed(identity, encode(Cmd.HEARTBEAT))  # heartbeats are not kept
    assert inbox.drain() == []
    inbox.receive(peer, encode(Cmd.HEARTBEAT), T0 + 1, {"m": 7})  # the peer is back
    assert [(i, decode(f).cmd) for i, f in inbox.drain()] == [(peer, Cmd.CONFIRM)]


def test_core_state_is_the_relay_session():
    core = NodeCore("n", b"n" * 16, direct=False)
    assert core.state == State.IDLE and core.paths is None and core.pending == 0
    assert not core.deliverable_now("m")


def test_paths_with_the_relay_down_go_to_a_known_direct_consumer():
    paths = PathTable()
    room = lambda endpoint: True  # noqa: E731
    paths.via_relay("m")  # one message through the relay ...
    paths.relay_confirmed("m")  # ... stored: it may still be there
    paths.looked_up("m", {"depth": 1, "direct": [["c", "tcp://c:1"]]}, T0)
    assert paths.choose("m", room, T0) is None, "relay up: wait until it has drained"
    paths.relay_up = False
    assert paths.is_direct("m") and paths.choose("m", room, T0) == "tcp://c:1"
    paths.relay_up = True
    assert paths.choose("m", room, T0) == "tcp://c:1", "and stays direct once there"
    paths.via_relay("q")  # unconfirmed relay sends keep their mailbox on the relay
    paths.relay_up = False
    paths.discovered("q", {"tcp://c:1"})
    assert paths.choose("q", room, T0) is None


def test_a_lost_confirm_costs_a_resend_on_the_link_not_a_relay_fallback():
    from murano_zmq.protocol.direct import DirectLink, LinkFailed

    inbox = DirectInbox("c", 1 << 20, DedupWindow())
    link = DirectLink("tcp://c:1", "s", b"s" * 16, T0, heartbeat=1.0, timeout=2.0)
    consumers = {"m": 7}
    app: list = []

    def carry(now, lose_confirms=False):
        inbox.tick(now)  # its heartbeats say the peer is alive
        for frames in link.drain():
            for ev in inbox.receive(b"L", frames, now, consumers):
                app.extend(ev.messages)
        events = []
        for _, frames in inbox.drain():
            if not (lose_confirms and decode(frames).cmd == Cmd.CONFIRM):
                events.extend(link.receive(frames, now))
        return events

    carry(T0)
    records = [send_record(bytes([i]) * 16, "m", None, pack_body(i), T0, None) for i in range(2)]
    link.send(records, T0)
    carry(T0)
    inbox.settle(app[0], "ack", False)
    assert carry(T0 + 0.5) == []  # one of two settled: no CONFIRM yet
    inbox.settle(app[1], "ack", False)
    assert carry(T0 + 0.6, lose_confirms=True) == []  # the CONFIRM is lost
    for t in (1.0, 1.6):  # heartbeats keep the link alive
        link.tick(T0 + t)
        carry(T0 + t)
    assert link.tick(T0 + 2.1) == [], "a live peer gets the SEND again instead of a failed link"
    [done] = carry(T0 + 2.1)
    assert [r[0] for r in done.done] == [r[0] for r in records] and len(app) == 2, "none handed out twice"

    # Resent while a record is still with the application: confirmed only once it is settled.
    more = [send_record(bytes([9 + i]) * 16, "m", None, pack_body(i), T0, None) for i in range(2)]
    link.send(more, T0 + 3)
    carry(T0 + 3)
    inbox.settle(app[2], "ack", False)
    carry(T0 + 3.1)
    for t in (4.0, 5.0):
        link.tick(T0 + t)
        carry(T0 + t)
    assert link.tick(T0 + 5.2) == [] and carry(T0 + 5.2) == [], "no CONFIRM while one is held"
    inbox.settle(app[3], "ack", False)
    [done] = carry(T0 + 5.3)
    assert len(done.done) == 2 and len(app) == 4
    # A dead peer (no word) still fails the link after the timeout.
    link.send([send_record(b"z" * 16, "m", None, pack_body(0), T0, None)], T0 + 6)
    link.drain()
    [failed] = link.tick(T0 + 9)
    assert isinstance(failed, LinkFailed)


def test_the_core_modules_import_no_io():
    import ast
    from pathlib import Path

    import murano_zmq.node as node_package

    forbidden = {"zmq", "asyncio", "socket", "threading", "selectors", "sqlite3"}
    for name in ("core.py", "links.py", "common.py"):
        tree = ast.parse((Path(node_package.__file__).parent / name).read_text())
        imported = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert not imported & forbidden, f"node/{name} imports {imported & forbidden}"


def test_paths_hold_the_first_send_until_something_is_known():
    paths = PathTable()
    room = lambda endpoint: True  # noqa: E731
    assert paths.wants_lookup("m", T0)
    assert paths.choose("m", room, T0) == HOLD
    paths.looked_up("m", {"depth": 0, "direct": [["c", "tcp://c:1"]]}, T0 + 0.01)
    assert paths.choose("m", room, T0 + 0.01) == "tcp://c:1", "direct from the first message"
    paths.relay_up = False  # no relay session yet: hold a while, then queue for the relay
    assert paths.choose("n", room, T0) == HOLD
    assert paths.choose("n", room, T0 + HOLD_LIMIT + 0.1) is None


def test_a_node_checks_its_name():
    for bad in ("", " api", "api\n", "x" * 201):
        with pytest.raises(ValueError):
            check_peer_name(bad)
    assert check_peer_name("conductor-1 (eu)") == "conductor-1 (eu)"


@pytest.mark.parametrize("welcomed", [True, False])
def test_a_failed_link_gives_back_as_retries_only_what_it_sent(welcomed):
    """The relay marks a retried record redelivered: right for a record out
    on the link (the peer's application may have had it), wrong for those
    still queued behind its window, or all of a link never welcomed."""
    from murano_zmq.node.links import DirectSender

    sender = DirectSender("s", b"s" * 16, 1.0, timeout=5.0, window=1)
    sender.paths.looked_up("m", {"depth": 0, "direct": [["a", "tcp://a:1"]]}, T0)
    records = [build_record("m", i, None, None, T0, None) for i in range(3)]
    endpoints = {sender.route(record, Waiter(), T0) for record in records}
    [endpoint] = endpoints
    if welcomed:
        sender._links[endpoint].receive(encode(Cmd.WELCOME, "a", 1.0, 1 << 20), T0)
    sender.flush(T0)
    given_back = sender.refused(endpoint, "the peer refused this node's key", True, T0 + 1)
    assert [(record[3], record[6]) for record, _ in given_back] == [
        (pack_body(i), welcomed and i == 0) for i in range(3)]


def test_a_sender_keeps_at_most_max_direct_links_open():
    """Links were never closed: a consumer offering 1,500 endpoints for its
    mailbox made every sender open a socket per endpoint until libzmq's
    sockets (1,023 per context) or the descriptors ran out, and the I/O
    thread died.  Now past MAX_DIRECT_LINKS an idle link is closed for a
    new one, and with none idle the message takes the relay."""
    from murano_zmq.node.links import CLOSE, OPEN, DirectSender
    from murano_zmq.protocol.constants import MAX_DIRECT_LINKS

    sender = DirectSender("s", b"s" * 16, 1.0, timeout=5.0, window=1)
    endpoints = [f"tcp://10.0.0.1:{2000 + i}" for i in range(MAX_DIRECT_LINKS + 50)]
    sender.paths.looked_up("m", {"depth": 0, "direct": [[f"c{i}", e] for i, e in enumerate(endpoints)]}, T0)
    routes = [sender.route(build_record("m", i, None, None, T0, None), Waiter(), T0)
              for i in range(MAX_DIRECT_LINKS + 50)]
    assert len(sender._links) == MAX_DIRECT_LINKS
    assert routes[:MAX_DIRECT_LINKS] == endpoints[:MAX_DIRECT_LINKS]
    # Every window full, no link to spare: behind the mailbox's last link (FIFO).
    assert routes[MAX_DIRECT_LINKS:] == [endpoints[MAX_DIRECT_LINKS - 1]] * 50
    assert [op for op, *_ in sender.socket_ops] == [OPEN] * MAX_DIRECT_LINKS
    # Two links' records confirmed: they are idle, and the one confirmed
    # longest ago is closed for a new endpoint.
    for i, confirmed_at in ((1, T0 + 2), (2, T0 + 1)):
        link = sender._links[endpoints[i]]
        link.receive(encode(Cmd.WELCOME, f"c{i}", 1.0, 1 << 20), T0)
        sender.flush(T0)
        sender.receive(endpoints[i], encode(Cmd.CONFIRM, next(iter(link._in_flight)), []), confirmed_at)
    sender.socket_ops.clear()
    assert sender._may_open("m", T0 + 3)
    assert sender.socket_ops == [(CLOSE, endpoints[2])] and len(sender._links) == MAX_DIRECT_LINKS - 1


def test_a_link_keeps_at_most_its_window_of_bytes_out():
    """The window counted records only: 1,000 bodies of 1 MiB could be out
    on one link, in the consumer's memory whatever its prefetch.  A SEND
    may pass the bytes by one record, so that a larger one goes alone."""
    from murano_zmq.node.links import DirectSender

    sender = DirectSender("s", b"s" * 16, 1.0, timeout=5.0)
    sender.paths.looked_up("m", {"depth": 0, "direct": [["a", "tcp://a:1"]]}, T0)
    records = [build_record("m", b"x" * 10_000, None, None, T0, None) for _ in range(5)]
    [endpoint] = {sender.route(r, Waiter(), T0) for r in records}
    link = sender._links[endpoint]
    link.window_bytes = 25_000
    link.receive(encode(Cmd.WELCOME, "a", 1.0, 1 << 20), T0)
    sends = [c for c in (decode(f) for _, f in sender.flush(T0)) if c.cmd == Cmd.SEND]
    assert [len(c.fields[1]) for c in sends] == [2, 1]  # 20,003 bytes, then one over: 30,009
    assert link.room() == 0 and link.bytes_out == 3 * 10_003
    sender.receive(endpoint, encode(Cmd.CONFIRM, sends[0].fields[0], []), T0)
    assert link.bytes_out == 10_003
    assert [len(decode(f).fields[1]) for _, f in sender.flush(T0)] == [1, 1]  # up to the window, one over
    assert link.bytes_out == 3 * 10_003


def test_paths_of_mailboxes_long_unused_are_forgotten():
    """A sender kept a path for every mailbox it ever sent to, and every
    endpoint whose link had failed (a conductor sending once to each agent's
    mailbox: ~300 bytes each, for the node's life)."""
    from murano_zmq.protocol.constants import PATH_IDLE

    paths = PathTable()
    room = lambda endpoint: True  # noqa: E731
    paths.looked_up("direct", {"depth": 0, "direct": [["c", "tcp://c:1"]]}, T0)
    assert paths.choose("direct", room, T0) == "tcp://c:1"
    paths.link_failed("tcp://c:1", T0)
    for mailbox in ("stored", "unconfirmed"):
        paths.looked_up(mailbox, {"depth": 0, "direct": []}, T0)
        paths.via_relay(mailbox)
    paths.relay_confirmed("stored")  # the relay may hold it: not forgotten before a drained LOOKUP
    paths.looked_up("busy", {"depth": 0, "direct": []}, T0)
    paths.looked_up("advertised", {"depth": 0, "direct": []}, T0)
    paths.discovered("advertised", {"tcp://d:1"})
    later = T0 + PATH_IDLE + 1
    assert paths.prune(T0 + 1, busy=set()) == []  # (nothing idle long enough yet)
    assert sorted(paths.prune(later, busy={"busy"})) == ["stored"]
    assert sorted(paths.mailboxes()) == ["advertised", "busy", "stored", "unconfirmed"]
    assert paths.failed == set()  # no path names tcp://c:1 any more
    paths.looked_up("stored", {"depth": 0, "direct": []}, later)  # drained
    assert paths.prune(later + PATH_IDLE + 1, busy=set()) == []
    assert sorted(paths.mailboxes()) == ["advertised", "unconfirmed"]
    # A forgotten mailbox starts again as a new one: looked up first.
    assert paths.wants_lookup("direct", later) and paths.choose("direct", room, later) == HOLD


def test_a_refused_endpoint_stays_failed_while_its_hold_lasts():
    from murano_zmq.protocol.constants import PATH_IDLE, REFUSED_BACKOFF

    paths = PathTable()
    paths.looked_up("m", {"depth": 0, "direct": [["c", "tcp://c:1"]]}, T0)
    paths.link_refused("tcp://c:1", T0 + PATH_IDLE - REFUSED_BACKOFF + 5)
    paths.prune(T0 + PATH_IDLE + 1, busy=set())
    assert paths.mailboxes() == [] and paths.failed == {"tcp://c:1"}
