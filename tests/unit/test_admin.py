"""PURGE, MOVE and PEEK in the engine (relay/admin.py), on test_engine's fake
link: a real SQLiteStore, no sockets, time as a number."""

from __future__ import annotations

import pytest

from murano_zmq.protocol.client import Failed, Replied
from murano_zmq.protocol.errors import Malformed, MailboxNotFound, PermissionDenied
from murano_zmq.protocol.frames import Cmd
from murano_zmq.security.permissions import Permissions

from test_engine import FakeNet  # noqa: E402  (tests/unit is on sys.path, as pytest puts it)


@pytest.fixture(params=["inline", "segments"])
def net(tmp_path, request, monkeypatch):
    """"segments": every body in a segment file (PEEK and MOVE read them back)."""
    if request.param == "segments":
        monkeypatch.setattr(FakeNet, "segment_threshold", 1)
    n = FakeNet(tmp_path)
    yield n
    n.store.close()


def ask(node, cmd: Cmd, *fields):
    req = node.core.request(cmd, *fields)
    node.net.settle()
    replied = node.of(Replied, req)
    if replied:
        return replied[0].result
    return node.one(Failed, req).error


def rows_of(net, mailbox: str) -> int:
    """Messages the store holds for `mailbox` (after the turn's commit)."""
    return net.store.mailbox_stats().get(net.engine.mailboxes[mailbox].id, (0, 0))[0]


def test_purge_drops_ready_messages_and_keeps_the_unacked(net):
    app = net.node("app")
    app.send("work", *range(5))
    app.consume("work", prefetch=2)
    net.settle()
    assert len(app.unsettled()) == 2
    result = ask(net.node("ops"), Cmd.PURGE, "work")
    assert result == {"mailbox": "work", "purged": 3, "left": 0}
    assert net.status("work")["ready"] == 0 and net.status("work")["unacked"] == 2
    assert rows_of(net, "work") == 2  # durable: the REPLY came after the commit
    app.ack(app.unsettled())
    net.settle()
    assert net.status("work")["depth"] == 0 and net.committed_rows() == 0


def test_move_keeps_ids_headers_and_bodies_and_survives_a_restart(net):
    app = net.node("app")
    _, ids = app.send("dead", "a", "b", "c", headers={"why": "failed"})
    net.settle()
    result = ask(net.node("ops"), Cmd.MOVE, "dead", "work", None)
    assert result == {"mailbox": "dead", "to": "work", "moved": 3, "left": 0, "stopped": None}
    net.restart()
    assert net.status("dead")["depth"] == 0 and net.status("work")["depth"] == 3
    worker = net.node("worker")
    worker.consume("work")
    net.settle()
    got = worker.messages
    assert [m.body for m in got] == ["a", "b", "c"]
    assert [m.id for m in got] == ids
    assert all(m.headers == {"why": "failed"} for m in got)


def test_move_with_a_limit_takes_the_oldest(net):
    app = net.node("app")
    app.send("dead", *range(5))
    net.settle()
    result = ask(net.node("ops"), Cmd.MOVE, "dead", "work", 2)
    assert (result["moved"], result["left"]) == (2, 3)
    peeked = ask(net.node("ops2"), Cmd.PEEK, "work", 10)
    assert [m[4] for m in peeked["messages"]] == [b"\x00", b"\x01"]  # packed bodies 0, 1


def test_move_stops_at_a_full_target_and_loses_nothing(net):
    app = net.node("app")
    app.declare("work", max_length=2)
    app.send("dead", *range(5))
    net.settle()
    result = ask(net.node("ops"), Cmd.MOVE, "dead", "work", None)
    assert result["moved"] == 2 and result["left"] == 3 and "full" in result["stopped"]
    assert rows_of(net, "dead") == 3 and rows_of(net, "work") == 2
    net.restart(crash=True)  # whatever was committed adds up
    assert net.status("dead")["depth"] + net.status("work")["depth"] == 5


def test_a_move_that_moves_nothing_makes_no_target(net):
    app = net.node("app")
    app.send("dead", "x")
    app.declare("empty")
    net.settle()
    ops = net.node("ops")
    assert ask(ops, Cmd.MOVE, "dead", "work", 0)["moved"] == 0
    assert ask(ops, Cmd.MOVE, "empty", "work", None)["moved"] == 0
    assert "work" not in net.engine.mailboxes


def test_a_move_never_makes_a_drop_head_target_drop_its_oldest(net):
    """A drop-head target that dead-letters into the source: its dropped
    heads went back to be moved again, and the move never ended."""
    app = net.node("app")
    app.declare("b", max_length=1, overflow="drop-head", dead_letter="a")
    app.send("a", *range(5))
    net.settle()
    result = ask(net.node("ops"), Cmd.MOVE, "a", "b", None)
    assert (result["moved"], result["left"]) == (1, 4) and "full" in result["stopped"]
    assert net.status("a")["depth"] == 4 and net.status("b")["depth"] == 1
    assert net.engine.counters.get("dead_lettered_maxlen", 0) == 0


def test_a_crash_before_the_commit_leaves_every_message_where_it_was(net):
    app = net.node("app")
    app.send("dead", *range(3))
    net.settle()
    ops = net.node("ops")
    ops.core.request(Cmd.MOVE, "dead", "work", None)
    for frames in ops.core.drain():  # the relay handles the MOVE, then dies before committing
        net.engine.receive(ops.identity, frames, net.now)
    net.engine.prepare_commit()
    net.restart(crash=True)
    assert net.status("dead")["depth"] == 3
    assert net.status("work") is None or net.status("work")["depth"] == 0


def test_peek_takes_nothing_and_reads_from_disk_after_a_restart(net):
    app = net.node("app")
    app.send("work", "x", "y", "z")
    net.settle()
    net.restart()  # the READY window is empty now: PEEK must read the store
    before = net.status("work")
    result = ask(net.node("ops"), Cmd.PEEK, "work", 2)
    assert result["ready"] == 3 and len(result["messages"]) == 2
    assert [m[7] for m in result["messages"]] == [0, 0]  # no delivery counted
    assert net.status("work") == before
    worker = net.node("worker")
    worker.consume("work")
    net.settle()
    assert worker.bodies() == ["x", "y", "z"]


@pytest.mark.parametrize("cmd, fields, error", [
    (Cmd.PURGE, ("nowhere",), MailboxNotFound),
    (Cmd.PEEK, ("nowhere", 1), MailboxNotFound),
    (Cmd.PEEK, ("work", 0), Malformed),
    (Cmd.PEEK, ("work", 1001), Malformed),
    (Cmd.MOVE, ("work", "work", None), Malformed),
    (Cmd.MOVE, ("work", "other", -1), Malformed),
    (Cmd.MOVE, ("work", "", None), Malformed),
    (Cmd.MOVE, ("work", "bad name/with slash", None), Malformed),
    (Cmd.PURGE, ("x" * 1000,), Malformed),
])
def test_bad_admin_requests_get_an_error(net, cmd, fields, error):
    net.node("app").send("work", 1)
    net.settle()
    assert isinstance(ask(net.node("ops"), cmd, *fields), error)


def test_admin_needs_the_admin_permission_on_every_mailbox_named(net):
    net.node("app").send("dead", 1)
    net.settle()
    net.engine.permissions = Permissions.from_toml('[identity.ops]\nadmin = ["dead"]\n')
    # The fake link carries no identity: authenticate the node's commands as "ops".
    receive = net.engine.receive
    net.engine.receive = lambda identity, frames, now, user=None, key=None: receive(
        identity, frames, now, "ops" if identity == b"ops" else user, key)
    ops = net.node("ops")
    assert ask(ops, Cmd.PEEK, "dead", 1)["ready"] == 1
    assert isinstance(ask(ops, Cmd.MOVE, "dead", "work", None), PermissionDenied)  # not admin of work
    assert net.status("dead")["depth"] == 1


def test_purge_and_move_take_a_batch_per_command_and_say_what_is_left(net, monkeypatch):
    from murano_zmq.relay import admin

    monkeypatch.setattr(admin, "ADMIN_BATCH", 4)
    app = net.node("app")
    app.send("dead", *range(10))
    app.send("junk", *range(6))
    net.settle()
    ops = net.node("ops")
    first = ask(ops, Cmd.MOVE, "dead", "work", None)
    assert (first["moved"], first["left"], first["stopped"]) == (4, 6, None)
    assert (ask(ops, Cmd.MOVE, "dead", "work", 3)["moved"]) == 3  # a limit under the batch
    last = ask(ops, Cmd.MOVE, "dead", "work", None)
    assert (last["moved"], last["left"]) == (3, 0)
    assert ask(ops, Cmd.PURGE, "junk") == {"mailbox": "junk", "purged": 4, "left": 2}
    assert ask(ops, Cmd.PURGE, "junk") == {"mailbox": "junk", "purged": 2, "left": 0}
    worker = net.node("worker")
    worker.consume("work")
    net.settle()
    assert worker.bodies() == list(range(10))  # in order, each once
