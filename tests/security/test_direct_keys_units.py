"""The keyed direct path without sockets: LOOKUP names the key a consumer's
session authenticated with, the path table uses only endpoints with a key,
the receiving end refuses what the permissions refuse and keys no longer
authorized; and the shared ZAP handler serves one domain per server."""

from __future__ import annotations

import pytest
import zmq

from murano_zmq.protocol.dedup import DedupWindow
from murano_zmq.protocol.direct import DirectLink, LinkFailed
from murano_zmq.protocol.inbox import DirectInbox
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import new_message_id, send_record
from murano_zmq.protocol.paths import FAILED_BACKOFF, REFUSED_BACKOFF, PathTable
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.security import KeyCheck, Permissions, serve_domain
from murano_zmq.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(30)

KEY_A = "A" * 40
KEY_B = "B" * 40
RULES = """
[identity."agent-*"]
send = ["results"]
[identity.conductor]
send = ["agent.*", "results"]
"""


def test_lookup_names_each_direct_consumer_with_its_sessions_key(tmp_path):
    store = SQLiteStore(str(tmp_path / "db"))
    try:
        e = RelayEngine(store, 0.0, "test")
        e.receive(b"c", encode(Cmd.HELLO, "cons", b"c" * 16, 1.0), 1.0, "conductor", KEY_A)
        e.receive(b"c", encode(Cmd.CONSUME, 1, 1, "results", 10, "tcp://127.0.0.1:4000"), 1.0, "conductor", KEY_A)
        e.receive(b"s", encode(Cmd.HELLO, "send", b"s" * 16, 1.0), 1.0, "agent-1", KEY_B)
        e.receive(b"s", encode(Cmd.LOOKUP, 2, "results"), 1.0, "agent-1", KEY_B)
        out = [decode(frames) for identity, frames in e.take_output(1.0) if identity == b"s"]
        reply = [c for c in out if c.cmd == Cmd.REPLY][0]
        assert reply.fields[1]["direct"] == [["cons", "tcp://127.0.0.1:4000", KEY_A]]
    finally:
        store.close()


def test_a_keyed_path_table_uses_only_endpoints_with_a_key():
    paths = PathTable(require_keys=True)
    has_room = lambda endpoint: True  # noqa: E731
    paths.looked_up("m", {"depth": 0, "direct": [["n", "tcp://h:1", None], ["old", "tcp://h:2"]]}, 0.0)
    assert paths.choose("m", has_room, 0.0) is None and not paths.is_direct("m")
    paths.looked_up("m", {"depth": 0, "direct": [["n", "tcp://h:1", KEY_A]]}, 1.0)
    assert paths.choose("m", has_room, 1.0) == "tcp://h:1"
    assert paths.key_of("tcp://h:1") == KEY_A.encode()
    # A pinned advert's key counts; an advert without one does not.
    paths.discovered("d", {"tcp://h:3": KEY_B, "tcp://h:4": None})
    assert paths.choose("d", has_room, 1.0) == "tcp://h:3"
    assert paths.key_of("tcp://h:4") is None
    paths.discovered("d", {})
    assert paths.key_of("tcp://h:3") is None and not paths.is_direct("d")
    def offered(at: float, endpoint: str = "tcp://h:1") -> str | None:
        """What the sender chooses once LOOKUP offers `endpoint` at `at`."""
        paths.looked_up("m", {"depth": 0, "direct": [["n", endpoint, KEY_A]]}, at)
        return paths.choose("m", has_room, at)

    # A peer that refused this node's key in the handshake is left alone for
    # a while, whatever LOOKUP says meanwhile.
    paths.link_refused("tcp://h:1", 2.0)
    assert offered(3.0) is None
    assert offered(2.0 + REFUSED_BACKOFF) == "tcp://h:1"
    # A link that fails twice in a row (no CONFIRM between) leaves its
    # endpoint alone for FAILED_BACKOFF, then twice that...: an endpoint
    # that never answers cost every other send the direct timeout.
    paths.link_failed("tcp://h:1", 40.0)
    assert offered(41.0) == "tcp://h:1"  # (once is a stall, or a restart)
    paths.link_failed("tcp://h:1", 46.0)
    assert offered(47.0) is None
    assert offered(46.0 + FAILED_BACKOFF) == "tcp://h:1"
    paths.link_failed("tcp://h:1", 60.0)
    assert offered(60.0 + FAILED_BACKOFF) is None  # (doubled)
    for i in range(2000):  # (an endpoint failing for days: the hold stays bounded, no float overflows)
        paths.link_failed("tcp://h:9", 60.0 + i)
    paths.link_worked("tcp://h:1")  # a CONFIRM: the count starts again
    offered(60.0 + 2 * FAILED_BACKOFF)
    paths.link_failed("tcp://h:1", 70.0)
    assert offered(71.0) == "tcp://h:1"
    # An endpoint no other process can reach, as a (hostile) relay offers it, is never a candidate.
    assert offered(80.0, "inproc://zeromq.zap.01") is None
    paths.discovered("d", {"inproc://zeromq.zap.01": KEY_B, "garbage": KEY_B})  # (an advert: the same)
    assert paths.choose("d", has_room, 80.0) is None and not paths.is_direct("d")
    # Without keys nothing changes: any endpoint is a candidate.
    plain = PathTable()
    plain.looked_up("m", {"depth": 0, "direct": [["n", "tcp://h:1"]]}, 0.0)
    assert plain.choose("m", has_room, 0.0) == "tcp://h:1"


def _send(inbox, identity, records, user, consumers):
    return inbox.receive(identity, encode(Cmd.SEND, 1, records), 1.0, consumers, user)


def test_the_receiving_end_refuses_what_the_permissions_refuse():
    inbox = DirectInbox("conductor", 1 << 20, DedupWindow())
    inbox.permissions = Permissions.from_toml(RULES)
    consumers = {"results": 1, "conductor": 2}
    inbox.receive(b"p", encode(Cmd.HELLO, "agent", b"i" * 16, 1.0), 1.0, consumers, "agent-1")
    inbox.drain()
    records = [send_record(new_message_id(1.0), "conductor", None, b"\xa1x", 1.0, None),
               send_record(new_message_id(1.0), "results", None, b"\xa1y", 1.0, None)]
    delivered = _send(inbox, b"p", records, "agent-1", consumers)
    assert [m.mailbox for d in delivered for m in d.messages] == ["results"]
    assert inbox.refused == 1
    for d in delivered:
        for m in d.messages:
            inbox.settle(m, "ack", False)
    confirm = decode(inbox.drain()[-1][1])
    assert confirm.cmd == Cmd.CONFIRM and confirm.fields[1][0][:2] == [0, 403]

    # The sender hands the refused record (and what follows) to the relay.
    link = DirectLink("tcp://h:1", "agent", b"i" * 16, 0.0)
    link.receive(encode(Cmd.WELCOME, "conductor", 1.0, 1 << 20), 0.0)
    link.send(records, 0.0)
    events = link.receive(encode(Cmd.CONFIRM, 1, confirm.fields[1]), 0.0)
    failed = [ev for ev in events if isinstance(ev, LinkFailed)]
    assert failed and failed[0].records == records[:1] and "403" in failed[0].reason


def test_a_key_no_longer_authorized_gets_error_403_and_loses_its_session():
    inbox = DirectInbox("conductor", 1 << 20, DedupWindow())
    inbox.receive(b"p", encode(Cmd.HELLO, "agent", b"i" * 16, 1.0), 1.0, {}, "agent-1")
    inbox.drain()
    inbox.refuse(b"p", "key X is not authorized by conductor")
    error = decode(inbox.drain()[0][1])
    assert error.cmd == Cmd.ERROR and error.fields[1] == 403
    inbox.receive(b"p", encode(Cmd.HEARTBEAT), 1.0, {}, "agent-1")
    assert decode(inbox.drain()[0][1]).fields[1] == 409  # no session any more


def test_one_zap_handler_serves_a_domain_per_server():
    ctx = zmq.Context()
    try:
        first = serve_domain(ctx, "d1", KeyCheck(None))
        second = serve_domain(ctx, "d2", KeyCheck(None))
        with pytest.raises(RuntimeError, match="already served"):
            serve_domain(ctx, "d1", KeyCheck(None))
        first.stop()
        third = serve_domain(ctx, "d1", KeyCheck(None))  # the handler still runs for d2
        second.stop()
        third.stop()
        again = serve_domain(ctx, "d1", KeyCheck(None))  # the last lease stopped it; a new one starts
        again.stop()
    finally:
        ctx.destroy(0)
