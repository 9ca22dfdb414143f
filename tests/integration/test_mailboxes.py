"""Durable mailboxes against a real relay process, through Node and AsyncNode."""

from __future__ import annotations

import pytest

from murano_zmq import MailboxFull, MailboxNotFound, MessageTooLarge, PreconditionFailed

from ..helpers import wait_for
from .nodes import NODE_KINDS


def drain(consumer, n: int, timeout: float = 10.0, ack: bool = False) -> list:
    got = []
    while len(got) < n:
        m = consumer.get(timeout=timeout)
        assert m is not None, f"got {len(got)} of {n} messages"
        got.append(m)
        if ack:
            m.ack()
    return got


def mailbox_status(node, name: str) -> dict | None:
    for mb in node.status()["mailboxes"]:
        if mb["name"] == name:
            return mb
    return None


def test_message_waits_for_its_first_consumer(make_node):
    sender = make_node("conductor")
    sender.declare("agent.env1.unit1", ttl=60)
    sent = sender.send("agent.env1.unit1", {"plan": [1, 2, 3]}, headers={"kind": "plan"})
    assert mailbox_status(sender, "agent.env1.unit1")["depth"] == 1
    agent = make_node("agent")
    (msg,) = drain(agent.consume("agent.env1.unit1"), 1)
    assert msg.id == sent
    assert msg.body == {"plan": [1, 2, 3]}
    assert msg.headers == {"kind": "plan"}
    assert not msg.redelivered and msg.delivery_count == 1
    msg.ack()
    wait_for(lambda: mailbox_status(sender, "agent.env1.unit1")["depth"] == 0, 10, what="ack")


def test_bodies_any_msgpack_value_or_bytes(make_node):
    node = make_node("n")
    bodies = [b"\x00\xffraw", "text", 7, 1.5, None, [1, "a"], {"k": {"n": [True]}}]
    node.send_many([("bodies", b) for b in bodies])
    got = drain(node.consume("bodies"), len(bodies))
    assert [m.body for m in got] == bodies
    for m in got:
        m.ack()


def test_fifo_per_sender_and_pipelined_sends(make_node):
    node = make_node("n")
    ids = node.send_many([("fifo", i) for i in range(2000)])
    assert len(set(ids)) == 2000
    consumer = node.consume("fifo", prefetch=300)
    got = drain(consumer, 2000, ack=True)
    assert [m.body for m in got] == list(range(2000))


def test_competing_consumers_share_a_mailbox(make_node):
    sender = make_node("api")
    a, b = make_node("conductor-a"), make_node("conductor-b")
    # Through the relay: its credit shares the work (the direct path's
    # competing consumers: test_direct.py's test_competing_direct_consumers_...).
    ca, cb = a.consume("tasks", prefetch=5, direct=False), b.consume("tasks", prefetch=5, direct=False)
    sender.send_many([("tasks", i) for i in range(200)])
    seen: dict[str, list] = {"a": [], "b": []}

    def take_some(consumer, key):
        m = consumer.get(timeout=0.05)
        if m is not None:
            seen[key].append(m.body)
            m.ack()

    def all_taken():
        take_some(ca, "a")
        take_some(cb, "b")
        return len(seen["a"]) + len(seen["b"]) == 200

    wait_for(all_taken, 30, interval=0, what="200 tasks")
    assert sorted(seen["a"] + seen["b"]) == list(range(200))
    assert seen["a"] and seen["b"], "both consumers must get work"
    assert not set(seen["a"]) & set(seen["b"])


def test_nack_requeues_and_marks_redelivered(make_node):
    node = make_node("n")
    node.send("retry", "again")
    consumer = node.consume("retry")
    (first,) = drain(consumer, 1)
    first.nack(requeue=True)
    (second,) = drain(consumer, 1)
    assert second.id == first.id
    assert second.redelivered and second.delivery_count == 2
    second.ack()


def test_nack_without_requeue_dead_letters(make_node):
    node = make_node("n")
    node.declare("work", dead_letter="work.dead")
    node.send("work", "poison")
    (msg,) = drain(node.consume("work"), 1)
    msg.nack(requeue=False)
    (dead,) = drain(node.consume("work.dead"), 1)
    assert dead.body == "poison"
    assert dead.headers["x-death"]["reason"] == "rejected"
    assert dead.headers["x-death"]["mailbox"] == "work"
    dead.ack()


def test_a_poison_message_leaves_at_its_delivery_limit(make_node):
    node = make_node("n")
    node.declare("work", dead_letter="work.dead", delivery_limit=2)
    node.send_many([("work", "poison"), ("work", "good")])
    consumer = node.consume("work", prefetch=1)
    for count in (1, 2):
        (msg,) = drain(consumer, 1)
        assert (msg.body, msg.delivery_count) == ("poison", count)
        msg.nack(requeue=True)
    (good,) = drain(consumer, 1)
    assert good.body == "good"
    good.ack()
    (dead,) = drain(node.consume("work.dead"), 1)
    assert dead.body == "poison" and dead.headers["x-death"]["reason"] == "delivery_limit"
    dead.ack()
    with pytest.raises(PreconditionFailed):
        node.declare("work", dead_letter="work.dead", delivery_limit=3)
    with pytest.raises(ValueError, match="delivery_limit"):
        node.declare("other", delivery_limit=0)


def test_idle_mailbox_expires_with_its_messages(make_node):
    node = make_node("n")
    node.declare("agent.gone", ttl=2.0)
    node.send("agent.gone", "never read")
    status = mailbox_status(node, "agent.gone")
    assert status is None or (status["depth"] == 1 and status["expires_in"] <= 2.0)
    wait_for(lambda: mailbox_status(node, "agent.gone") is None, 10, what="mailbox expiry")


def test_consumer_keeps_a_ttl_mailbox_alive(make_node):
    node = make_node("n")
    node.declare("agent.alive", ttl=1.0)
    consumer = node.consume("agent.alive")
    other = make_node("other")
    assert mailbox_status(other, "agent.alive")["declared"], "still the declared one"
    # Three TTLs later it is still there, because a consumer is attached.
    wait_for(lambda: mailbox_status(other, "agent.alive")["idle"] > 3.0, 15, what="idle time")
    assert mailbox_status(other, "agent.alive")["consumers"] == 1
    consumer.cancel()
    wait_for(lambda: mailbox_status(other, "agent.alive") is None, 10, what="expiry after cancel")


def test_message_ttl_expires_into_dead_letter(make_node):
    node = make_node("n")
    node.declare("short", message_ttl=0.3, dead_letter="short.dead")
    node.send("short", "stale")
    node.send("short", "stale too", ttl=0.2)
    node.send("short", "kept", ttl=60)
    wait_for(lambda: mailbox_status(node, "short.dead") and mailbox_status(node, "short.dead")["depth"] == 2,
             10, what="dead-lettered messages")
    assert mailbox_status(node, "short")["depth"] == 1
    dead = drain(node.consume("short.dead"), 2)
    assert sorted(m.body for m in dead) == ["stale", "stale too"]
    assert {m.headers["x-death"]["reason"] for m in dead} == {"expired"}
    (live,) = drain(node.consume("short"), 1)
    assert live.body == "kept"


def test_max_length_reject_keeps_stored_messages(make_node):
    node = make_node("n")
    node.declare("small", max_length=3)
    node.send_many([("small", i) for i in range(3)])
    with pytest.raises(MailboxFull, match="full"):
        node.send("small", 3)
    assert mailbox_status(node, "small")["depth"] == 3
    assert [m.body for m in drain(node.consume("small"), 3)] == [0, 1, 2]


def test_max_length_drop_head(make_node):
    node = make_node("n")
    node.declare("ring", max_length=2, overflow="drop-head", dead_letter="ring.dead")
    node.send_many([("ring", i) for i in range(5)])
    assert [m.body for m in drain(node.consume("ring"), 2)] == [3, 4]
    dropped = drain(node.consume("ring.dead"), 3)
    assert [m.body for m in dropped] == [0, 1, 2]
    assert dropped[0].headers["x-death"]["reason"] == "maxlen"


def test_max_bytes_reject(make_node):
    node = make_node("n")
    node.declare("bytes", max_bytes=2000)
    node.send("bytes", b"x" * 1500)
    with pytest.raises(MailboxFull):
        node.send("bytes", b"y" * 1000)


def test_declare_conflict_and_passive(make_node):
    node = make_node("n")
    node.declare("conf", ttl=10)
    node.declare("conf", ttl=10)  # same options: fine
    with pytest.raises(PreconditionFailed, match="exists with options"):
        node.declare("conf", ttl=20)
    with pytest.raises(MailboxNotFound):
        node.declare("missing", passive=True)
    assert node.declare("conf", passive=True)["name"] == "conf"


def test_bad_arguments_are_clear_errors(make_node):
    node = make_node("n")
    with pytest.raises(ValueError, match="overflow"):
        node.declare("x", overflow="explode")
    with pytest.raises(ValueError, match="ttl"):
        node.declare("x", ttl=-1)
    with pytest.raises(Exception, match="invalid mailbox name"):
        node.send("has space", "body")
    with pytest.raises(Exception, match="msgpack"):
        node.send("ok", object())


def test_oversized_message_is_refused(relay_factory):
    small = relay_factory("--max-message-size", "1000")
    for kind in sorted(NODE_KINDS):
        with NODE_KINDS[kind]("n", relay=small.endpoint, timeout=15) as node:
            node.status()  # handshake done: the node knows the relay's limit
            with pytest.raises(MessageTooLarge, match="limit of 1000"):
                node.send("big", b"x" * 5000)
            node.send("big", b"x" * 500)
            status = node.status()
    assert [mb["depth"] for mb in status["mailboxes"] if mb["name"] == "big"] == [2]


def test_delete_mailbox(make_node):
    node = make_node("n")
    node.send("trash", 1)
    node.delete("trash")
    assert mailbox_status(node, "trash") is None
    with pytest.raises(MailboxNotFound):
        node.delete("trash")
