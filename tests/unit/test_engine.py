"""The relay engine and the client core together, on a fake link.

No sockets, no threads, no sleeping: a real SQLiteStore in tmp_path, a
RelayEngine fed (identity, frames, now), and ClientCore instances whose
outboxes a FakeNet carries to the engine and back.  Time is a number the
test moves forward.

One FakeNet.turn() is the relay loop's turn:

    receive()...  tick()  pump()  take_output()  commit()  take_output()  top_up()
"""

from __future__ import annotations

import itertools
import os
import sqlite3

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from murano_zmq.protocol.client import (
    ClientCore,
    Confirmed,
    Delivered,
    Failed,
    RelayLost,
    RelayProblem,
    Replied,
    State,
    Welcomed,
)
from murano_zmq.protocol.constants import HEARTBEAT_LIVENESS, SIGNATURE
from murano_zmq.protocol.errors import (
    LocalProtocolError,
    MailboxFull,
    MailboxNotFound,
    Malformed,
    MessageTooLarge,
    PreconditionFailed,
)
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import ID_SIZE, Message, pack_body, send_record
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.relay.mailboxes import TOP_UP_BELOW, TOP_UP_ROWS
from murano_zmq.relay.state import READY_WINDOW
from murano_zmq.relay.turn import DELETES_HELD_SECONDS
from murano_zmq.store.packs import stored_count
from murano_zmq.store.sqlite import SQLiteStore

T0 = 1_000_000.0
HEARTBEAT = 1.0
MAX_TURNS = 200  # every loop below is bounded by this

_ids = itertools.count(1)


def new_id() -> bytes:
    return next(_ids).to_bytes(ID_SIZE, "big")


# --- the fake link -------------------------------------------------------------------


class Node:
    """One ClientCore with what it received, as a driver would keep it."""

    def __init__(self, net: "FakeNet", name: str, identity: bytes):
        self.net = net
        self.name = name
        self.identity = identity
        self.core = ClientCore(name, new_id(), heartbeat=HEARTBEAT)  # a process's instance id
        self.events: list = []
        self.messages: list[Message] = []  # handed to the application, in order

    # what an application does

    def send(self, mailbox: str, *bodies, ttl=None, headers=None, ids=None) -> tuple[int, list[bytes]]:
        ids = list(ids) if ids is not None else [new_id() for _ in bodies]
        records = [send_record(i, mailbox, headers, pack_body(b), self.net.now, ttl)
                   for i, b in zip(ids, bodies)]
        return self.core.send(records, self.net.now), ids

    def consume(self, mailbox: str, prefetch: int = 100) -> int:
        consumer, _ = self.core.consume(mailbox, prefetch)
        return consumer

    def declare(self, mailbox: str, **options) -> int:
        return self.core.request(Cmd.DECLARE, mailbox, options)

    def ack(self, messages) -> None:
        for m in messages:
            m.ack()

    def bodies(self, mailbox: str | None = None) -> list:
        return [m.body for m in self.messages if mailbox is None or m.mailbox == mailbox]

    def unsettled(self) -> list[Message]:
        return [m for m in self.messages if not m.settled]

    def of(self, kind, req=None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (req is None or e.req == req)]

    def one(self, kind, req):
        found = self.of(kind, req)
        assert len(found) == 1, (kind, req, self.events)
        return found[0]

    # what the link does

    def take(self, frames: list[bytes], now: float) -> None:
        events = self.core.receive(frames, now)
        for ev in events:
            if isinstance(ev, Delivered):
                for m in ev.messages:
                    m._settle = self.core.settle  # as the node drivers do
                self.messages.extend(ev.messages)
        self.events.extend(events)


class FakeNet:
    """Moves frames between nodes and one engine, one relay loop turn at a time."""

    # Bodies this long and up go to segment files (store/segments.py); None:
    # the store's default.  The `net` fixture runs each test with both.
    segment_threshold: int | None = None

    def __init__(self, tmp_path, now: float = T0, **engine_options):
        self.dir = str(tmp_path / "relay")
        self.now = now
        self.engine_options = engine_options
        self.store = self._open_store()
        self.engine = RelayEngine(self.store, now, **engine_options)
        self.nodes: dict[bytes, Node] = {}
        self.silent: set[bytes] = set()  # nodes whose link is cut (both ways)
        self.raw: dict[bytes, list] = {}  # commands to identities that are not nodes
        self.drop_after_commit = False  # lose the held replies (CONFIRM, DECLARE's REPLY)
        self.traffic = 0  # commands that moved in the last turn

    def _open_store(self) -> SQLiteStore:
        if self.segment_threshold is None:
            return SQLiteStore(self.dir)
        return SQLiteStore(self.dir, segment_threshold=self.segment_threshold)

    def node(self, name: str, connect: bool = True) -> Node:
        identity = name.encode()
        n = Node(self, name, identity)
        self.nodes[identity] = n
        if connect:
            n.core.connection_made(self.now)
            self.turn()
            assert n.core.state == State.READY, n.events
        return n

    def turn(self, now: float | None = None) -> tuple[list, list]:
        """One relay loop turn at `now`; returns (before-commit, after-commit) outputs."""
        if now is not None:
            assert now >= self.now
            self.now = now
        now = self.now
        self.traffic = 0
        for identity, n in self.nodes.items():
            if identity in self.silent:
                continue
            n.events.extend(n.core.tick(now))
            frames_out = n.core.drain()
            for frames in frames_out:
                self.engine.receive(identity, frames, now)
            if frames_out:
                n.core.sent(now)
            self.traffic += len(frames_out)
        self.engine.tick(now)
        self.engine.pump(now)
        before = self.engine.take_output(now)
        self.engine.commit()
        after = self.engine.take_output(now)
        self.traffic += len(before) + len(after)
        self._route(before, now)
        if not self.drop_after_commit:
            self._route(after, now)
        if self.engine.windows_low:  # the loop's read-ahead: the nodes' input waits for the next turn
            self.engine.top_up()
        return before, after

    def _route(self, outputs, now) -> None:
        for identity, frames in outputs:
            n = self.nodes.get(identity)
            if n is None:
                self.raw.setdefault(identity, []).append(decode(frames))
            elif identity not in self.silent:
                n.take(frames, now)

    def run(self, seconds: float = 0.0, step: float = 0.1, until=None) -> None:
        """Turns every `step` seconds for `seconds` (at least one turn), or
        until `until()` is true."""
        end = self.now + seconds
        for _ in range(MAX_TURNS):
            self.turn(min(self.now + step, end) if seconds else None)
            if until is not None and until():
                return
            if until is None and self.now >= end:
                return
        if until is not None:
            raise AssertionError(f"condition not met in {MAX_TURNS} turns")

    def settle(self) -> None:
        """Turns (no time passing) until nothing moves."""
        for _ in range(MAX_TURNS):
            self.turn()
            if not self.traffic:
                return
        raise AssertionError("the fake network never went quiet")

    def restart(self, now: float | None = None, crash: bool = False) -> None:
        """A new engine on the same data directory.  crash=True loses the
        open transaction, as kill -9 would."""
        if crash:
            self.store._reader.close()  # no commit: the buffered writes are lost
            self.store._db.close()
        else:
            self.store.close()
        if now is not None:
            self.now = now
        self.store = self._open_store()
        self.engine = RelayEngine(self.store, self.now, **self.engine_options)

    def status(self, mailbox: str) -> dict | None:
        mb = self.engine.mailboxes.get(mailbox)
        return None if mb is None else mb.status(self.now)

    def committed_rows(self) -> int:
        """Messages a second connection sees: what is durable."""
        db = sqlite3.connect(self.store.path)
        try:
            return stored_count(db)
        finally:
            db.close()


@pytest.fixture(params=["inline", "segments"])
def net(tmp_path, request, monkeypatch):
    """An engine on SQLite; "segments": every body of 1 byte and up in a
    segment file, so window fills, PEEK, requeues and dead-letter copies
    read them back from there."""
    if request.param == "segments":
        monkeypatch.setattr(FakeNet, "segment_threshold", 1)
    n = FakeNet(tmp_path)
    yield n
    try:
        n.store.close()
    except sqlite3.ProgrammingError:
        pass


def cmds(outputs, cmd=None):
    """The commands in an output list (optionally only those of kind `cmd`)."""
    decoded = [(identity, decode(frames)) for identity, frames in outputs]
    return [(i, c) for i, c in decoded if cmd is None or c.cmd == cmd]


# --- session ---------------------------------------------------------------------------


def test_hello_welcome(net):
    n = net.node("api", connect=False)
    n.core.connection_made(net.now)
    before, after = net.turn()
    assert [c.cmd for _, c in cmds(before)] == [Cmd.WELCOME]
    assert after == []
    assert n.core.state == State.READY
    assert n.of(Welcomed) == [Welcomed("relay", net.engine.max_message_size)]
    assert b"api" in net.engine.peers


def test_commands_before_hello_get_not_ready(net):
    ident = b"stranger"
    for frames in (encode(Cmd.STATUS, 5), encode(Cmd.ACK, [1]), encode(Cmd.HEARTBEAT),
                   encode(Cmd.SEND, 6, [send_record(new_id(), "mb", None, b"\xc0", 1.0, None)])):
        net.engine.receive(ident, frames, net.now)
    out = net.engine.take_output(net.now)
    errors = [c.fields for _, c in cmds(out, Cmd.ERROR)]
    assert errors == [(5, 409, "say HELLO first"), (None, 409, "say HELLO first"),
                      (None, 409, "say HELLO first"), (6, 409, "say HELLO first")]
    assert ident not in net.engine.peers
    assert net.engine.mailboxes == {}  # the SEND stored nothing


def test_client_treats_not_ready_as_a_lost_session(net):
    n = net.node("api")
    req = n.core.request(Cmd.STATUS)
    net.restart()  # the new relay does not know the session
    net.turn()
    assert any(isinstance(e, RelayLost) for e in n.events)
    n.core.connection_made(net.now)  # what the driver does on RelayLost
    net.turn()
    assert n.one(Replied, req).result["relay"] == "relay"


def test_malformed_frames_get_an_error_and_the_engine_keeps_working(net):
    ident = b"fuzzer"
    bad = [
        [],
        [b"junk"],
        [b"MZQ\x01", b"\x0c"],
        [b"AMQP", b"\x0c", msgpack.packb([1])],
        [SIGNATURE, b"\x99", msgpack.packb([1])],
        [SIGNATURE, bytes([Cmd.STATUS]), b"\xc1"],
        [SIGNATURE, bytes([Cmd.STATUS]), msgpack.packb(["one"])],
        [SIGNATURE, bytes([Cmd.SEND]), msgpack.packb([1, [1, 2, 3]])[:-1]],
    ]
    for frames in bad:
        net.engine.receive(ident, frames, net.now)
    errors = cmds(net.engine.take_output(net.now), Cmd.ERROR)
    assert len(errors) == len(bad)
    assert all(i == ident and c.fields[1] == 400 for i, c in errors)

    net.engine.receive(ident, [b"MZQ\x07", bytes([Cmd.STATUS]), msgpack.packb([1])], net.now)
    [(_, err)] = cmds(net.engine.take_output(net.now), Cmd.ERROR)
    assert err.fields[1] == 426  # another protocol version

    # A node with a session sends garbage, then carries on.
    n = net.node("api")
    net.engine.receive(n.identity, [SIGNATURE, bytes([Cmd.SEND]), msgpack.packb(["x", "y"])], net.now)
    net.engine.receive(n.identity, encode(Cmd.DELIVER, 1, []), net.now)  # a relay-only command
    net.turn()
    problems = n.of(RelayProblem)
    assert [p.error.code for p in problems] == [400, 400]
    req, _ = n.send("conductor", "task")
    consumer = net.node("conductor")
    consumer.consume("conductor")
    net.settle()
    assert n.one(Confirmed, req).errors == {}
    assert consumer.bodies() == ["task"]


def test_bad_records_in_a_send_are_refused_one_by_one(net):
    n = net.node("api")
    good = send_record(new_id(), "mb", None, pack_body(1), net.now, None)
    req = n.core.send([good, [b"short-id", "mb", {}, b"\xc0", 1.0, None, False],
                       send_record(new_id(), "bad name!", None, b"\xc0", 1.0, None), "not a record"], net.now)
    net.turn()
    errors = n.one(Confirmed, req).errors
    assert sorted(errors) == [1, 2, 3]
    assert all(isinstance(e, Malformed) and e.code == 400 for e in errors.values())
    assert net.status("mb")["depth"] == 1


# --- durability and delivery -----------------------------------------------------------------


def test_send_before_any_consumer_then_consume(net):
    api = net.node("api")
    req, ids = api.send("agent.env1.unit1", {"plan": 1}, {"plan": 2}, b"raw bytes")
    net.turn()
    assert api.one(Confirmed, req).errors == {}
    assert net.committed_rows() == 3

    net.run(seconds=30, step=1.0)  # nobody consumes yet; the messages wait
    agent = net.node("agent")
    agent.consume("agent.env1.unit1", prefetch=10)
    net.settle()
    assert agent.bodies() == [{"plan": 1}, {"plan": 2}, b"raw bytes"]
    assert [m.id for m in agent.messages] == ids
    assert all(m.delivery_count == 1 and not m.redelivered for m in agent.messages)
    assert all(m.mailbox == "agent.env1.unit1" for m in agent.messages)


def test_confirm_only_after_commit(net):
    api = net.node("api")
    worker = net.node("worker")
    worker.consume("work")
    net.settle()
    req, _ = api.send("work", "job")
    for frames in api.core.drain():
        net.engine.receive(api.identity, frames, net.now)
    net.engine.tick(net.now)
    net.engine.pump(net.now)
    before = net.engine.take_output(net.now)
    # The delivery may go before the commit; the confirm may not.
    assert [c.cmd for _, c in cmds(before)] == [Cmd.DELIVER]
    assert cmds(before, Cmd.CONFIRM) == []
    assert net.committed_rows() == 0
    net.engine.commit()
    assert net.committed_rows() == 1
    after = net.engine.take_output(net.now)
    [(identity, confirm)] = cmds(after)
    assert identity == api.identity and confirm.cmd == Cmd.CONFIRM and confirm.fields == (req, [])


def test_declare_reply_only_after_commit(net):
    api = net.node("api")
    api.declare("agent.x", ttl=60)
    for frames in api.core.drain():
        net.engine.receive(api.identity, frames, net.now)
    assert net.engine.take_output(net.now) == []
    net.engine.commit()
    [(_, reply)] = cmds(net.engine.take_output(net.now))
    assert reply.cmd == Cmd.REPLY and reply.fields[1]["options"] == {"ttl": 60, "overflow": "reject"}


def test_fifo_for_one_sender_and_one_consumer(net):
    api = net.node("api")
    for batch in range(5):
        api.send("conductor", *[(batch, i) for i in range(20)])
        net.turn()
    conductor = net.node("conductor")
    conductor.consume("conductor", prefetch=1000)
    net.settle()
    assert conductor.bodies() == [[b, i] for b in range(5) for i in range(20)]


def test_competing_consumers_round_robin(net):
    api = net.node("api")
    a, b = net.node("a"), net.node("b")
    a.consume("tasks", prefetch=10)
    net.turn()
    b.consume("tasks", prefetch=10)
    net.turn()
    api.send("tasks", *range(6))
    net.settle()
    assert a.bodies() == [0, 2, 4]
    assert b.bodies() == [1, 3, 5]


def test_competing_consumers_by_credit(net):
    api = net.node("api")
    api.send("tasks", *range(8))
    a, b = net.node("a"), net.node("b")
    a.consume("tasks", prefetch=1)
    b.consume("tasks", prefetch=3)
    net.settle()
    assert len(a.messages) == 1 and len(b.messages) == 3
    assert sorted(a.bodies() + b.bodies()) == [0, 1, 2, 3]
    # Credit comes back with acks; every task goes to exactly one consumer.
    for _ in range(MAX_TURNS):
        if len(a.messages) + len(b.messages) == 8 and not a.unsettled() and not b.unsettled():
            break
        a.ack(a.unsettled())
        b.ack(b.unsettled())
        net.turn()
    assert sorted(a.bodies() + b.bodies()) == list(range(8))
    net.settle()
    assert net.status("tasks")["depth"] == 0


def test_prefetch_limits_unacked(net):
    api = net.node("api")
    api.send("work", *range(10))
    c = net.node("c")
    c.consume("work", prefetch=3)
    net.settle()
    net.run(seconds=3)
    assert c.bodies() == [0, 1, 2]
    assert net.status("work")["unacked"] == 3
    c.ack(c.messages[:2])
    net.settle()
    assert c.bodies() == [0, 1, 2, 3, 4]
    assert net.status("work")["unacked"] == 3
    assert net.status("work")["depth"] == 8


def test_ack_deletes(net):
    api = net.node("api")
    api.send("work", "a", "b")
    c = net.node("c")
    c.consume("work")
    net.settle()
    tags = [m.tag for m in c.messages]
    assert all(net.store.get(t) is not None for t in tags)
    c.ack(c.messages[:1])
    net.settle()
    assert net.store.get(tags[0]) is None
    assert net.store.get(tags[1]) is not None
    assert net.committed_rows() == 1
    assert net.status("work")["depth"] == 1 and net.status("work")["unacked"] == 1
    c.ack(c.messages[1:])
    net.settle()
    assert net.committed_rows() == 0
    assert net.engine.counters["acked"] == 2


def test_the_engine_wakes_for_held_deletes(net):
    """Acks alone wait for a later commit (relay/turn.py); the next
    deadline is theirs at the latest."""
    api, consumer = net.node("api"), net.node("c")
    api.send("work", "a", "b")
    consumer.consume("work")
    net.settle()
    consumer.ack(consumer.messages[:1])
    net.turn()  # the first ack through a whole turn (FakeNet's turn commits) ...
    consumer.ack(consumer.messages[1:])  # ... the second step by step, as the relay loop takes it
    consumer.core.flush_acks()
    for frames in consumer.core.drain():
        net.engine.receive(consumer.identity, frames, net.now)
    net.engine.tick(net.now)  # (the relay loop's turn, up to its commit)
    net.engine.pump(net.now)
    net.engine.take_output(net.now)
    assert net.engine.hold_deletes(net.now)
    assert net.engine.next_deadline() <= net.now + DELETES_HELD_SECONDS
    assert net.engine.next_deadline() > net.now  # a deadline, not a busy loop
    net.engine.commit()
    assert net.committed_rows() == 0


def test_ack_of_another_peers_tag_is_ignored(net):
    api = net.node("api")
    api.send("work", "a")
    c, thief = net.node("c"), net.node("thief")
    c.consume("work")
    net.settle()
    [m] = c.messages
    net.engine.receive(thief.identity, encode(Cmd.ACK, [m.tag, 999, "junk"]), net.now)
    net.settle()
    assert net.status("work")["unacked"] == 1
    assert net.store.get(m.tag) is not None


def test_nack_requeue_puts_it_back_first(net):
    api = net.node("api")
    api.send("work", "first", "second")
    c = net.node("c")
    c.consume("work", prefetch=1)
    net.settle()
    [m1] = c.messages
    m1.nack(requeue=True)
    net.settle()
    assert c.bodies() == ["first", "first"]
    again = c.messages[1]
    assert again.id == m1.id
    assert again.delivery_count == 2 and again.redelivered
    # The store records the earlier hand-out (a restart now still says redelivered).
    assert net.store.get(again.tag).deliveries >= 1
    again.ack()
    net.settle()
    assert c.bodies() == ["first", "first", "second"]
    assert c.messages[2].delivery_count == 1


def test_a_nack_of_several_puts_them_back_in_their_order(net):
    """One NACK for several tags (the reference node sends them for a
    cancelled consumer's late deliveries) keeps the mailbox FIFO."""
    api = net.node("api")
    api.send("work", *range(5))
    c = net.node("c")
    c.consume("work", prefetch=5)
    net.settle()
    assert c.bodies() == [0, 1, 2, 3, 4]
    tags = [m.tag for m in c.messages]
    c.core._put(Cmd.NACK, tags, True)
    before, after = net.turn()
    again = [item[0] for _, command in cmds(before + after, Cmd.DELIVER) for item in command.fields[1]]
    assert again == tags  # handed out again at once (credit), in their order


def test_a_nack_of_more_than_a_window_load_keeps_their_order(net):
    """Past REQUEUE_LOAD the requeue rebuilds the window from disk."""
    from murano_zmq.relay.mailboxes import REQUEUE_LOAD

    n = REQUEUE_LOAD + 50
    api = net.node("api")
    api.send("work", *range(n))
    c = net.node("c")
    c.consume("work", prefetch=n)
    net.settle()
    assert c.bodies() == list(range(n))
    tags = [m.tag for m in c.messages]
    c.core._put(Cmd.NACK, list(reversed(tags)), True)  # (any order of tags: the mailbox's comes back)
    again = []
    for _ in range(10):
        before, after = net.turn()
        again += [item[0] for _, command in cmds(before + after, Cmd.DELIVER) for item in command.fields[1]]
    assert again == tags


def test_nack_without_requeue_dead_letters(net):
    api = net.node("api")
    api.declare("work", dead_letter="work.dead")
    api.send("work", "poison", headers={"trace": "t-1"})
    c = net.node("c")
    c.consume("work")
    net.settle()
    [m] = c.messages
    m.nack(requeue=False)
    net.settle()
    assert net.status("work")["depth"] == 0
    assert net.status("work.dead")["depth"] == 1
    # The same node may consume the dead letters: a dead-lettered message is
    # new to its new mailbox (the dedup key is (mailbox, id)).
    c.consume("work.dead")
    net.settle()
    dead = c.messages[1]
    assert dead.id == m.id and dead.body == "poison" and dead.mailbox == "work.dead"
    assert dead.headers["trace"] == "t-1"
    death = dead.headers["x-death"]
    assert death["reason"] == "rejected" and death["mailbox"] == "work" and death["count"] == 1
    assert net.engine.counters["dead_lettered"] == 1


def test_nack_without_requeue_and_no_dead_letter_drops(net):
    api = net.node("api")
    api.send("work", "poison")
    c = net.node("c")
    c.consume("work")
    net.settle()
    c.messages[0].nack(requeue=False)
    net.settle()
    assert net.status("work")["depth"] == 0
    assert net.committed_rows() == 0
    assert c.bodies() == ["poison"]


def test_a_message_requeued_past_its_delivery_limit_is_dead_lettered(net):
    """A poison message went round at the head of its mailbox for ever
    (10,000 deliveries in 2 s), and the messages behind it waited."""
    api = net.node("api")
    api.declare("work", dead_letter="work.dead", delivery_limit=3)
    api.send("work", "poison", "good")
    c = net.node("c")
    c.consume("work", prefetch=1)
    for attempt in range(1, 4):
        net.settle()
        m = c.messages[-1]
        assert (m.body, m.delivery_count) == ("poison", attempt)
        m.nack(requeue=True)
    net.settle()
    assert c.bodies() == ["poison"] * 3 + ["good"]
    assert net.status("work")["depth"] == 1 and net.status("work.dead")["depth"] == 1
    c.consume("work.dead")
    net.settle()
    dead = c.messages[-1]
    assert dead.body == "poison" and dead.headers["x-death"]["reason"] == "delivery_limit"
    assert dead.headers["x-death"]["count"] == 3
    assert net.engine.counters["dead_lettered_delivery_limit"] == 1


def test_a_message_whose_consumers_keep_dying_leaves_at_its_delivery_limit(net):
    """A message that kills each consumer it reaches comes back with no NACK:
    its consumers' ends count too.  Without a dead-letter mailbox it goes away."""
    api = net.node("api")
    api.declare("work", delivery_limit=2)
    api.send("work", "poison")
    for name in ("a", "b"):
        victim = net.node(name)
        victim.consume("work", prefetch=1)
        net.settle()
        assert victim.bodies() == ["poison"]
        net.silent.add(victim.identity)  # it dies without a word
        net.run(seconds=HEARTBEAT * HEARTBEAT_LIVENESS + 1, step=0.5)
        assert victim.identity not in net.engine.peers
    assert net.status("work")["depth"] == 0 and net.committed_rows() == 0
    assert net.engine.counters["dropped_delivery_limit"] == 1
    survivor = net.node("survivor")
    survivor.consume("work")
    net.settle()
    assert survivor.bodies() == []


def test_a_refusal_quotes_at_most_a_bounded_part_of_what_it_refused(net):
    """An 8 MiB mailbox name came back in its ERROR whole: 150 unread ones
    held 1.4 GB in the relay."""
    from murano_zmq.protocol.constants import MAX_ERROR_TEXT

    api = net.node("api")
    for options in ({}, {"overflow": "x" * (1 << 20)}, {"y" * (1 << 20): 1}):
        req = api.core.request(Cmd.DECLARE, "n" * (1 << 20) if not options else "work", options)
        net.settle()
        text = api.one(Failed, req).error.args[0]
        assert 0 < len(text) <= MAX_ERROR_TEXT, len(text)


def test_a_delivery_limit_must_be_a_whole_number_from_1(net):
    api = net.node("api")
    for bad in (0, -1, 2.5, True, "3"):
        req = api.declare("work", delivery_limit=bad)
        net.settle()
        assert "delivery_limit" in api.one(Failed, req).error.args[0]


# --- dead peers ---------------------------------------------------------------------------


def test_silent_consumer_is_dropped_and_its_messages_go_to_another(net):
    api = net.node("api")
    a = net.node("a")
    a.consume("tasks", prefetch=1)
    net.turn()
    b = net.node("b")
    b.consume("tasks", prefetch=2)
    net.turn()
    api.send("tasks", "t1", "t2")
    net.settle()
    assert a.bodies() == ["t1"] and b.bodies() == ["t2"]

    net.silent.add(a.identity)  # a's process hangs; its link carries nothing
    last_heard = net.now
    net.run(seconds=HEARTBEAT * HEARTBEAT_LIVENESS - 0.5, step=0.5)
    assert a.identity in net.engine.peers  # not yet
    assert b.bodies() == ["t2"]
    net.run(seconds=1.0, step=0.5)
    assert net.now - last_heard > HEARTBEAT * HEARTBEAT_LIVENESS
    assert a.identity not in net.engine.peers
    assert b.identity in net.engine.peers and api.identity in net.engine.peers  # they heartbeat
    assert b.bodies() == ["t2", "t1"]
    assert b.messages[1].redelivered and b.messages[1].delivery_count == 2


def test_node_reconnecting_on_a_new_socket_replaces_its_session(net):
    api = net.node("api")
    api.send("tasks", "t1")
    c = net.node("c")
    c.consume("tasks")
    net.settle()
    [m] = c.messages
    # ZeroMQ reconnected: same node (instance id), new routing id.
    del net.nodes[c.identity]
    old_identity, c.identity = c.identity, b"c-new-socket"
    net.nodes[c.identity] = c
    c.core.connection_made(net.now)
    net.settle()
    assert old_identity not in net.engine.peers and c.identity in net.engine.peers
    assert len(net.engine.mailboxes["tasks"].consumers) == 1
    assert len(c.messages) == 1  # redelivered to the new session, deduplicated
    m.ack()
    net.settle()
    assert net.status("tasks")["depth"] == 0


def test_status(net):
    api = net.node("api")
    api.send("b.box", "x")
    api.send("a.box", "y", "z")
    net.turn()
    req = api.core.request(Cmd.STATUS)
    net.turn()
    result = api.one(Replied, req).result
    assert result["relay"] == "relay" and result["peers"] == 1
    assert [(m["name"], m["depth"]) for m in result["mailboxes"]] == [("a.box", 2), ("b.box", 1)]
    assert result["counters"]["received"] == 3


def test_bye_requeues_at_once(net):
    api = net.node("api")
    api.send("tasks", "t1")
    a, b = net.node("a"), net.node("b")
    a.consume("tasks", prefetch=1)
    net.settle()
    b.consume("tasks", prefetch=1)
    net.settle()
    assert a.bodies() == ["t1"] and b.bodies() == []
    a.core.close()
    net.settle()
    assert b.bodies() == ["t1"]


def test_reconnecting_node_gets_its_unacked_again_and_dedups_them(net):
    api = net.node("api")
    api.send("tasks", "t1")
    c = net.node("c")
    c.consume("tasks")
    net.settle()
    [m] = c.messages
    c.core.connection_made(net.now)  # a new socket: HELLO again, consumers replayed
    net.settle()
    assert len(c.messages) == 1  # the copy is with the application already
    assert net.status("tasks")["unacked"] == 1
    m.ack()
    net.settle()
    assert net.status("tasks")["depth"] == 0


# --- expiry -------------------------------------------------------------------------------------


def test_idle_mailbox_expires_with_its_messages(net):
    api = net.node("api")
    api.declare("agent.e.u", ttl=10)
    api.send("agent.e.u", "plan-1", "plan-2")
    net.turn()
    net.run(seconds=5, step=1.0)
    api.send("agent.e.u", "plan-3")  # traffic: the idle clock starts again
    net.turn()
    sent_at = net.now
    net.run(seconds=9.5, step=0.5)
    assert net.status("agent.e.u")["depth"] == 3
    net.run(seconds=1.0, step=0.5)
    assert net.now > sent_at + 10
    assert "agent.e.u" not in net.engine.mailboxes
    assert net.committed_rows() == 0
    assert [r.name for r in net.store.load_mailboxes()] == []
    # A later consumer finds a new, empty mailbox.
    agent = net.node("agent")
    agent.consume("agent.e.u")
    net.settle()
    assert agent.messages == []


def test_consumer_keeps_an_idle_mailbox_alive(net):
    api = net.node("api")
    api.declare("agent.e.u", ttl=10)
    net.turn()
    agent = net.node("agent")
    consumer = agent.consume("agent.e.u")
    net.run(seconds=50, step=1.0)
    assert "agent.e.u" in net.engine.mailboxes
    api.send("agent.e.u", "plan")
    net.settle()
    [plan] = agent.messages  # held, not acked
    agent.core.cancel(consumer)
    net.turn()
    cancelled_at = net.now
    assert net.status("agent.e.u")["ready"] == 1  # requeued by the cancel
    net.run(seconds=9.5, step=0.5)
    assert "agent.e.u" in net.engine.mailboxes
    net.run(seconds=1.0, step=0.5)
    assert net.now > cancelled_at + 10
    assert "agent.e.u" not in net.engine.mailboxes
    assert net.committed_rows() == 0


def test_a_mailbox_polled_by_consumers_that_come_and_go_keeps_one_idle_entry(net):
    """Each consumer's leaving pushed an idle-expiry entry, and each came back
    at every ttl: a mailbox polled by a consume/cancel loop kept thousands
    (200,000 departures: 18 MB, and a 150 ms pass every ttl)."""
    api = net.node("api")
    api.declare("agent.e.u", ttl=10)
    poller = net.node("poller")
    for _ in range(300):
        api.send("agent.e.u", "tick")
        consumer = poller.consume("agent.e.u", prefetch=1)
        net.settle()
        poller.messages[-1].ack()
        poller.core.cancel(consumer)
        net.run(seconds=0.1, step=0.1)
    assert len(net.engine.boxes._idle_heap) <= 2
    net.run(seconds=9.5, step=0.5)
    assert "agent.e.u" in net.engine.mailboxes  # (its idle clock started at the last cancel)
    net.run(seconds=1.0, step=0.5)
    assert "agent.e.u" not in net.engine.mailboxes and net.engine.boxes._idle_heap == []


def test_mailbox_without_ttl_never_expires(net):
    api = net.node("api")
    api.send("conductor", "x")
    net.turn()
    net.run(seconds=100, step=5)
    assert net.status("conductor")["depth"] == 1


def test_message_ttl_expiry_dead_letters(net):
    api = net.node("api")
    api.declare("work", message_ttl=5, dead_letter="work.dlq")
    api.send("work", "short", ttl=2)
    api.send("work", "default")
    net.turn()
    start = net.now
    net.run(seconds=1.9, step=0.5)
    assert net.status("work")["depth"] == 2
    net.run(seconds=0.5, step=0.5)
    assert net.now - start >= 2
    assert net.status("work")["depth"] == 1
    assert net.status("work.dlq")["depth"] == 1
    net.run(seconds=3.5, step=0.5)
    assert net.status("work")["depth"] == 0
    assert net.engine.counters["expired"] == 2

    ops = net.node("ops")
    ops.consume("work.dlq")
    net.settle()
    assert ops.bodies() == ["short", "default"]
    for m in ops.messages:
        assert m.headers["x-death"]["reason"] == "expired"
        assert m.headers["x-death"]["mailbox"] == "work"
        assert m.expires_at is None  # the dead-letter mailbox has no message ttl


def test_expired_message_is_not_delivered(net):
    api = net.node("api")
    api.send("work", "stale", ttl=1)
    api.send("work", "fresh")
    net.turn()
    net.now += 5  # no tick ran meanwhile: the delivery path checks expiry too
    c = net.node("c")
    c.consume("work")
    net.settle()
    assert c.bodies() == ["fresh"]
    assert net.engine.counters["expired"] == 1


def test_expiry_waits_while_a_consumer_holds_the_message(net):
    api = net.node("api")
    api.declare("work", dead_letter="dlq")
    api.send("work", "held", ttl=2)
    c = net.node("c")
    c.consume("work")
    net.settle()
    [m] = c.messages
    net.run(seconds=4, step=0.5)
    assert net.status("work")["unacked"] == 1  # with the consumer: not expired under it
    m.nack(requeue=True)
    net.settle()
    assert c.bodies() == ["held"]  # expired when it came back, not redelivered
    assert net.status("work")["depth"] == 0
    assert net.status("dlq")["depth"] == 1


# --- limits -----------------------------------------------------------------------------------


def test_max_length_reject(net):
    api = net.node("api")
    api.declare("small", max_length=2)
    req, ids = api.send("small", "one", "two", "three")
    net.turn()
    errors = api.one(Confirmed, req).errors
    assert list(errors) == [2]
    assert isinstance(errors[2], MailboxFull) and errors[2].code == 429
    assert net.status("small")["depth"] == 2
    assert net.engine.counters["rejected"] == 1
    c = net.node("c")
    c.consume("small")
    net.settle()
    assert c.bodies() == ["one", "two"]


def test_max_bytes_reject(net):
    api = net.node("api")
    api.declare("small", max_bytes=10)
    req, _ = api.send("small", b"1234", b"12", b"1234")  # packed: 6 + 4 + 6 bytes
    net.turn()
    assert list(api.one(Confirmed, req).errors) == [2]


def test_drop_head_dead_letters_the_oldest(net):
    api = net.node("api")
    api.declare("small", max_length=2, overflow="drop-head", dead_letter="small.dlq")
    req, _ = api.send("small", "one", "two", "three")
    net.turn()
    assert api.one(Confirmed, req).errors == {}
    c = net.node("c")
    c.consume("small")
    c.consume("small.dlq")
    net.settle()
    assert c.bodies("small") == ["two", "three"]
    [dead] = [m for m in c.messages if m.mailbox == "small.dlq"]
    assert dead.body == "one"
    assert dead.headers["x-death"]["reason"] == "maxlen"
    assert dead.headers["x-death"]["mailbox"] == "small"


def test_oversized_message_gets_413(tmp_path):
    net = FakeNet(tmp_path, max_message_size=100)
    try:
        api = net.node("api")
        req, _ = api.send("work", b"x" * 50, b"x" * 200, b"y" * 50)
        req2, _ = api.send("work", b"z" * 60, headers={"big": "h" * 60})  # headers count too
        net.turn()
        errors = api.one(Confirmed, req).errors
        assert list(errors) == [1]
        assert isinstance(errors[1], MessageTooLarge) and errors[1].code == 413
        assert list(api.one(Confirmed, req2).errors) == [0]
        assert net.status("work")["depth"] == 2
    finally:
        net.store.close()


# --- declare and delete --------------------------------------------------------------------------


def test_declare_conflicting_options_gives_406(net):
    api = net.node("api")
    r1 = api.declare("agent.x", ttl=60)
    net.turn()
    assert api.one(Replied, r1).result["options"]["ttl"] == 60
    r2 = api.declare("agent.x", ttl=60)  # the same again is fine
    r3 = api.declare("agent.x", ttl=30)
    net.turn()
    assert api.one(Replied, r2).result["name"] == "agent.x"
    error = api.one(Failed, r3).error
    assert isinstance(error, PreconditionFailed) and error.code == 406
    assert net.engine.mailboxes["agent.x"].options.ttl == 60


def test_declare_may_set_options_of_a_mailbox_a_send_created(net):
    api = net.node("api")
    api.send("agent.x", "early")
    net.turn()
    req = api.declare("agent.x", ttl=60, dead_letter="dlq")
    net.turn()
    assert api.one(Replied, req).result["depth"] == 1
    assert net.store.load_mailboxes()[0].options == {"ttl": 60, "overflow": "reject", "dead_letter": "dlq"}


def test_passive_declare(net):
    api = net.node("api")
    missing = api.declare("nobody.home", passive=True)
    net.turn()
    error = api.one(Failed, missing).error
    assert isinstance(error, MailboxNotFound) and error.code == 404
    assert "nobody.home" not in net.engine.mailboxes
    api.send("somebody.home", "x")
    net.turn()
    found = api.declare("somebody.home", passive=True)
    net.turn()
    assert api.one(Replied, found).result["depth"] == 1


def test_declare_bad_options_gives_400(net):
    api = net.node("api")
    reqs = [api.declare("a", ttl=-1), api.declare("b", nonsense=1), api.declare("c", overflow="explode"),
            api.declare("d", dead_letter="bad name"), api.declare("e", max_length="many"),
            api.declare("f", dead_letter="f")]  # (its dead letters would be dropped)
    net.turn()
    for req in reqs:
        assert isinstance(api.one(Failed, req).error, Malformed)
    assert "own dead-letter mailbox" in str(api.one(Failed, reqs[-1]).error)
    assert net.engine.mailboxes == {}


def test_own_dead_letter_mailbox_refused_when_set_kept_when_stored(net):
    """A mailbox cannot be made its own dead-letter mailbox (nor a mailbox
    a send created get that option); one an older release stored so is
    declared again with the same options, as an application does at each
    start."""
    api = net.node("api")
    api.send("made.by.send", "x")
    net.turn()
    refused = api.declare("made.by.send", dead_letter="made.by.send")
    net.turn()
    assert "own dead-letter mailbox" in str(api.one(Failed, refused).error)
    net.store._db.execute("INSERT INTO mailboxes VALUES (99, 'loop', ?, 1)",
                          (msgpack.packb({"dead_letter": "loop", "overflow": "reject"}),))
    net.restart()
    api = net.node("api2")
    again = api.declare("loop", dead_letter="loop")
    net.turn()
    assert api.one(Replied, again).result["name"] == "loop"


def test_a_hello_name_is_shown_without_control_characters(net, caplog):
    """A node's name goes into the relay's log and STATUS: a newline in it
    would forge a log line."""
    import logging

    with caplog.at_level(logging.INFO, logger="murano_zmq.relay"):
        net.node("api\n2026-01-01 00:00:00 WARNING forged" + "x" * 500)
    peer = next(iter(net.engine.peers.values()))
    assert peer.name.startswith("api?2026-01-01") and len(peer.name) == 200
    lines = [line for line in caplog.text.splitlines() if "forged" in line]
    assert len(lines) == 1 and "node api?2026-01-01" in lines[0], lines


def test_delete_mailbox(net):
    api = net.node("api")
    api.send("old", "x", "y")
    c = net.node("c")
    consumer = c.consume("old")
    net.settle()
    busy = api.core.request(Cmd.DELETE, "old")
    net.settle()
    assert api.one(Failed, busy).error.code == 406
    c.core.cancel(consumer)
    net.settle()
    done = api.core.request(Cmd.DELETE, "old")
    net.settle()
    assert api.one(Replied, done).result is None
    assert "old" not in net.engine.mailboxes and net.committed_rows() == 0


# --- resends and restarts --------------------------------------------------------------------------


def test_retried_send_of_a_stored_id_is_not_stored_twice(net):
    api = net.node("api")
    net.drop_after_commit = True  # the CONFIRM is lost on the way
    req, _ = api.send("work", "once")
    net.turn()
    net.drop_after_commit = False
    assert api.of(Confirmed) == [] and api.core.unconfirmed == 1
    assert net.committed_rows() == 1
    api.core.connection_made(net.now)  # reconnect: the SEND goes again, flagged retry
    net.settle()
    assert api.one(Confirmed, req).errors == {}
    assert net.committed_rows() == 1
    assert net.status("work")["depth"] == 1
    c = net.node("c")
    c.consume("work")
    net.settle()
    assert c.bodies() == ["once"]


def test_resent_id_without_retry_flag_is_not_stored_twice(net):
    api = net.node("api")
    [msg_id] = api.send("work", "first")[1]
    net.turn()
    req, _ = api.send("work", "second", ids=[msg_id])
    net.turn()
    assert api.one(Confirmed, req).errors == {}
    assert net.committed_rows() == 1
    assert net.status("work")["depth"] == 1
    c = net.node("c")
    c.consume("work")
    net.settle()
    assert c.bodies() == ["first"]


def test_recovery_redelivers_what_was_stored_before_the_restart(net):
    api = net.node("api")
    api.declare("work", ttl=3600)
    api.send("work", "m1", "m2", "m3")
    worker = net.node("worker")
    worker.consume("work", prefetch=1)
    net.settle()
    worker.messages[0].ack()
    net.settle()
    assert worker.bodies() == ["m1", "m2"]  # m2 is out, unacked, when the relay stops

    net.restart(now=net.now + 30)
    assert net.engine.mailboxes["work"].options.ttl == 3600
    assert net.status("work")["depth"] == 2
    del net.nodes[worker.identity]  # the worker's process died with the relay
    api.core.connection_made(net.now)
    api.send("work", "m4")
    net.settle()
    worker2 = net.node("worker2")
    worker2.consume("work", prefetch=10)
    net.settle()
    assert worker2.bodies() == ["m2", "m3", "m4"]
    assert [m.redelivered for m in worker2.messages] == [True, True, False]
    assert [m.delivery_count for m in worker2.messages] == [2, 2, 1]


def test_relay_crash_before_commit_loses_nothing_confirmed(net):
    api = net.node("api")
    req1, _ = api.send("work", "confirmed")
    net.turn()
    assert api.one(Confirmed, req1).errors == {}
    req2, _ = api.send("work", "in flight")
    for frames in api.core.drain():  # the relay reads the SEND ...
        net.engine.receive(api.identity, frames, net.now)
    net.engine.tick(net.now)
    net.engine.pump(net.now)
    assert cmds(net.engine.take_output(net.now), Cmd.CONFIRM) == []
    net.engine.prepare_commit()  # ... even seals its writes, then dies before the commit
    net.restart(crash=True)
    assert net.status("work")["depth"] == 1
    assert api.of(Confirmed, req2) == []
    api.core.connection_made(net.now)  # the node resends what was not confirmed
    net.settle()
    assert api.one(Confirmed, req2).errors == {}
    c = net.node("c")
    c.consume("work")
    net.settle()
    assert c.bodies() == ["confirmed", "in flight"]
    # The resent one may have been delivered before the crash: it says so.
    assert [m.redelivered for m in c.messages] == [True, True]


def test_tags_are_not_reused_after_a_restart(net):
    api = net.node("api")
    api.send("work", "a", "b")
    c = net.node("c")
    c.consume("work")
    net.settle()
    old_tags = [m.tag for m in c.messages]
    c.ack(c.messages)
    net.settle()
    net.restart()
    api.core.connection_made(net.now)
    api.send("work", "c")
    c2 = net.node("c2")
    c2.consume("work")
    net.settle()
    assert c2.bodies() == ["c"]
    assert c2.messages[0].tag > max(old_tags)


# --- the on-disk window -------------------------------------------------------------------------


def consume_all(net: FakeNet, node: Node, count: int) -> None:
    """Ack whatever arrives until `count` messages came (bounded)."""
    for _ in range(MAX_TURNS):
        node.ack(node.unsettled())
        net.turn()
        if len(node.messages) >= count and not node.unsettled():
            break
    node.ack(node.unsettled())
    net.settle()


def test_more_than_the_window_is_delivered_in_order(net):
    total = 2 * READY_WINDOW + 500
    api = net.node("api")
    for start in range(0, total, 250):
        api.send("bulk", *range(start, min(start + 250, total)))
    net.turn()
    assert len(api.of(Confirmed)) == total // 250
    assert net.status("bulk")["depth"] == total
    assert len(net.engine.mailboxes["bulk"].ready) <= READY_WINDOW  # the rest waits on disk
    c = net.node("c")
    c.consume("bulk", prefetch=400)
    consume_all(net, c, total)
    assert c.bodies() == list(range(total))
    assert net.status("bulk")["depth"] == 0
    assert net.committed_rows() == 0


def test_window_with_sends_while_consuming(net):
    api = net.node("api")
    c = net.node("c")
    api.send("bulk", *range(0, 1500))
    net.turn()
    c.consume("bulk", prefetch=300)
    net.turn()
    api.send("bulk", *range(1500, 2200))
    net.turn()
    api.send("bulk", *range(2200, 2600))
    consume_all(net, c, 2600)
    assert c.bodies() == list(range(2600))


def test_window_after_recovery(net):
    api = net.node("api")
    total = READY_WINDOW + 300
    for start in range(0, total, 250):
        api.send("bulk", *range(start, min(start + 250, total)))
    net.turn()
    net.restart()
    c = net.node("c")
    c.consume("bulk", prefetch=500)
    consume_all(net, c, total)
    assert c.bodies() == list(range(total))
    assert all(m.redelivered for m in c.messages)


def test_a_window_a_delivery_left_low_is_read_ahead(net):
    """A delivery that leaves the window under TOP_UP_BELOW rows with more
    on disk marks it low; the end of the turn reads TOP_UP_ROWS more, so the
    next delivery does not wait for a whole window's read, and the order
    across the reads stays the queue's."""
    total = 2 * READY_WINDOW + 500
    api = net.node("api")
    for start in range(0, total, 250):
        api.send("bulk", *range(start, min(start + 250, total)))
    net.turn()
    net.restart()  # all of it on disk: the first delivery reads one window
    mb = net.engine.mailboxes["bulk"]
    prefetch = 400
    assert READY_WINDOW - prefetch >= TOP_UP_BELOW > READY_WINDOW - 2 * prefetch
    c = net.node("c")
    c.consume("bulk", prefetch=prefetch)
    net.turn()
    assert len(c.messages) == prefetch and len(mb.ready) == READY_WINDOW - prefetch  # not low yet
    c.ack(c.unsettled())
    net.turn()  # the next 400 leave 200: read ahead at the turn's end
    assert len(c.messages) == 2 * prefetch
    assert len(mb.ready) == READY_WINDOW - 2 * prefetch + TOP_UP_ROWS
    assert [r.seq for r in mb.ready] == sorted(r.seq for r in mb.ready)
    consume_all(net, c, total)
    assert c.bodies() == list(range(total))
    assert all(m.delivery_count == 2 for m in c.messages)  # (stored before the restart)
    assert net.committed_rows() == 0 and not net.engine.windows_low


def test_a_low_window_of_a_deleted_mailbox_is_not_read(net):
    api = net.node("api")
    for start in range(0, READY_WINDOW + 600, 200):
        api.send("bulk", *range(start, start + 200))
    net.turn()
    net.restart()
    c = net.node("c")
    consumer = c.consume("bulk", prefetch=READY_WINDOW - TOP_UP_BELOW + 1)  # one delivery leaves it low
    net.engine.top_up = lambda: None  # (hold the read-ahead back: the delete comes first)
    net.turn()
    mb = net.engine.mailboxes["bulk"]
    assert mb in net.engine.boxes.low
    c.core.cancel(consumer)
    net.settle()
    admin = net.node("admin")  # (the restart ended api's session)
    done = admin.core.request(Cmd.DELETE, "bulk")
    net.settle()
    assert admin.one(Replied, done).result is None and "bulk" not in net.engine.mailboxes
    left = len(mb.ready)
    RelayEngine.top_up(net.engine)
    assert len(mb.ready) == left and not net.engine.windows_low


def test_expiry_reaches_messages_on_disk(net):
    api = net.node("api")
    api.declare("bulk", dead_letter="bulk.dlq")
    total = READY_WINDOW + 200
    for start in range(0, total, 250):
        api.send("bulk", *range(start, min(start + 250, total)), ttl=5)
    net.turn()
    net.run(seconds=6, step=1)
    assert net.status("bulk")["depth"] == 0
    assert net.status("bulk.dlq")["depth"] == total
    c = net.node("c")
    c.consume("bulk.dlq", prefetch=500)
    consume_all(net, c, total)
    assert c.bodies() == list(range(total))


def test_drop_head_across_the_window(net):
    api = net.node("api")
    limit = READY_WINDOW + 100
    api.declare("bulk", max_length=limit, overflow="drop-head")
    total = limit + 400
    for start in range(0, total, 250):
        api.send("bulk", *range(start, min(start + 250, total)))
    net.turn()
    assert all(e.errors == {} for e in api.of(Confirmed))
    assert net.status("bulk")["depth"] == limit
    c = net.node("c")
    c.consume("bulk", prefetch=500)
    consume_all(net, c, limit)
    assert c.bodies() == list(range(400, total))


# --- the client's dedup -------------------------------------------------------------------------


def _welcomed_core() -> ClientCore:
    core = ClientCore("n", b"i" * 16, heartbeat=HEARTBEAT)
    core.connection_made(T0)
    core.receive(encode(Cmd.WELCOME, "relay", HEARTBEAT, 1 << 20), T0)
    core.drain()
    return core


def _delivery(tag, msg_id, mailbox="work", count=1):
    return [tag, msg_id, mailbox, b"", pack_body("body"), T0, None, count]


def test_a_request_that_cannot_be_encoded_changes_nothing():
    """A number past 64 bits is the caller's error, raised at once: nothing
    is queued, and nothing is replayed at the next HELLO (where it would
    fail in the node's own thread, issue 12)."""
    core = _welcomed_core()
    with pytest.raises(LocalProtocolError, match="DECLARE"):
        core.request(Cmd.DECLARE, "work", {"max_length": 10 ** 23})
    with pytest.raises(LocalProtocolError, match="CONSUME"):
        core.consume("work", 10 ** 30)
    assert core.drain() == []
    core.connection_made(T0 + 1)  # a new session replays what is pending
    assert [decode(f).cmd for f in core.drain()] == [Cmd.HELLO]
    consumer, _ = core.consume("work", 10)
    assert consumer == 1  # the refused CONSUME took no consumer id


def test_client_dedup_hands_an_id_to_the_application_once():
    core = _welcomed_core()
    consumer, _ = core.consume("work", 10)
    core.drain()
    msg_id = new_id()
    [first] = core.receive(encode(Cmd.DELIVER, consumer, [_delivery(1, msg_id)]), T0)
    assert [m.id for m in first.messages] == [msg_id]
    # Another copy while the first is with the application: not handed out.
    assert core.receive(encode(Cmd.DELIVER, consumer, [_delivery(2, msg_id, count=2)]), T0) == []
    core.settle(first.messages[0], "ack", False)
    core.flush_acks()
    acks = [decode(f) for f in core.drain()]
    assert [(c.cmd, sorted(c.fields[0])) for c in acks] == [(Cmd.ACK, [1, 2])]  # the copy settles with it
    # A copy after the ack: not handed out, acked quietly.
    assert core.receive(encode(Cmd.DELIVER, consumer, [_delivery(3, msg_id, count=3)]), T0) == []
    core.flush_acks()
    assert [(decode(f).cmd, decode(f).fields) for f in core.drain()] == [(Cmd.ACK, ([3],))]


def test_client_dedup_rejects_the_copies_of_a_rejected_message():
    """A copy of a message the application rejected is rejected too (NACK
    without requeue: the relay dead-letters it), not acked away."""
    core = _welcomed_core()
    consumer, _ = core.consume("work", 10)
    core.drain()
    msg_id = new_id()
    [first] = core.receive(encode(Cmd.DELIVER, consumer, [_delivery(1, msg_id)]), T0)
    assert core.receive(encode(Cmd.DELIVER, consumer, [_delivery(2, msg_id, count=2)]), T0) == []  # kept aside
    core.settle(first.messages[0], "nack", False)
    assert sorted((decode(f).cmd, decode(f).fields) for f in core.drain()) == [
        (Cmd.NACK, ([1], False)), (Cmd.NACK, ([2], False))]
    assert core.receive(encode(Cmd.DELIVER, consumer, [_delivery(3, msg_id, count=3)]), T0) == []
    core.flush_acks()
    assert [(decode(f).cmd, decode(f).fields) for f in core.drain()] == [(Cmd.NACK, ([3], False))]


def test_client_dedup_after_requeue_hands_it_again():
    core = _welcomed_core()
    consumer, _ = core.consume("work", 10)
    msg_id = new_id()
    [ev] = core.receive(encode(Cmd.DELIVER, consumer, [_delivery(1, msg_id)]), T0)
    core.settle(ev.messages[0], "nack", True)
    [again] = core.receive(encode(Cmd.DELIVER, consumer, [_delivery(1, msg_id, count=2)]), T0)
    assert again.messages[0].redelivered


def test_client_dedup_through_the_relay(net):
    # The sender's CONFIRM is lost; the consumer acks; the sender resends
    # (retry) and the relay, which deleted the acked message, stores it
    # again.  The consumer's dedup hands it out once and acks the copy.
    api = net.node("api")
    c = net.node("c")
    c.consume("work")
    net.settle()
    net.drop_after_commit = True
    req, [msg_id] = api.send("work", "once")
    net.turn()
    net.drop_after_commit = False
    assert c.bodies() == ["once"]
    c.messages[0].ack()
    net.settle()
    assert net.committed_rows() == 0
    api.core.connection_made(net.now)
    net.settle()
    assert api.one(Confirmed, req).errors == {}
    assert c.bodies() == ["once"]
    assert net.engine.counters["delivered"] == 2
    assert net.committed_rows() == 0 and net.status("work")["depth"] == 0


# --- regressions: defects once listed in docs/protocol.md ----------------------------------------


def test_agent_working_longer_than_the_ttl_then_dying_keeps_its_plan(net):
    # The idle clock starts when the last consumer goes, even without CANCEL.
    api = net.node("api")
    api.declare("agent.e.u", ttl=10)
    api.send("agent.e.u", "plan")
    net.turn()
    agent = net.node("agent")
    agent.consume("agent.e.u")
    net.settle()
    assert agent.bodies() == ["plan"]
    net.run(seconds=30, step=1.0)  # works on it for 3 ttls
    net.silent.add(agent.identity)  # then dies without a word
    net.run(seconds=HEARTBEAT * HEARTBEAT_LIVENESS + 1, step=0.5)
    dropped_at = net.now
    assert agent.identity not in net.engine.peers
    assert net.status("agent.e.u")["ready"] == 1
    agent2 = net.node("agent2")
    agent2.consume("agent.e.u")
    net.settle()
    assert agent2.bodies() == ["plan"] and agent2.messages[0].redelivered
    assert net.now - dropped_at < 10


@pytest.mark.timeout(20)
def test_drop_head_mailboxes_dead_lettering_into_each_other_terminate(net):
    api = net.node("api")
    api.declare("ping", max_length=1, overflow="drop-head", dead_letter="pong")
    api.declare("pong", max_length=1, overflow="drop-head", dead_letter="ping")
    api.send("ping", "p1")
    api.send("pong", "q1")
    net.turn()
    req, _ = api.send("ping", "p2")  # ping drops p1 into pong, which is full
    net.turn()
    assert api.one(Confirmed, req).errors == {}
    assert net.status("ping")["depth"] == 1 and net.status("pong")["depth"] == 1
    c = net.node("c")
    c.consume("ping")
    c.consume("pong")
    net.settle()
    assert sorted(c.bodies()) == ["p2", "q1"]


def test_drop_head_refuses_a_message_larger_than_max_bytes_without_dropping(net):
    api = net.node("api")
    api.declare("small", max_bytes=20, overflow="drop-head")
    api.send("small", b"a", b"b")
    net.turn()
    req, _ = api.send("small", b"x" * 100)
    net.turn()
    assert isinstance(api.one(Confirmed, req).errors[0], MailboxFull)
    assert net.status("small")["depth"] == 2


def test_expiry_pages_past_many_held_expired_messages(net):
    api = net.node("api")
    api.declare("work", dead_letter="dlq")
    held = 1000  # one expiry batch, all with a consumer
    for start in range(0, held + 5, 250):
        api.send("work", *range(start, min(start + 250, held + 5)), ttl=2)
    c = net.node("c")
    c.consume("work", prefetch=held)
    net.settle()
    assert len(c.messages) == held
    net.run(seconds=3, step=1.0)
    assert net.status("work")["unacked"] == held
    assert net.status("work")["ready"] == 0
    assert net.status("dlq")["depth"] == 5


def test_message_requeued_after_its_expiry_expires_without_a_consumer(net):
    api = net.node("api")
    api.declare("work", dead_letter="dlq")
    api.send("work", "held", ttl=2)
    c = net.node("c")
    consumer = c.consume("work")
    net.settle()
    net.run(seconds=4, step=1.0)
    c.core.cancel(consumer)
    net.turn()
    net.run(seconds=0.5, step=0.5)  # the next tick, no consumer anywhere
    assert net.status("work")["depth"] == 0
    assert net.status("dlq")["depth"] == 1


def test_non_finite_numbers_are_refused(net):
    api = net.node("api")
    nan = float("nan")
    req = api.core.send([send_record(new_id(), "work", None, pack_body(1), net.now, nan)], net.now)
    bad_ttl = api.declare("agent.nan", ttl=nan)
    bad_msg_ttl = api.declare("agent.nan2", message_ttl=float("inf"))
    net.turn()
    assert api.one(Confirmed, req).errors[0].code == 400
    assert api.one(Failed, bad_ttl).error.code == 400
    assert api.one(Failed, bad_msg_ttl).error.code == 400
    assert "agent.nan" not in net.engine.mailboxes and "agent.nan2" not in net.engine.mailboxes
    # A NaN heartbeat would make a session immortal.
    net.engine.receive(b"immortal", encode(Cmd.HELLO, "x", b"i" * 16, nan), net.now)
    [(_, err)] = cmds(net.engine.take_output(net.now))
    assert err.cmd == Cmd.ERROR and err.fields[1] == 400
    assert b"immortal" not in net.engine.peers


def test_refused_consume_is_not_replayed_at_reconnect(net):
    c = net.node("c")
    consumer, req = c.core.consume("work", 0)  # prefetch 0: refused
    net.turn()
    assert c.one(Failed, req).error.code == 400
    assert c.core.consumer_of("work") is None
    c.core.connection_made(net.now)
    replay = [decode(f).cmd for f in c.core.drain()]
    assert replay == [Cmd.HELLO]


def test_late_ack_after_a_relay_crash_does_not_settle_another_message(net):
    p, q, c = net.node("p"), net.node("q"), net.node("c")
    c.consume("work")
    net.settle()
    # p's message reaches the relay, which delivers it before its commit ...
    p.send("work", "M")
    for frames in p.core.drain():
        net.engine.receive(p.identity, frames, net.now)
    net.engine.tick(net.now)
    net.engine.pump(net.now)
    net._route(net.engine.take_output(net.now), net.now)
    [m] = c.messages
    net.engine.prepare_commit()
    net.restart(crash=True)  # ... and dies before the commit
    # After the restart another sender's message is stored first.
    q.core.connection_made(net.now)
    q.send("work", "N")
    net.turn()
    p.core.connection_made(net.now)  # p resends M (retry)
    net.turn()
    c.core.connection_made(net.now)
    net.settle()
    assert sorted(c.bodies()) == ["M", "N"]
    n = [x for x in c.messages if x.body == "N"][0]
    m.ack()  # the application finishes M, which it got before the crash
    net.settle()
    # N was never acked by anyone: it must still be stored.
    assert not n.settled
    assert net.store.get(n.tag) is not None, "N was deleted by the ACK meant for M"


# --- a random walk: the books balance, nothing confirmed is lost, nothing acked comes back -------

# A longer search:
#   MURANO_ZMQ_WALK_EXAMPLES=400 MURANO_ZMQ_WALK_STEPS=40 python -m pytest tests/unit/test_engine.py -k walk
WALK = settings(
    max_examples=int(os.environ.get("MURANO_ZMQ_WALK_EXAMPLES", "20")),
    stateful_step_count=int(os.environ.get("MURANO_ZMQ_WALK_STEPS", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MAILBOXES = ("a", "b")
CONSUMER_NODES = ("c1", "c2", "c3")


class EngineWalk(RuleBasedStateMachine):
    """Sends, consumers coming and going, acks, nacks, dead nodes, relay
    restarts and crashes, in any order.  No limits or ttls: a message leaves
    the relay only when acked, so every confirmed one reaches an application."""

    root = None
    limits = False
    _runs = itertools.count()

    def __init__(self):
        super().__init__()
        path = self.root / f"walk{next(self._runs)}"
        path.mkdir()
        self.net = FakeNet(path)
        self.producer = self.net.node("p")
        if self.limits:
            self.producer.declare("a", max_length=1500, overflow="drop-head", message_ttl=3.0,
                                  dead_letter="b")
            self.producer.declare("b", max_length=1200, dead_letter="a", ttl=6.0)
        self.sent: dict[int, list[bytes]] = {}  # req -> ids
        self.confirmed: set[bytes] = set()
        self.acked: dict[str, set[tuple]] = {}  # node name -> keys its application acked
        self.seen: dict[str, int] = {}  # node name -> messages checked
        self.consumers: dict[str, list[int]] = {n: [] for n in CONSUMER_NODES}
        self.ever_acked: set[bytes] = set()
        self.ever_handed: set[bytes] = set()
        self.all_ids: list[bytes] = []
        self.reused: set = set()  # ids sent again on purpose
        for name in CONSUMER_NODES:
            self.net.node(name)
        self.turn()

    def teardown(self):
        try:
            self.final_drain()
        finally:
            try:
                self.net.store.close()
            except sqlite3.ProgrammingError:
                pass

    def node(self, name) -> Node:
        return self.net.nodes[name.encode()]

    def alive(self, name) -> bool:
        return self.node(name).identity not in self.net.silent

    def collect(self):
        for n in self.net.nodes.values():
            acked = self.acked.setdefault(n.name, set())
            for m in n.messages[self.seen.get(n.name, 0):]:
                key = (m.mailbox, m.id)
                assert key not in acked, f"{n.name} got {key} again after acking it"
                self.ever_handed.add(m.id)
            self.seen[n.name] = len(n.messages)
        for ev in self.producer.events:
            if isinstance(ev, Confirmed) and ev.req in self.sent:
                ids = self.sent.pop(ev.req)
                if not self.limits:
                    # Only a reused id may be refused (406: stored in another mailbox).
                    assert all(e.code == 406 and ids[k] in self.reused for k, e in ev.errors.items()), ev.errors
                self.confirmed.update(i for k, i in enumerate(ids) if k not in ev.errors)

    def turn(self, seconds=0.0):
        self.net.turn(self.net.now + seconds)
        self.collect()

    def ack(self, n: Node, m: Message):
        self.collect()  # check what came before the application acks it
        m.ack()
        self.acked.setdefault(n.name, set()).add((m.mailbox, m.id))
        self.ever_acked.add(m.id)

    # --- rules ---

    @rule(mailbox=st.sampled_from(MAILBOXES), count=st.sampled_from([1, 3, 20, 1100]),
          reuse=st.booleans())
    def send(self, mailbox, count, reuse):
        ids = [new_id() for _ in range(count)]
        if reuse and self.all_ids:
            ids[0] = self.all_ids[len(self.all_ids) // 2]  # a sender reusing an id
            self.reused.add(ids[0])
        req, _ = self.producer.send(mailbox, *[i.hex() for i in ids], ids=ids)
        self.sent[req] = ids
        self.all_ids.extend(ids)
        self.turn()

    @rule(name=st.sampled_from(CONSUMER_NODES), mailbox=st.sampled_from(MAILBOXES),
          prefetch=st.sampled_from([1, 5, 400]))
    def consume(self, name, mailbox, prefetch):
        if self.alive(name):
            self.consumers[name].append(self.node(name).consume(mailbox, prefetch))
            self.turn()

    @rule(name=st.sampled_from(CONSUMER_NODES))
    def cancel(self, name):
        if self.consumers[name] and self.alive(name):
            self.node(name).core.cancel(self.consumers[name].pop(0))
            self.turn()

    @rule(name=st.sampled_from(CONSUMER_NODES), how=st.sampled_from(["ack", "nack", "reject", "half"]))
    def settle(self, name, how):
        n = self.node(name)
        if not self.alive(name):
            return
        todo = n.unsettled()
        if how == "half":
            todo = todo[: len(todo) // 2]
        for m in todo:
            if how == "nack":
                m.nack(requeue=True)
            elif how == "reject" and self.limits:
                m.nack(requeue=False)  # dead-lettered
            else:
                self.ack(n, m)
        self.turn()

    @rule(seconds=st.sampled_from([0.5, 2.0]))
    def time_passes(self, seconds):
        self.turn(seconds)

    @rule(name=st.sampled_from(CONSUMER_NODES))
    def node_dies(self, name):
        """The node hangs until the relay gives up on it, then a new process
        (a new ClientCore, a new dedup window) takes its name."""
        n = self.node(name)
        self.net.silent.add(n.identity)
        for _ in range(HEARTBEAT_LIVENESS + 2):
            self.turn(HEARTBEAT)
        assert n.identity not in self.net.engine.peers
        self.net.silent.discard(n.identity)
        del self.net.nodes[n.identity]
        self.net.node(name)
        self.consumers[name] = []
        self.acked[name] = set()
        self.seen[name] = 0

    @rule(crash=st.booleans())
    def relay_restarts(self, crash):
        if crash:
            # In the middle of a turn: commands read, deliveries out, no commit.
            for identity, n in self.net.nodes.items():
                for frames in n.core.drain():
                    self.net.engine.receive(identity, frames, self.net.now)
            self.net.engine.tick(self.net.now)
            self.net.engine.pump(self.net.now)
            self.net._route(self.net.engine.take_output(self.net.now), self.net.now)
            self.collect()
        self.net.restart(crash=crash)
        for n in self.net.nodes.values():
            n.core.connection_made(self.net.now)
        self.turn()

    # --- checks ---

    @invariant()
    def books_balance(self):
        engine = self.net.engine
        stats = self.net.store.mailbox_stats()
        assert set(stats) <= {mb.id for mb in engine.mailboxes.values()}
        for mb in engine.mailboxes.values():
            assert (mb.count, mb.nbytes) == stats.get(mb.id, (0, 0)), mb.name
            assert mb.unacked_count == sum(len(c.unacked) for c in mb.consumers), mb.name
            assert all(len(c.unacked) <= c.prefetch for c in mb.consumers)
            ready = [r.seq for r in mb.ready]
            assert len(ready) == len(set(ready))
            assert not set(ready) & set(engine.delivery.unacked)
            assert mb.ready_count >= len(ready)
            if mb.disk_after is None:
                assert mb.ready_count == len(ready), mb.name  # nothing waits on disk only
        assert set(engine.delivery.unacked) == {s for p in engine.peers.values() for c in p.consumers.values()
                                        for s in c.unacked}

    @invariant()
    def nothing_confirmed_is_lost(self):
        if self.limits:
            return  # expiry and overflow remove messages too
        stored = set(self.net.store.mailboxes_of(sorted(self.confirmed)))
        missing = self.confirmed - stored - self.ever_acked
        assert not missing, f"{len(missing)} confirmed message(s) neither stored nor acked"

    def final_drain(self):
        """Everyone alive again; one more consumer per mailbox; all acked."""
        self.net.silent.clear()
        drainer = self.net.node("drainer")
        for mailbox in MAILBOXES:
            drainer.consume(mailbox, 1000)
        for _ in range(MAX_TURNS):
            for n in self.net.nodes.values():
                for m in n.unsettled():
                    self.ack(n, m)
            self.turn(0.1)
            if not any(mb.count for mb in self.net.engine.mailboxes.values()) and not self.sent:
                break
        assert not self.sent, "sends never confirmed"
        assert all(mb.count == 0 for mb in self.net.engine.mailboxes.values())
        if not self.limits:
            assert self.confirmed <= self.ever_handed


class EngineWalkWithLimits(EngineWalk):
    """The same walk on mailboxes with a max_length (drop-head and reject),
    a message ttl, dead-lettering into each other, and an idle ttl on "b"."""

    limits = True


def test_random_walk(tmp_path):
    EngineWalk.root = tmp_path
    run_state_machine_as_test(EngineWalk, settings=WALK)


def test_random_walk_with_limits(tmp_path):
    EngineWalkWithLimits.root = tmp_path
    run_state_machine_as_test(EngineWalkWithLimits, settings=WALK)


# --- a message's move is one commit (issue 12, item 1) ----------------------------------


def _crash_with_a_commit_in_flight(net, *senders) -> None:
    """The relay loop as relay/server.py runs it: the last turn's commit
    is still in the committer thread while this turn reads its commands;
    that commit returns, and the relay dies (kill -9) before the next."""
    net.engine.prepare_commit()  # the last turn sealed its writes; its commit is in flight
    for n in senders:
        for frames in n.core.drain():
            net.engine.receive(n.identity, frames, net.now)
    net.engine.tick(net.now)
    net.engine.pump(net.now)
    net.engine.take_output(net.now)
    net.store.commit()  # the committer thread finishes the commit it had
    net.restart(crash=True)


def _where(net, *mailboxes) -> dict:
    return {name: (net.status(name) or {}).get("depth", 0) for name in mailboxes}


def test_a_reject_into_a_new_dead_letter_mailbox_is_one_commit(net):
    api, c = net.node("api"), net.node("c")
    api.declare("work", dead_letter="dlq")  # dlq does not exist yet
    api.send("work", "m")
    c.consume("work")
    net.settle()
    [m] = c.messages
    m.nack(requeue=False)
    _crash_with_a_commit_in_flight(net, c)
    assert sum(_where(net, "work", "dlq").values()) == 1, _where(net, "work", "dlq")


def test_an_expiry_into_a_new_dead_letter_mailbox_is_one_commit(net):
    api = net.node("api")
    api.declare("work", message_ttl=5, dead_letter="dlq")
    api.send("work", "m")
    net.settle()
    net.now += 10
    _crash_with_a_commit_in_flight(net)
    assert sum(_where(net, "work", "dlq").values()) == 1, _where(net, "work", "dlq")


def test_a_drop_head_into_a_new_dead_letter_mailbox_is_one_commit(net):
    api = net.node("api")
    api.declare("small", max_length=1, overflow="drop-head", dead_letter="dlq")
    api.send("small", "a")
    net.settle()
    api.send("small", "b")  # drops a's head into dlq; b itself is not confirmed
    _crash_with_a_commit_in_flight(net, api)
    where = _where(net, "small", "dlq")
    assert where["dlq"] == 1 or where["small"] == 1, where  # a is kept somewhere


class RecordingStore(SQLiteStore):
    """A store that records what each commit held."""

    def __init__(self, path):
        super().__init__(path)
        self.commits: list[list] = []

    def commit(self):
        sealed = self._pending()[:-1]
        ops = [op for batch in sealed for op in batch.statements()]
        super().commit()
        if ops:
            self.commits.append(ops)


def test_every_dead_letter_move_commits_its_delete_and_insert_together(tmp_path):
    net = FakeNet(tmp_path)
    net.store = RecordingStore(net.dir)
    net.engine = RelayEngine(net.store, net.now)
    api, c = net.node("api"), net.node("c")
    api.declare("work", dead_letter="dlq1")
    api.declare("small", max_length=1, overflow="drop-head", dead_letter="dlq2")
    api.declare("timed", message_ttl=30, dead_letter="dlq3")
    api.send("work", "rejected")
    api.send("small", "dropped")
    api.send("timed", "expired")
    c.consume("work", prefetch=1)
    net.settle()
    c.messages[0].nack(requeue=False)
    api.send("small", "kept")
    net.settle()
    net.run(40, step=1.0)
    moved = {}  # msg id -> (commit with its delete, commit with its copy's insert)
    seqs = {}
    for n, ops in enumerate(net.store.commits):
        for kind, items in ops:
            if kind == "insert":
                for row in items:
                    if row.msg_id in seqs:  # a copy of a stored message: a move
                        moved[row.msg_id] = n
                    seqs.setdefault(row.msg_id, (row.seq, n))
    assert len(moved) == 3
    for msg_id, n in moved.items():
        first_seq = seqs[msg_id][0]
        deleted_in = [i for i, ops in enumerate(net.store.commits)
                      for kind, items in ops if kind == "delete" and first_seq in items]
        assert deleted_in == [n], (msg_id, deleted_in, n)


# --- memory: bodies out with consumers stay on disk (issue 12, item 6) ---------------


def test_unacked_messages_are_held_without_their_bodies(net):
    api, c = net.node("api"), net.node("c")
    api.send("work", *[b"x" * 1000 for _ in range(5)])
    c.consume("work", prefetch=5)
    net.settle()
    consumer = next(iter(net.engine.peers[b"c"].consumers.values()))
    assert len(consumer.unacked) == 5
    assert all(not hasattr(u, "body") for u in consumer.unacked.values())
    assert consumer.unacked_bytes == 5 * len(pack_body(b"x" * 1000))


def test_many_requeued_at_once_come_back_in_order_from_disk(net):
    total = 450  # more than the relay loads back into memory at once
    api = net.node("api")
    api.send("work", *range(total))
    a = net.node("a")
    a.consume("work", prefetch=400)
    net.settle()
    assert len(a.messages) == 400
    a.core.close()  # its 400 unacked go back
    net.settle()
    b = net.node("b")
    b.consume("work", prefetch=500)
    consume_all(net, b, total)
    assert b.bodies() == list(range(total))
    assert [m.redelivered for m in b.messages] == [True] * 400 + [False] * 50


def test_the_ready_window_is_bounded_in_bytes(net):
    from murano_zmq.relay.state import READY_WINDOW_BYTES

    big = b"y" * (512 * 1024)
    api = net.node("api")
    for i in range(12):
        api.send("big", big + bytes([i]))
    net.settle()
    mb = net.engine.mailboxes["big"]
    assert mb.ready_window_bytes <= READY_WINDOW_BYTES + len(big) + 64
    assert len(mb.ready) < 12 and mb.disk_after is not None
    net.restart()
    c = net.node("c")
    c.consume("big", prefetch=20)
    consume_all(net, c, 12)
    assert [m.body[-1] for m in c.messages] == list(range(12))
    mb = net.engine.mailboxes["big"]
    assert mb.ready_window_bytes == 0 and mb.unacked_count == 0


def _raw_consume(net, identity: bytes, mailbox: str, prefetch: int, prefetch_bytes=None, fields=6):
    net.engine.receive(identity, encode(Cmd.HELLO, identity.decode(), new_id(), 1.0), net.now)
    args = [1, 1, mailbox, prefetch, None, prefetch_bytes][:fields]
    net.engine.receive(identity, encode(Cmd.CONSUME, *args), net.now)
    net.engine.pump(net.now)
    return [decode(frames) for _, frames in net.engine.take_output(net.now)]


def test_byte_credit_bounds_what_a_consumer_holds(net):
    api = net.node("api")
    body = b"z" * 1000
    api.send("work", *[body] * 10)
    net.settle()
    out = _raw_consume(net, b"raw", "work", 100, 2500)
    delivered = [r for cmd in out if cmd.cmd == Cmd.DELIVER for r in cmd.fields[1]]
    assert len(delivered) == 2  # 2 x ~1 KiB fit in 2500 bytes, a third does not
    net.engine.receive(b"raw", encode(Cmd.ACK, [delivered[0][0]]), net.now)
    net.engine.pump(net.now)
    more = [r for _, f in net.engine.take_output(net.now) for cmd in [decode(f)]
            if cmd.cmd == Cmd.DELIVER for r in cmd.fields[1]]
    assert len(more) == 1


def test_a_message_larger_than_the_byte_credit_goes_alone(net):
    api = net.node("api")
    api.send("work", b"a" * 5000, b"b" * 10)
    net.settle()
    out = _raw_consume(net, b"raw", "work", 100, 100)
    delivered = [r for cmd in out if cmd.cmd == Cmd.DELIVER for r in cmd.fields[1]]
    assert len(delivered) == 1 and len(delivered[0][4]) > 5000


def test_consume_without_the_byte_credit_field_has_none(net):
    api = net.node("api")
    api.send("work", *range(5))
    net.settle()
    out = _raw_consume(net, b"raw", "work", 100, fields=5)
    assert [cmd.cmd for cmd in out] == [Cmd.WELCOME, Cmd.REPLY, Cmd.DELIVER]
    assert len(out[2].fields[1]) == 5


@pytest.mark.parametrize("prefetch_bytes", [0, -1, 1 << 41])
def test_byte_credit_out_of_range_is_refused(net, prefetch_bytes):
    out = _raw_consume(net, b"raw", "work", 100, prefetch_bytes)
    assert out[-1].cmd == Cmd.ERROR and out[-1].fields[1] == Malformed.code


def test_headers_are_stored_and_delivered_as_the_sender_packed_them(net):
    api, c = net.node("api"), net.node("c")
    api.send("work", "m", headers={"reply-to": "api", "n": 1})
    c.consume("work")
    net.settle()
    [m] = c.messages
    assert m.headers == {"reply-to": "api", "n": 1}
    row = net.store.load_ready(net.engine.mailboxes["work"].id, 0, 10)[0]
    assert row.headers == msgpack.packb({"reply-to": "api", "n": 1})


def test_client_core_byte_credit_survives_a_reconnect(net):
    api, c = net.node("api"), net.node("c")
    api.send("work", *[b"z" * 1000 for _ in range(6)])
    c.core.consume("work", 100, None, 2500)
    net.settle()
    assert len(c.messages) == 2
    c.core.connection_made(net.now)  # a new session: the CONSUME is replayed with its byte credit
    net.settle()
    assert net.status("work")["unacked"] == 2
    c.ack(c.unsettled())
    net.settle()
    assert len(c.messages) <= 4 and net.status("work")["unacked"] == 2
