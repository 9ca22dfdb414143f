"""Node's blocking send (and request) on the caller's thread
(docs/architecture.md, "Node: who owns the sockets"): a send that finds the
I/O thread asleep writes its SEND itself and polls for the CONFIRM, then
hands the sockets back.  These
tests check the concurrency that brings: many threads sending while the I/O
thread feeds a consumer, a relay that dies under a caller-owned wait, and
close() during one."""

from __future__ import annotations

import threading
import time

import pytest

from murano_zmq import Node
from murano_zmq.protocol.errors import NodeClosed, RelayUnavailable

from ..helpers import SpinSpy, free_tcp_endpoint, stopped_for, wait_for


def spy_owned(node: Node) -> tuple[threading.Event, list]:
    """An event set when a send owns the sockets, and the threads that did."""
    entered, who = threading.Event(), []
    inner = node._send_owned

    def owned(*args, **kw):
        who.append(threading.get_ident())
        entered.set()
        return inner(*args, **kw)

    node._send_owned = owned
    return entered, who


def test_lone_send_is_owned_by_the_caller(relay):
    with Node("owner", relay=relay.endpoint) as node:
        node.send("owned.warm", b"x")
        entered, who = spy_owned(node)
        for i in range(20):
            node.send("owned.box", i)
        assert entered.is_set() and set(who) == {threading.get_ident()}
        assert not node._owner.locked() or node._io_turn  # handed back
        box = node.consume("owned.box")
        assert [box.get(timeout=10).body for _ in range(20)] == list(range(20))


def test_blocking_requests_are_owned_by_the_caller(relay):
    """declare, consume, status and a refused request take the same path as
    a lone send: the caller writes the command and reads the reply (or the
    error) itself."""
    from murano_zmq.protocol.errors import MailboxNotFound

    with Node("asker", relay=relay.endpoint) as node:
        node.send("owned.warm", b"x")
        entered, who = spy_owned(node)
        offered, inner = [], node._take_sockets

        def take() -> bool:
            offered.append(inner())
            return offered[-1]

        node._take_sockets = take
        assert node.declare("owned.req", ttl=60)["name"] == "owned.req"
        box = node.consume("owned.req", direct=False)
        assert any(mb["name"] == "owned.req" for mb in node.status()["mailboxes"])
        with pytest.raises(MailboxNotFound):
            node.declare("owned.missing", passive=True)
        # Each request asks for the sockets; one that finds the I/O thread in
        # a turn longer than the caller waits (a loaded machine) goes through
        # it instead, so it is the ones that got them that must be owned.
        assert len(offered) == 4 and entered.is_set()
        assert set(who) == {threading.get_ident()} and len(who) == sum(offered)
        node.send("owned.req", 7)
        assert box.get(timeout=10).body == 7


def test_many_threads_send_while_the_io_thread_consumes(relay):
    """8 threads send (each owning the sockets when free, else through the
    I/O thread) while a consumer of the same node takes and acks another
    mailbox's stream: nothing lost, FIFO per sender, every send returns."""
    threads, per_thread = 8, 60
    with Node("busy", relay=relay.endpoint) as node, Node("feeder", relay=relay.endpoint) as feeder:
        entered, who = spy_owned(node)
        incoming = node.consume("owned.in", prefetch=50)
        feed = threading.Thread(target=lambda: feeder.send_many([("owned.in", i) for i in range(500)]))
        feed.start()
        consumed: list = []

        def consume() -> None:
            while len(consumed) < 500:
                m = incoming.get(timeout=30)
                if m is None:
                    return
                consumed.append(m.body)
                m.ack()

        consumer = threading.Thread(target=consume)
        consumer.start()
        errors: list = []

        def sender(k: int) -> None:
            try:
                for i in range(per_thread):
                    node.send("owned.out", [k, i], timeout=30)
            except Exception as exc:  # reported below
                errors.append(exc)

        senders = [threading.Thread(target=sender, args=(k,)) for k in range(threads)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        feed.join(60)
        consumer.join(60)
        assert not errors
        assert sorted(consumed) == list(range(500))
        assert entered.is_set()  # at least some sends took the sockets
        out = node.consume("owned.out", prefetch=100)
        got: dict[int, list] = {}
        for _ in range(threads * per_thread):
            m = out.get(timeout=10)
            assert m is not None
            k, i = m.body
            got.setdefault(k, []).append(i)
            m.ack()
        assert got == {k: list(range(per_thread)) for k in range(threads)}


def test_owned_send_survives_the_relay_dying(relay_factory, tmp_path):
    """The relay is killed (SIGKILL) while a send owns the sockets and waits:
    the caller's own turns see the connection drop, open a new session when
    the relay is back and replay; the send returns, the message is stored."""
    endpoint, data = free_tcp_endpoint(), str(tmp_path / "data")
    relay = relay_factory(endpoint=endpoint, data_dir=data)
    with Node("survivor", relay=endpoint, heartbeat=0.2) as node:
        node.send("owned.warm", b"x")
        relay.kill()
        entered, _ = spy_owned(node)
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("id", node.send("owned.kept", b"kept", timeout=30)))
        t.start()
        assert entered.wait(10)
        relay_factory(endpoint=endpoint, data_dir=data)
        t.join(40)
        assert "id" in result
        box = node.consume("owned.kept")
        m = box.get(timeout=10)
        assert m is not None and m.id == result["id"] and m.body == b"kept"


def test_owned_send_times_out_and_is_delivered_later(relay_factory, tmp_path):
    endpoint, data = free_tcp_endpoint(), str(tmp_path / "data")
    relay = relay_factory(endpoint=endpoint, data_dir=data)
    with Node("late", relay=endpoint, heartbeat=0.2) as node:
        node.send("owned.warm", b"x")
        relay.kill()
        t0 = time.monotonic()
        with pytest.raises(RelayUnavailable):
            node.send("owned.late", b"late", timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert not node._owner.locked() or node._io_turn  # handed back after the time-out
        relay_factory(endpoint=endpoint, data_dir=data)
        box = node.consume("owned.late", timeout=20)
        m = box.get(timeout=20)
        assert m is not None and m.body == b"late"  # the node kept trying


def test_close_while_a_caller_owns_the_sockets():
    """No relay answers: a send owns the sockets and waits; close() from
    another thread ends it with NodeClosed at once, and returns."""
    node = Node("closing", relay=free_tcp_endpoint(), direct=False)
    entered, _ = spy_owned(node)
    raised: list = []

    def send() -> None:
        try:
            node.send("owned.never", b"x", timeout=60)
        except BaseException as exc:  # checked below
            raised.append(exc)

    t = threading.Thread(target=send)
    t.start()
    assert entered.wait(10)
    wait_for(lambda: node._owner.locked() and not node._io_turn, 5, what="the caller owning the sockets")
    t0 = time.monotonic()
    node.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 10
    assert len(raised) == 1 and isinstance(raised[0], NodeClosed)
    with pytest.raises(NodeClosed):
        node.send("owned.never", b"y", timeout=1)


def test_handler_sends_for_each_message_it_consumes(relay):
    """The agent's loop: take a request, send the reply (owning the sockets
    while the I/O thread may be feeding the consumer), ack the request."""
    with Node("agent", relay=relay.endpoint) as agent, Node("asker", relay=relay.endpoint) as asker:
        requests = agent.consume("owned.req", prefetch=20)
        asker.send_many([("owned.req", i) for i in range(200)])
        for _ in range(200):
            m = requests.get(timeout=20)
            assert m is not None
            agent.send("owned.rep", m.body, timeout=20)
            m.ack()
        replies = asker.consume("owned.rep", prefetch=100)
        got = []
        for _ in range(200):
            m = replies.get(timeout=20)
            assert m is not None
            got.append(m.body)
            m.ack()
        assert got == list(range(200))


def test_sockets_replaced_while_the_io_thread_sleeps_on_their_fds(relay):
    """While the I/O thread sleeps on the sockets' FDs, a caller that owns
    the sockets may replace one (a new relay socket after the relay died, a
    direct link closed).  The FDs that woke the thread then belong to the
    old set: asking the closed socket killed the I/O thread ("Socket
    operation on non-socket"; seen in bench/chaos.py)."""
    with Node("swapper", relay=relay.endpoint, direct=False) as node:
        node.send("swap.box", 0)
        wait_for(lambda: node._sleep is not None, 10, what="the I/O thread's sleep on FDs")
        sleep, swapped = node._sleep, threading.Event()
        inner = sleep.wait

        def wait(timeout_ms):
            if swapped.is_set():
                return inner(timeout_ms)
            old = [fd for fd, sock in node._io._by_fd.items() if sock is node._io._sock]
            node._io.connect(time.time())  # what a caller's turn does when its relay is lost
            swapped.set()
            return False, old  # the old relay socket's FD fired

        sleep.wait = wait
        deadline = time.monotonic() + 10
        while not swapped.is_set() and time.monotonic() < deadline:
            node.send("swap.box", 1)  # owned sends keep the I/O thread's sleeps on the FDs
        assert swapped.is_set(), "the I/O thread never slept on the FDs"
        node.send("swap.box", 2)
        assert not node._closed.is_set(), "the I/O thread died"
        assert node.status(timeout=10)["mailboxes"][0]["depth"] >= 3


def test_a_wait_spins_only_while_answers_come_within_the_spin(relay):
    """A blocking send looks for its CONFIRM without sleeping for up to
    `spin` seconds, then sleeps; after an answer slower than that (here the
    relay stopped for a while) the next wait sleeps at once, and once an
    answer comes within the spin again, the one after spins again."""
    import murano_zmq.node.owned as owned

    def until_quick(node: Node) -> None:
        for _ in range(50):  # (a loaded machine may take longer than the spin now and then)
            node.send("spin.box", b"x")
            if node._spin_pays:
                return
        raise AssertionError("no answer within the spin in 50 sends")

    def spins_after_quick(node: Node, spy: SpinSpy) -> bool:
        """Does a send right after a quick answer spin?  A few tries: on a
        loaded machine the I/O thread may be in a turn of its own (a
        heartbeat) when the send comes, and then takes its CONFIRM."""
        for _ in range(5):
            until_quick(node)
            spy.clear()
            node.send("spin.box", b"x")
            if spy.spins:
                return True
        return False

    with SpinSpy(owned) as spy:
        with Node("spinner", relay=relay.endpoint, spin=0.005) as node:
            assert spins_after_quick(node, spy), "a wait after a quick answer spins first"
            assert any(spy.found), "the spins found the CONFIRMs"
            with stopped_for(relay.pid, 0.2):
                node.send("spin.box", b"slow")  # its answer: after the relay comes back
            assert not node._spin_pays
            spy.clear()
            node.send("spin.box", b"x")
            assert spy.spins == [], "a wait after a slow answer sleeps at once"
            assert spins_after_quick(node, spy), "an answer within the spin again: the next wait spins again"
        with Node("sleeper", relay=relay.endpoint, spin=0) as node:
            spy.clear()
            for i in range(5):
                node.send("spin.none", i)
            assert spy.spins == [], "spin=0: every wait sleeps at once"
            assert node.consume("spin.none").get(timeout=10).body == 0
