"""The intake's inline check (a known mailbox, no headers) stores the same
rows and reports the same errors as parse_send_record's general path."""

import os
from contextlib import contextmanager

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


# --- store_usual: a SEND of usual records to one mailbox, in one pass --------------


def usual(prefix: bytes, n: int = 6, name: str = "box"):
    rid = lambda i: prefix + i.to_bytes(15, "big")  # noqa: E731
    ttls = [None, 2.5, 7, None, 0.5, None]
    return [[rid(i), name, b"", b"body %d" % i, NOW + i, ttls[i % len(ttls)], i % 4 == 3] for i in range(n)]


def state(eng, store, name="box"):
    """What a SEND leaves behind, seqs included (both engines start alike)."""
    mb = eng.mailboxes[name]
    return (store.load_ready(mb.id, 0, 1000), list(mb.ready), mb.count, mb.nbytes, eng.dead._seq,
            eng.dead.next_expiry, eng.counters["received"], eng.counters["confirmed"])


@contextmanager
def pair(tmp_path, options=None):
    """Two engines with "box" known: one as is, one whose store_usual always
    declines (the general path alone); their stores closed after."""
    made = []
    try:
        for name in ("eng", "ref"):
            eng, store = engine(tmp_path, name)
            made.append((eng, store))
            send(eng, [[b"\xff" * 16, "box", b"", b"warm-up", NOW, None, False]])
            if options is not None:
                eng.mailboxes["box"].options = options
        made[1][0].intake.store_usual = lambda records, now: False
        yield made
    finally:
        for _, store in made:
            store.close()


def declined_alike(engines, taken: list, records: list) -> None:
    """The SEND goes the general path on both engines, with the same result."""
    (eng, store), (ref, ref_store) = engines
    assert send(eng, records) == send(ref, records)
    assert taken == [False]
    assert state(eng, store) == state(ref, ref_store)


def spied(eng) -> list:
    taken = []
    inner = eng.intake.store_usual

    def store_usual(records, now):
        taken.append(inner(records, now))
        return taken[-1]

    eng.intake.store_usual = store_usual
    return taken


def test_a_usual_send_takes_one_pass_and_agrees_with_the_general_path(tmp_path):
    from murano_zmq.protocol.options import MailboxOptions

    with pair(tmp_path, MailboxOptions(message_ttl=30)) as ((eng, store), (ref, ref_store)):
        taken = spied(eng)
        for prefix in (b"\x01", b"\x02"):
            assert send(eng, usual(prefix, 300)) == send(ref, usual(prefix, 300)) == []
        assert taken == [True, True]
        assert state(eng, store) == state(ref, ref_store)
        rows = state(eng, store)[0]
        assert len(rows) == 601 and [r.seq for r in rows] == sorted(r.seq for r in rows)
        assert {r.expires for r in rows[1:7]} == {NOW + 30, NOW + 2.5, NOW + 7, NOW + 0.5}  # (the options' default)
        assert [r.deliveries for r in rows[1:5]] == [0, 0, 0, 1]


def _swap(i, value):
    def change(records):
        records[1][i] = value
        return records
    return change


DECLINED = {
    "headers": _swap(2, b"\x81\xa1k\xa1v"),
    "another mailbox": _swap(1, "box2"),
    "unknown mailbox": _swap(1, "nobody"),
    "id repeated": lambda rs: rs + [list(rs[0])],
    "short id": _swap(0, b"\x01" * 8),
    "body too large": _swap(3, b"x" * 65),  # (the test's limit: 64)
    "bad ttl": _swap(5, float("inf")),
    "bool ttl": _swap(5, True),
    "int created": _swap(4, 5),
    "bad retry": _swap(6, 1),
    "not a record": lambda rs: rs + ["junk"],
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_store_usual_declines_what_is_not_usual_and_changes_nothing(tmp_path, case):
    with pair(tmp_path) as engines:
        for eng, _ in engines:
            send(eng, [[b"\xfe" * 16, "box2", b"", b"makes box2", NOW, None, False]])
            eng.intake.max_message_size = 64
        declined_alike(engines, spied(engines[0][0]), DECLINED[case](usual(b"\x03")))


@pytest.mark.parametrize("why", ["stored before", "limits", "permissions", "disk full"])
def test_store_usual_declines_by_relay_state(tmp_path, why):
    from murano_zmq.protocol.options import MailboxOptions

    with pair(tmp_path, MailboxOptions(max_length=1000) if why == "limits" else None) as engines:
        (eng, _), (ref, _) = engines
        records = usual(b"\x04")
        if why == "stored before":
            assert send(eng, records[:2]) == send(ref, records[:2]) == []
        taken = spied(eng)
        if why == "permissions":
            eng.sessions.permissions = object()  # (declines before asking it)
            assert eng.intake.store_usual(records, NOW) is False
            assert taken == [False]
            return
        if why == "disk full":
            eng.storage_full = ref.storage_full = True
        declined_alike(engines, taken, records)
