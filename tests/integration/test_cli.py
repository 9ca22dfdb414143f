"""The murano-zmq command end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..helpers import free_tcp_endpoint, send_raw_body


def cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "murano_zmq", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_send_consume_declare_status_round_trip(relay):
    r = relay.endpoint
    out = cli("declare", "agent.e1.u1", "--ttl", "60", "--max-length", "10", "--relay", r)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ttl"] == 60
    sent = cli("send", "agent.e1.u1", "hello agent", "--header", "kind=plan", "--relay", r)
    assert sent.returncode == 0, sent.stderr
    msg_id = sent.stdout.strip()
    assert len(msg_id) == 32
    # body from stdin, JSON, through the environment variable instead of --relay
    assert cli("send", "agent.e1.u1", "--json", input='{"step": 2}', env={"MURANO_ZMQ_RELAY": r}).returncode == 0

    status = cli("status", "--relay", r, "--json")
    assert status.returncode == 0, status.stderr
    (mb,) = [m for m in json.loads(status.stdout)["mailboxes"] if m["name"] == "agent.e1.u1"]
    assert mb["depth"] == 2 and mb["ttl"] == 60 and mb["consumers"] == 0
    table = cli("status", "--relay", r)
    assert "agent.e1.u1" in table.stdout and "expires_in_s" in table.stdout

    peek = cli("consume", "agent.e1.u1", "--relay", r, "--json", "--no-ack", "--count", "2", "--timeout", "10")
    assert peek.returncode == 0, peek.stderr
    lines = [json.loads(line) for line in peek.stdout.splitlines()]
    assert [m["body"] for m in lines] == ["hello agent", {"step": 2}]
    assert lines[0]["id"] == msg_id and lines[0]["headers"] == {"kind": "plan"}

    taken = cli("consume", "agent.e1.u1", "--relay", r, "--json", "--timeout", "2")
    lines = [json.loads(line) for line in taken.stdout.splitlines()]
    assert [m["body"] for m in lines] == ["hello agent", {"step": 2}]
    assert all(m["redelivered"] for m in lines)  # --no-ack gave them back
    empty = cli("consume", "agent.e1.u1", "--relay", r, "--timeout", "1")
    assert empty.returncode == 0 and empty.stdout == ""


def test_cli_errors_are_clear(relay):
    r = relay.endpoint
    assert cli("declare", "small", "--max-length", "1", "--relay", r).returncode == 0
    assert cli("send", "small", "one", "--relay", r).returncode == 0
    full = cli("send", "small", "two", "--relay", r)
    assert full.returncode == 1
    assert "MailboxFull" in full.stderr and "full" in full.stderr
    conflict = cli("declare", "small", "--max-length", "2", "--relay", r)
    assert conflict.returncode == 1 and "PreconditionFailed" in conflict.stderr
    bad_name = cli("send", "bad name", "x", "--relay", r)
    assert bad_name.returncode == 1 and "invalid mailbox name" in bad_name.stderr
    bad_json = cli("send", "q", "{nope", "--json", "--relay", r)
    assert bad_json.returncode == 2 and "not JSON" in bad_json.stderr


@pytest.mark.parametrize("args, text", [
    (["declare", "x", "--ttl", "-3"], "must be > 0"),
    (["declare", "x", "--overflow", "explode"], "invalid choice"),
    (["send", "x", "y", "--header", "novalue"], "key=value"),
    (["consume", "x", "--count", "many"], "not a whole number"),
    (["frobnicate"], "invalid choice"),
    (["send", "x", "y", "--timeout", "inf"], "finite"),
    (["send", "x", "y", "--timeout", "nan"], "finite"),
    (["send", "x", "y", "--timeout", "1e300"], "<= 1e+09"),
    (["send", "x", "y", "--ttl=-inf"], "finite"),
    (["consume", "x", "--timeout", "nan"], "finite"),
    (["consume", "x", "--prefetch", "0"], "between 1 and 10000"),
    (["declare", "x", "--message-ttl", "inf"], "finite"),
    (["status", "--timeout", "0"], "must be > 0"),
    (["peers", "--wait", "nan"], "finite"),
    (["demo", "--step-seconds", "nan"], "finite"),
    (["relay", "--max-message-size", "1e20"], "not a whole number"),
    (["relay", "--max-message-size", "100000000000000000000"], "between 1 and 1073741824"),
    (["relay", "--max-message-size", "0"], "between 1 and"),
    (["relay", "--bind", "nonsense"], "not a ZeroMQ endpoint"),
    (["send", "x", "y", "--relay", "localhost:5570"], "not a ZeroMQ endpoint"),
    (["send", "x", "y", "--relay", "tcp://nohost:x"], "not a ZeroMQ endpoint a node can connect to"),
    (["send", "x", "y", "--relay", "tcp://127.0.0.1:5570,tcp://127.0.0.1:99999"], "port 99999 out of range"),
    (["status", "--relay", "garbage"], "not a ZeroMQ endpoint"),
    (["forwarder", "--xsub", "foo"], "not a ZeroMQ endpoint"),
    (["relay", "--bind", "tcp://127.0.0.1:99999"], "port 99999 out of range"),  # not bound to 34463
    (["forwarder", "--xpub", "tcp://127.0.0.1:70000"], "port 70000 out of range"),
    (["declare", "x", "--max-length", "100000000000000000000000"], "between 0 and"),
    (["declare", "x", "--max-bytes", "18446744073709551616"], "between 0 and"),
    # An empty value (an unset variable) would mean the option left out:
    # a relay or forwarder without CURVE, the default data directory.
    (["relay", "--key", ""], "--key: must not be empty"),
    (["relay", "--authorized-keys", ""], "--authorized-keys: must not be empty"),
    (["relay", "--permissions", ""], "--permissions: must not be empty"),
    (["relay", "--data-dir", ""], "--data-dir: must not be empty"),
    (["relay", "--store", ""], "--store: must not be empty"),
    (["move", "a", "--to", "b", "--limit", "18446744073709551616"], "between 1 and 18446744073709551615"),
    (["forwarder", "--key", ""], "--key: must not be empty"),
    (["status", "--relay-key", ""], "--relay-key: must not be empty"),
    (["keygen", "k", "--dir", ""], "--dir: must not be empty"),
    # A relay's name is logged, shown and advertised (zeroconf ignores an
    # advert with an empty name; a TXT value holds 255 bytes).
    (["relay", "--name", ""], "the name '' must be printable"),
    (["relay", "--name", "a\nb"], "the name 'a\\nb' must be printable"),
    (["relay", "--name", " relay"], "without spaces around it"),
    (["relay", "--name", "x" * 300], "300 bytes long, at most 200"),
])
def test_usage_errors_exit_2(args, text):
    out = cli(*args)
    assert out.returncode == 2
    assert text in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("murano-zmq")  # usage, then one line


@pytest.mark.parametrize("device", [["-m", "murano_zmq.relay"], ["-m", "devices.relay"]])
def test_relay_device_usage_errors_exit_2(device):
    out = subprocess.run([sys.executable, *device, "--max-message-size", "100000000000000000000"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--max-message-size" in out.stderr


def one_line_exit_1(out) -> str:
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_relay_address_in_use_is_one_line(relay, tmp_path):
    out = cli("relay", "--bind", relay.endpoint, "--data-dir", str(tmp_path / "other"), timeout=30)
    line = one_line_exit_1(out)
    assert line.startswith("murano-zmq relay: cannot bind " + relay.endpoint) and "in use" in line


def test_relay_endpoint_it_cannot_bind_is_one_line(tmp_path):
    out = cli("relay", "--bind", "tcp://192.0.2.1:5570", "--data-dir", str(tmp_path / "d"), timeout=30)
    assert "cannot bind tcp://192.0.2.1:5570" in one_line_exit_1(out)  # not an address of this host


def test_relay_data_dir_without_parent_is_one_line(tmp_path):
    missing = tmp_path / "no" / "such" / "data"
    out = cli("relay", "--bind", free_tcp_endpoint(), "--data-dir", str(missing), timeout=30)
    line = one_line_exit_1(out)
    assert str(missing.parent) in line and "does not exist" in line
    assert not missing.parent.exists()


@pytest.mark.parametrize("args, text", [
    (["--metrics", "nonsense"], "--metrics wants HOST:PORT"),
    (["--discovery-interfaces", "192.0.2.1"], "cannot use discovery interface(s) 192.0.2.1"),  # not this host's
    (["--discovery-interfaces", "garbage"], "not an IPv4 address"),
])
def test_relay_start_failures_after_the_bind_are_one_line(tmp_path, args, text):
    out = cli("relay", "--bind", free_tcp_endpoint(), "--data-dir", str(tmp_path / "d"), *args, timeout=30)
    assert text in one_line_exit_1(out)


def test_relay_device_on_an_inproc_endpoint_is_refused(tmp_path):
    # ZeroMQ binds it, and no node outside the relay's process could reach it.
    out = cli("relay", "--bind", "inproc://relay", "--data-dir", str(tmp_path / "d"), timeout=30)
    assert "reachable only inside the relay's process" in one_line_exit_1(out)
    assert not (tmp_path / "d").exists()


def test_peers_on_an_address_not_of_this_host_is_one_line():
    out = cli("peers", "--discovery-interfaces", "192.0.2.1", "--wait", "0.5", timeout=30)
    assert "cannot use discovery interface(s) 192.0.2.1" in one_line_exit_1(out)


def test_bad_relay_in_the_environment_is_one_line():
    out = cli("status", "--timeout", "1", env={"MURANO_ZMQ_RELAY": "localhost:5570"})
    line = one_line_exit_1(out)
    assert "MURANO_ZMQ_RELAY" in line and "not a ZeroMQ endpoint" in line


def test_forwarder_address_in_use_is_one_line():
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUB)
    taken = free_tcp_endpoint()
    sock.bind(taken)
    try:
        out = cli("forwarder", "--xsub", taken, "--xpub", free_tcp_endpoint(), timeout=30)
        assert "cannot bind " + taken in one_line_exit_1(out)
    finally:
        sock.close(0)


def test_no_relay_is_a_clear_error():
    out = cli("status", "--relay", free_tcp_endpoint(), "--timeout", "0.5")
    assert out.returncode == 1
    assert "Is a relay running?" in out.stderr


def test_help_explains_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("relay", "send", "consume", "declare", "delete", "status", "demo"):
        assert command in out.stdout
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "usage: murano-zmq " + command in sub.stdout


def test_keygen_into_a_path_that_is_not_a_directory_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    for where in (str(tmp_path / "afile"), "/dev/null"):
        out = cli("keygen", "k", "--dir", where)
        assert out.returncode == 1
        assert out.stderr.startswith(f"murano-zmq: {where}: ") and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_consume_prints_a_body_that_is_not_msgpack_and_goes_on(relay):
    """A raw client's body (the relay keeps bodies opaque) is printed as hex,
    said on stderr, and acked like any other: the next message follows."""
    send_raw_body(relay.endpoint, "raw.box", b"\xc1\x00")
    assert cli("send", "raw.box", "after it", "--relay", relay.endpoint).returncode == 0
    out = cli("consume", "raw.box", "--relay", relay.endpoint, "--count", "2", "--timeout", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["c100", "after it"]
    assert "is not msgpack" in out.stderr and "Traceback" not in out.stderr
    as_json = cli("consume", "raw.box", "--relay", relay.endpoint, "--json", "--count", "1", "--timeout", "1")
    assert as_json.stdout == ""  # acked: gone


def test_relay_on_a_database_path_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "d" / "relay.db").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "murano_zmq.relay", "--bind", free_tcp_endpoint(),
                          "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=30)
    assert "relay.db" in one_line_exit_1(out)
