"""DirectInbox (the receiving end of direct links), without sockets."""

from __future__ import annotations

from murano_zmq.protocol.dedup import DedupWindow
from murano_zmq.protocol.inbox import DirectInbox
from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.protocol.message import new_message_id, pack_body, send_record

PEER = b"peer-1"


def inbox_with_session():
    dedup = DedupWindow()
    inbox = DirectInbox("receiver", 1 << 20, dedup)
    inbox.receive(PEER, encode(Cmd.HELLO, "sender", b"i" * 16, 1.0), 0.0, {})
    assert [decode(f).cmd for _, f in inbox.drain()] == [Cmd.WELCOME]
    return inbox, dedup


def confirms(inbox) -> list:
    return [decode(f).fields for _, f in inbox.drain() if decode(f).cmd == Cmd.CONFIRM]


def test_a_send_is_confirmed_when_the_application_acked_every_record():
    inbox, _ = inbox_with_session()
    records = [send_record(new_message_id(1.0), "work", None, pack_body(i), 1.0, None) for i in range(3)]
    [delivered] = inbox.receive(PEER, encode(Cmd.SEND, 7, records), 1.0, {"work": 1})
    assert [m.body for m in delivered.messages] == [0, 1, 2]
    for m in delivered.messages[:2]:
        inbox.settle(m, "ack", False)
    assert confirms(inbox) == []
    inbox.settle(delivered.messages[2], "ack", False)
    assert confirms(inbox) == [(7, [])]


def test_records_for_a_mailbox_without_consumer_are_refused():
    inbox, _ = inbox_with_session()
    record = send_record(new_message_id(1.0), "elsewhere", None, pack_body(1), 1.0, None)
    assert inbox.receive(PEER, encode(Cmd.SEND, 3, [record]), 1.0, {"work": 1}) == []
    [(req, errors)] = confirms(inbox)
    assert req == 3 and errors[0][0] == 0 and errors[0][1] == 404
    assert errors[0][2] == "no consumer of elsewhere here"


def test_a_record_over_the_limit_is_refused_as_if_no_consumer_were_here():
    """docs/protocol.md (Direct links, SEND): 404 with the same text, so the
    sender gives the record to the relay, whose own limit decides."""
    inbox, _ = inbox_with_session()  # limit: 1 MiB, body plus packed headers
    records = [send_record(new_message_id(1.0), "work", None, b"x" * ((1 << 20) + 1), 1.0, None),
               send_record(new_message_id(1.0), "work", {"k": "v"}, b"x" * ((1 << 20) - 4), 1.0, None),
               send_record(new_message_id(1.0), "work", None, pack_body("fits"), 1.0, None)]
    [delivered] = inbox.receive(PEER, encode(Cmd.SEND, 4, records), 1.0, {"work": 1})
    assert [m.body for m in delivered.messages] == ["fits"]
    inbox.settle(delivered.messages[0], "ack", False)
    [(req, errors)] = confirms(inbox)
    assert req == 4 and errors == [[0, 404, "no consumer of work here"], [1, 404, "no consumer of work here"]]


def test_a_copy_whose_twin_is_with_the_application_waits_for_it():
    """If the copy the application holds came direct from a sender that then
    died, this second copy is the only one left: it must not be confirmed
    before the application settled the first."""
    inbox, dedup = inbox_with_session()
    msg_id = new_message_id(1.0)
    assert dedup.offer(("work", msg_id), 1) == "fresh"  # the first copy, with the application
    record = send_record(msg_id, "work", None, pack_body("result"), 1.0, None)
    assert inbox.receive(PEER, encode(Cmd.SEND, 9, [record]), 1.0, {"work": 1}) == []
    assert confirms(inbox) == [], "confirmed before the application settled its copy"
    dedup.settle(("work", msg_id), True)
    inbox.settled_elsewhere(("work", msg_id))
    assert confirms(inbox) == [(9, [])]


def test_headers_reach_the_application_as_sent():
    inbox, _ = inbox_with_session()
    records = [send_record(new_message_id(1.0), "work", {"task": "t1", "n": [1, 2]}, pack_body(1), 1.0, None),
               send_record(new_message_id(1.0), "work", None, pack_body(2), 1.0, None),
               send_record(new_message_id(1.0), "work", {}, pack_body(3), 1.0, None)]
    [delivered] = inbox.receive(PEER, encode(Cmd.SEND, 8, records), 1.0, {"work": 1})
    assert [m.headers for m in delivered.messages] == [{"task": "t1", "n": [1, 2]}, {}, {}]


def test_a_sender_past_its_window_loses_its_session():
    """A consumer's prefetch does not reach its direct senders, so an honest
    one keeps at most its window out (DEFAULT_WINDOW records,
    DIRECT_WINDOW_BYTES and one record more); a raw sender that ignored it
    pushed 1,500 bodies of 1 MiB into a consumer that read none.  Now its
    session ends with ERROR (and its sender gives the rest to the relay)."""
    from murano_zmq.protocol.constants import DIRECT_WINDOW_BYTES

    inbox, _ = inbox_with_session()  # limit: 1 MiB per message
    body = b"x" * (1 << 20)
    per_send = 4
    sends = (DIRECT_WINDOW_BYTES + (1 << 20)) // (per_send * len(body) + 20)
    for req in range(1, sends + 1):
        records = [send_record(new_message_id(1.0), "work", None, body, 1.0, None) for _ in range(per_send)]
        assert inbox.receive(PEER, encode(Cmd.SEND, req, records), 1.0, {"work": 1})
    assert [decode(f).cmd for _, f in inbox.drain()] == []
    one_more = [send_record(new_message_id(1.0), "work", None, body, 1.0, None) for _ in range(per_send)]
    assert inbox.receive(PEER, encode(Cmd.SEND, sends + 1, one_more), 1.0, {"work": 1}) == []
    [(_, frames)] = inbox.drain()
    assert decode(frames).cmd == Cmd.ERROR and "window" in decode(frames).fields[2]
    inbox.receive(PEER, encode(Cmd.SEND, sends + 2, one_more[:1]), 1.0, {"work": 1})
    assert decode(inbox.drain()[0][1]).fields[2] == "say HELLO first"  # (the session is gone)


def test_a_window_held_by_the_application_is_given_back_as_it_settles():
    inbox, _ = inbox_with_session()
    from murano_zmq.protocol.constants import DEFAULT_WINDOW

    delivered = []
    for req in range(1, DEFAULT_WINDOW // 100 + 1):
        records = [send_record(new_message_id(1.0), "work", None, pack_body(i), 1.0, None) for i in range(100)]
        [d] = inbox.receive(PEER, encode(Cmd.SEND, req, records), 1.0, {"work": 1})
        delivered += d.messages
    for m in delivered[:100]:
        inbox.settle(m, "ack", False)
    assert confirms(inbox) == [(1, [])]
    records = [send_record(new_message_id(1.0), "work", None, pack_body(i), 1.0, None) for i in range(100)]
    [d] = inbox.receive(PEER, encode(Cmd.SEND, 99, records), 1.0, {"work": 1})  # room again: taken
    assert len(d.messages) == 100 and inbox.drain() == []
