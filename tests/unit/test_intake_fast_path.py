"""The intake's inline check (a known mailbox, no headers) stores the same
rows and reports the same errors as parse_send_record's general path."""

import os

import pytest

from murano_zmq.protocol.frames import Cmd, decode, encode
from murano_zmq.relay.engine import RelayEngine
from murano_zmq.store.sqlite import SQLiteStore

NOW = 1_000_000.0
PEER = b"\x00peer"


def engine(tmp_path, name):
    store = SQLiteStore(str(tmp_path / name))
    eng = RelayEngine(store, NOW)
    eng.receive(PEER, encode(Cmd.HELLO, "t", os.urandom(16), 5.0), NOW)
    eng.take_output(NOW)
    return eng, store


def send(eng, records):
    eng.receive(PEER, encode(Cmd.SEND, 1, records), NOW)
    held = eng.prepare_commit()
    eng.store.commit()
    out = [decode(f) for _, f in eng.take_output(NOW) + held]
    return [c.fields[1] for c in out if c.cmd == Cmd.CONFIRM][0]


def records(prefix: bytes):
    rid = lambda n: prefix + bytes([n]) * 15  # noqa: E731
    return [
        [rid(1), "box", b"", b"plain", NOW, None, False],
        [rid(2), "box", b"", b"ttl float", NOW, 2.5, False],
        [rid(3), "box", b"", b"ttl int", NOW, 7, False],
        [rid(4), "box", b"", b"retried", NOW, None, True],
        [rid(5), "box", b"", b"bad ttl", NOW, float("inf"), False],
        [rid(6), "box", b"", b"zero ttl", NOW, 0, False],
        [rid(7), "box", b"", b"bool ttl", NOW, True, False],
        [rid(8), "box", b"", b"int created", 5, None, False],
        [rid(9), "box", b"", b"nan created", float("nan"), None, False],
        [rid(10), "box", b"", b"bad retry", NOW, None, 1],
        [rid(1), "box", b"", b"same id again", NOW, None, False],
    ]


@pytest.mark.parametrize("fast", [True, False])
def test_fast_and_general_paths_agree(tmp_path, fast):
    # The general path: "box" unknown to the relay when the SEND arrives
    # (a record with headers would also take it).  The fast path: known.
    ref, ref_store = engine(tmp_path, "ref")
    eng, store = engine(tmp_path, "eng")
    try:
        if fast:
            send(eng, [[b"\xff" * 16, "box", b"", b"warm-up", NOW, None, False]])
        errors_ref = send(ref, records(b"\x01"))
        errors = send(eng, records(b"\x01"))
        assert errors == errors_ref
        assert [e[0] for e in errors] == [4, 5, 6, 8, 9]
        box = eng.mailboxes["box"]
        rows = [r for r in store.load_ready(box.id, 0, 100) if r.msg_id != b"\xff" * 16]
        rows_ref = ref_store.load_ready(ref.mailboxes["box"].id, 0, 100)
        strip = lambda rs: [r[2:] for r in rs]  # noqa: E731 (seqs and mailbox ids differ)
        assert strip(rows) == strip(rows_ref)
        assert [r.body for r in rows] == [b"plain", b"ttl float", b"ttl int", b"retried", b"int created"]
        assert [r.expires for r in rows] == [None, NOW + 2.5, NOW + 7, None, None]
        assert [r.deliveries for r in rows] == [0, 0, 0, 1, 0]
    finally:
        ref_store.close()
        store.close()
