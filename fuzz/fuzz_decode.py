"""Coverage-guided fuzzing of the protocol decoders with atheris (long runs).

Invariant, as in h11's fuzz harness: any frames give a Command (decode), a
list of events (ClientCore.receive) or RemoteProtocolError, never another
exception.  The input is cut into frames at b"\\x00FRAME\\x00".

    pip install atheris
    python fuzz/fuzz_decode.py --seed-corpus /tmp/mzq-corpus   # valid commands to start from
    python fuzz/fuzz_decode.py -max_total_time=3600 -rss_limit_mb=2048 /tmp/mzq-corpus

The short run in CI is hypothesis: tests/security/test_fuzz.py (see docs/security.md).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import msgpack

    from murano_zmq.protocol.client import ClientCore
    from murano_zmq.protocol.errors import RemoteProtocolError
    from murano_zmq.protocol.frames import Cmd, decode, encode
    from murano_zmq.protocol.message import new_message_id, send_record

SEPARATOR = b"\x00FRAME\x00"


def _core() -> ClientCore:
    core = ClientCore("fuzz", b"i" * 16)
    core.connection_made(0.0)
    core.receive(encode(Cmd.WELCOME, "relay", 1.0, 1 << 20), 0.0)
    core.send([send_record(new_message_id(0.0), "mb", {}, msgpack.packb("x"), 0.0, None)])
    core.request(Cmd.STATUS)
    core.consume("mb", 10)
    core.drain()
    return core


def test_one_input(data: bytes) -> None:
    frames = data.split(SEPARATOR)
    try:
        decode(frames)
    except RemoteProtocolError:
        pass
    try:
        _core().receive(frames, 1.0)
    except RemoteProtocolError:
        pass


def seed_corpus(directory: str) -> None:
    """Write one valid command per relay-to-node command kind."""
    import os

    os.makedirs(directory, exist_ok=True)
    seeds = [(Cmd.WELCOME, ("r", 1.0, 1 << 20)), (Cmd.CONFIRM, (1, [[0, 403, "denied"]])),
             (Cmd.DELIVER, (1, [[1, b"i" * 16, "mb", {}, msgpack.packb("x"), 0.0, None, 1]])),
             (Cmd.ERROR, (2, 404, "no such mailbox")), (Cmd.REPLY, (2, {"ok": True})),
             (Cmd.HEARTBEAT, ()), (Cmd.BYE, ("bye",))]
    for i, (cmd, fields) in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{i}-{cmd.name.lower()}"), "wb") as f:
            f.write(SEPARATOR.join(encode(cmd, *fields)))


def main() -> None:
    if sys.argv[1:2] == ["--seed-corpus"]:
        seed_corpus(sys.argv[2])
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
