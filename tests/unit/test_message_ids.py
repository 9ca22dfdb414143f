"""Message ids: time-ordered, unique, and not repeated by a forked child or
by application code seeding `random`."""

from __future__ import annotations

import os
import random

import pytest

from murano_zmq.protocol.constants import ID_SIZE
from murano_zmq.protocol.message import check_name, new_message_id
from murano_zmq.protocol.errors import LocalProtocolError


def test_ids_sort_by_time_and_do_not_repeat():
    ids = [new_message_id(1_700_000_000.0 + i / 1000) for i in range(2000)]
    assert all(len(i) == ID_SIZE for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    same_ms = {new_message_id(1_700_000_000.0) for _ in range(10_000)}
    assert len(same_ms) == 10_000


def test_seeding_random_does_not_repeat_ids():
    random.seed(7)
    first = new_message_id(1.0)
    random.seed(7)
    assert new_message_id(1.0) != first


def test_a_forked_child_does_not_repeat_its_parents_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without cleanup
        os.write(write, b"".join(new_message_id(1.0) for _ in range(4)))
        os._exit(0)
    os.close(write)
    child = b""
    while len(child) < 4 * ID_SIZE:
        chunk = os.read(read, 4096)
        if not chunk:
            break
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = b"".join(new_message_id(1.0) for _ in range(4))
    assert len(child) == 4 * ID_SIZE and child != parent


@pytest.mark.parametrize("bad", [["x"], None, "", "a b", "x" * 300, b"box", "box\n", "box\r\n"])
def test_bad_names_are_refused_every_time(bad):
    for _ in range(2):  # the cache of good names must not let one through
        with pytest.raises(LocalProtocolError):
            check_name(bad)
    assert check_name("good.name") == "good.name" == check_name("good.name")


def test_a_body_that_is_not_msgpack_says_so():
    from murano_zmq.protocol.message import Message, unpack_body

    with pytest.raises(ValueError, match=r"not msgpack \(2 bytes, starting c100\)"):
        unpack_body(b"\xc1\x00")
    message = Message(bytes(16), "m", {}, b"\xc1\x00", 1.0, None, 1)
    with pytest.raises(ValueError, match="not msgpack"):
        message.body
    assert message.to_json()["body"] == {"not_msgpack": "c100"}
