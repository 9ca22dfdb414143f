"""What operators run, end to end on real processes: relay metrics scraped
over HTTP, --check-config, systemd readiness (sd_notify), and the admin
commands (status --watch, purge, move, peek) as subprocesses, with keys on."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from murano_zmq import Node

from ..helpers import free_tcp_endpoint, wait_for
from ..security.conftest import Keys


def cli(*args: str, env: dict | None = None, timeout: float = 60, **kw):
    return subprocess.run([sys.executable, "-m", "murano_zmq", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- metrics --------------------------------------------------------------------------


def scrape(address: str) -> dict:
    """{(name, frozenset(labels)): value} of the relay's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def queue(name: str) -> frozenset:
    return frozenset({"vhost": "/", "queue": name}.items())


NONE = frozenset()


def test_metrics_are_scraped_with_rabbitmq_names(relay_factory):
    pytest.importorskip("prometheus_client")
    address = f"127.0.0.1:{free_port()}"
    relay = relay_factory("--metrics", address)
    with Node("metrics-test", relay=relay.endpoint, discovery=False, direct=False) as node:
        for i in range(5):
            node.send("work", f"job {i}")
        consumer = node.consume("work", prefetch=2)
        first = consumer.get(timeout=10)
        first.nack(requeue=True)  # comes again: one redelivery
        for _ in range(3):
            consumer.get(timeout=10).ack()

        def settled():
            m = scrape(address)
            return m if m[("rabbitmq_global_messages_acknowledged_total", NONE)] == 3 else None

        m = wait_for(settled, 20, what="three acks in the metrics")
        assert m[("rabbitmq_global_messages_received_total", NONE)] == 5
        assert m[("rabbitmq_global_messages_confirmed_total", NONE)] == 5
        assert m[("rabbitmq_global_messages_delivered_total", NONE)] >= 4
        assert m[("rabbitmq_global_messages_redelivered_total", NONE)] >= 1
        assert m[("rabbitmq_queue_messages", queue("work"))] == 2
        assert m[("rabbitmq_queue_messages_ready", queue("work"))] + \
            m[("rabbitmq_queue_messages_unacked", queue("work"))] == 2
        assert m[("rabbitmq_queue_messages_bytes", queue("work"))] > 0
        assert m[("rabbitmq_queue_consumers", queue("work"))] == 1
        assert m[("murano_zmq_sessions", NONE)] >= 1
        assert m[("murano_zmq_commit_seconds_count", NONE)] >= 1
        assert m[("murano_zmq_commit_batch_rows_count", NONE)] >= 1
        assert ("murano_zmq_commit_seconds_bucket", frozenset({"le": "+Inf"}.items())) in m
        # what RabbitMQ's Grafana dashboard joins on and reads
        assert m[("rabbitmq_identity_info", frozenset({"rabbitmq_node": "relay", "rabbitmq_cluster": "relay",
                                                       "rabbitmq_endpoint": "metrics"}.items()))] == 1
        assert m[("rabbitmq_channel_messages_published_total", NONE)] == 5
        assert m[("rabbitmq_channel_messages_acked_total", NONE)] == 3
        assert m[("rabbitmq_global_messages_dead_lettered_rejected_total", frozenset(
            {"queue_type": "murano_zmq_mailbox", "dead_letter_strategy": "disabled"}.items()))] == 0
        consumer.cancel()
    wait_for(lambda: scrape(address)[("murano_zmq_sessions", NONE)] == 0, 20, what="the session gone")


def test_idle_metrics_connections_cannot_use_up_the_relay(relay_factory):
    """Each idle connection to the metrics port held a thread and a file
    descriptor for ever: a few hundred took the relay's last descriptors.
    Now those past MAX_CONNECTIONS are closed at once, and the rest after
    IDLE_TIMEOUT; the relay stores on, and scrapes come back."""
    pytest.importorskip("prometheus_client")
    from murano_zmq.relay.metrics_http import MAX_CONNECTIONS

    address = f"127.0.0.1:{free_port()}"
    relay = relay_factory("--metrics", address)
    scrape(address)
    fds_before = len(os.listdir(f"/proc/{relay.pid}/fd"))
    host, port = address.split(":")
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(300)]
    try:
        with Node("metrics-test", relay=relay.endpoint, discovery=False, direct=False, timeout=10) as node:
            node.send("work", "stored while the metrics port is flooded")
        threads = int(next(line.split()[1] for line in open(f"/proc/{relay.pid}/status")
                            if line.startswith("Threads:")))
        fds = len(os.listdir(f"/proc/{relay.pid}/fd"))
        assert fds <= fds_before + MAX_CONNECTIONS + 2, (fds_before, fds)
        assert threads < 40, threads
    finally:
        for sock in idle:
            sock.close()
    m = wait_for(lambda: _scraped(address), 30, what="a scrape once the idle connections are gone")
    assert m[("rabbitmq_queue_messages", queue("work"))] == 1


def _scraped(address: str):
    try:
        return scrape(address)
    except OSError:
        return None


def test_a_trickling_metrics_client_is_cut_off_at_the_deadline(monkeypatch):
    """A client sending a byte at a time never goes idle: it held its slot
    (and with MAX_CONNECTIONS of them, every scrape) for ever.  Now a
    connection is shut down REQUEST_DEADLINE after it came."""
    from murano_zmq.relay import metrics_http

    monkeypatch.setattr(metrics_http, "REQUEST_DEADLINE", 1.0)
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 1)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"up\n"]

    port = free_port()
    httpd, thread = metrics_http.serve("127.0.0.1", port, app)
    try:
        trickler = socket.create_connection(("127.0.0.1", port), timeout=5)
        trickler.sendall(b"G")
        started = time.monotonic()

        def cut_off() -> bool:
            try:
                trickler.sendall(b"E")  # a byte at a time, never idle for long
                trickler.settimeout(0.2)
                return trickler.recv(1) == b""
            except socket.timeout:
                return False
            except OSError:
                return True

        wait_for(cut_off, 15, interval=0.1, what="the trickling connection shut down")
        assert time.monotonic() - started < 10
        trickler.close()

        def served() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                    return reply.read()
            except OSError:
                return None

        assert wait_for(served, 10, what="a request served once the slot is free") == b"up\n"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_the_relay_takes_the_hard_open_file_limit(relay_factory):
    """Every node's connection holds a descriptor: at a systemd unit's soft
    limit of 1,024 a few hundred nodes left none for the store's files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard limit on open files is {hard}")
    relay = relay_factory(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    line = next(line for line in open(f"/proc/{relay.pid}/limits") if line.startswith("Max open files"))
    relay_soft = int(line.split()[3])
    assert relay_soft == (min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20), line


def test_metrics_on_a_taken_port_is_a_one_line_error(tmp_path):
    pytest.importorskip("prometheus_client")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("relay", "--bind", free_tcp_endpoint(), "--data-dir", str(tmp_path / "d"),
                  "--metrics", f"127.0.0.1:{port}", timeout=30)
    assert out.returncode == 1 and "cannot listen" in out.stderr and "Traceback" not in out.stderr


# --- --check-config -------------------------------------------------------------------


def keyed_args(keys: Keys, data_dir) -> list[str]:
    return ["relay", "--check-config", *keys.relay_args("--permissions", str(keys.permissions)),
            "--data-dir", str(data_dir)]


def test_check_config_passes_a_good_configuration_and_says_what_it_checked(tmp_path, relay_factory):
    keys = Keys(tmp_path / "sec")
    out = cli(*keyed_args(keys, tmp_path / "new-data"), "--metrics", "127.0.0.1:9570")
    assert out.returncode == 0, out.stdout + out.stderr
    for what in ("security", "secret key", "permissions", "data dir", "bind", "metrics"):
        assert f"ok    {what}:" in out.stdout, out.stdout
    assert "does not exist yet" in out.stdout and not (tmp_path / "new-data").exists()  # nothing created

    relay = relay_factory(data_dir=str(tmp_path / "used"))
    with Node("cc", relay=relay.endpoint, discovery=False, direct=False) as node:
        node.send("kept", "x")
    busy = cli("relay", "--check-config", "--data-dir", str(tmp_path / "used"))
    assert busy.returncode == 1 and f"in use by another relay (pid {relay.pid})" in busy.stdout, busy.stdout
    relay.stop()
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "used").iterdir()}
    assert (tmp_path / "used" / "relay.lock").stat().st_mode & 0o077 == 0  # (the relay's files are its user's)
    out = cli("relay", "--check-config", "--data-dir", str(tmp_path / "used"))
    assert out.returncode == 0, out.stdout
    assert "passes quick_check, 1 message(s)" in out.stdout
    # (it made relay.db-wal and -shm to read a cleanly stopped database)
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "used").iterdir()} == before, "the check changed files"


@pytest.mark.parametrize("breakage, failing", [
    ("bad-toml", "security"),
    ("unknown-op", "security"),
    ("secret-readable", "secret key"),
    ("data-is-a-file", "data dir"),
    ("corrupt-db", "data dir"),
    ("bad-metrics", "metrics"),
    ("bad-bind", "bind"),
    ("permissions-without-key", "security"),
    ("no-parent", "data dir"),
    ("parent-is-a-file", "data dir"),
    ("segment-missing", "data dir"),
    ("bind-no-such-address", "bind"),
    ("bind-no-host", "bind"),
    ("bind-inproc", "bind"),
    ("bind-ipc-no-dir", "bind"),
    ("discovery-not-a-dotted-quad", "discovery"),
    ("newer-schema", "data dir"),
])
def test_check_config_fails_a_bad_configuration_and_names_the_problem(tmp_path, breakage, failing):
    keys = Keys(tmp_path / "sec")
    data = tmp_path / "data"
    args = keyed_args(keys, data)
    if breakage == "bad-toml":
        keys.permissions.write_text("[identity.ops\nadmin = [")
    elif breakage == "unknown-op":
        keys.permissions.write_text('[identity.ops]\nsudo = ["*"]\n')
    elif breakage == "secret-readable":
        os.chmod(keys.dir / "relay.key_secret", 0o644)
    elif breakage == "data-is-a-file":
        data.write_text("not a directory")
    elif breakage == "corrupt-db":
        data.mkdir()
        (data / "relay.db").write_bytes(b"this is not an SQLite database" * 100)
    elif breakage == "bad-metrics":
        args += ["--metrics", "localhost"]
    elif breakage == "bad-bind":
        args += ["--bind", "tcp://127.0.0.1"]  # no port (argparse already refuses other transports)
    elif breakage == "no-parent":
        args = ["relay", "--check-config", "--data-dir", str(tmp_path / "typo" / "data")]
    elif breakage == "parent-is-a-file":
        (tmp_path / "a-file").write_text("")
        args = ["relay", "--check-config", "--data-dir", str(tmp_path / "a-file" / "data")]
    elif breakage == "segment-missing":  # a 64 KiB body stored in a segment file, then the file lost
        from murano_zmq.store.base import StoredMessage
        from murano_zmq.store.sqlite import SQLiteStore

        store = SQLiteStore(str(data))
        store.insert([StoredMessage(1, 1, b"i" * 16, b"\x80", b"x" * 65536, 1.0, None, 0)])
        store.seal()
        store.commit()
        store.close()
        for segment in (data / "segments").glob("*.seg"):
            segment.unlink()
    elif breakage.startswith("bind-"):
        args += ["--bind", {"bind-no-such-address": "tcp://999.1.1.1:5570", "bind-no-host": "tcp://:5570",
                            "bind-inproc": "inproc://relay",
                            "bind-ipc-no-dir": f"ipc://{tmp_path}/no-such-dir/relay.sock"}[breakage]]
    elif breakage == "discovery-not-a-dotted-quad":
        args += ["--discovery-interfaces", "127.1"]  # (inet_aton's shorthand; zeroconf refuses it)
    elif breakage == "newer-schema":
        from murano_zmq.store.sqlite import SQLiteStore

        store = SQLiteStore(str(data))
        store._db.execute("UPDATE meta SET value=99 WHERE key='schema'")
        store.close()
    elif breakage == "permissions-without-key":
        args = ["relay", "--check-config", "--permissions", str(keys.permissions), "--data-dir", str(data)]
    out = cli(*args)
    assert out.returncode == 1, out.stdout
    assert f"FAIL  {failing}:" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    assert "failed" in out.stdout.splitlines()[-1]


# --- sd_notify ------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A unix datagram socket as systemd's NOTIFY_SOCKET, in the environment
    children inherit."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def states(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_the_relay_tells_systemd_it_is_ready_and_stopping(relay_factory, notify_socket):
    relay = relay_factory()
    got = states(notify_socket)
    assert "READY=1" in got and any(s.startswith("STATUS=serving on tcp://") for s in got)
    assert relay.stop() == 0
    assert states(notify_socket) == ["STOPPING=1"]


def test_the_forwarder_tells_systemd_it_is_ready(notify_socket):
    xsub, xpub = free_tcp_endpoint(), free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "murano_zmq", "forwarder", "--xsub", xsub, "--xpub", xpub],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert "READY=1" in states(notify_socket)
    finally:
        proc.terminate()
        proc.wait(10)


# --- admin ------------------------------------------------------------------------------


def test_peek_move_purge_from_the_cli(relay):
    r = relay.endpoint
    with Node("ops-test", relay=r, discovery=False, direct=False) as node:
        for i in range(3):
            node.send("dead", {"n": i}, headers={"why": "failed"})
        node.send("junk", "a")
        node.send("junk", "b")

        out = cli("peek", "dead", "--count", "2", "--json", "--relay", r)
        assert out.returncode == 0, out.stderr
        peeked = [json.loads(line) for line in out.stdout.splitlines()]
        assert [p["body"] for p in peeked] == [{"n": 0}, {"n": 1}]
        assert peeked[0]["headers"] == {"why": "failed"} and peeked[0]["deliveries"] == 0
        depth = {mb["name"]: mb["depth"] for mb in node.status()["mailboxes"]}
        assert depth["dead"] == 3, "PEEK took nothing"

        out = cli("move", "dead", "--to", "work", "--relay", r)
        assert out.returncode == 0, out.stderr
        assert "moved 3 message(s) from dead to work; 0 ready left" in out.stdout

        out = cli("purge", "junk", "--relay", r)
        assert out.returncode == 0 and "purged 2 message(s) from junk" in out.stdout, out.stderr

        consumer = node.consume("work")
        bodies = []
        for _ in range(3):
            msg = consumer.get(timeout=10)
            bodies.append(msg.body)
            msg.ack()
        assert bodies == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert consumer.get(timeout=0.5) is None
        depth = {mb["name"]: mb["depth"] for mb in node.status()["mailboxes"]}
        assert depth["dead"] == 0 and depth["junk"] == 0

    out = cli("peek", "nowhere", "--relay", r)
    assert out.returncode == 1 and "MailboxNotFound" in out.stderr and "Traceback" not in out.stderr


def test_move_to_a_full_mailbox_stops_and_exits_1(relay):
    r = relay.endpoint
    with Node("ops-full", relay=r, discovery=False, direct=False) as node:
        node.declare("small", max_length=1)
        node.send("dead", 1)
        node.send("dead", 2)
    out = cli("move", "dead", "--to", "small", "--relay", r)
    assert out.returncode == 1
    assert "moved 1 message(s)" in out.stdout and "full" in out.stderr


def test_admin_commands_need_the_admin_permission(relay_factory, tmp_path):
    keys = Keys(tmp_path / "sec")
    relay = relay_factory(*keys.relay_args("--permissions", str(keys.permissions)),
                          probe_curve=keys.client("ops"))
    r = relay.endpoint
    with Node("conductor", relay=r, discovery=False, direct=False, **keys.node_kw("conductor-1")) as node:
        node.send("agent.e1.u1", "plan")

    def as_key(name: str, *args: str):
        return cli(*args, "--relay", r, "--key", name, "--key-dir", str(keys.dir), "--relay-key", "relay")

    for args in (("peek", "agent.e1.u1"), ("purge", "agent.e1.u1"), ("move", "agent.e1.u1", "--to", "x"),
                 ("status", "--watch", "--iterations", "1")):
        denied = as_key("conductor-1", *args)
        assert denied.returncode == 1 and "PermissionDenied" in denied.stderr, (args, denied.stderr)
    allowed = as_key("ops", "peek", "agent.e1.u1", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["body"] == "plan"
    for args, said in ((("move", "agent.e1.u1", "--to", "agent.e1.u2"), "moved 1 message(s)"),
                       (("purge", "agent.e1.u2"), "purged 1 message(s)"),
                       (("status", "--watch", "--iterations", "1"), "agent.e1.u2")):
        allowed = as_key("ops", *args)
        assert allowed.returncode == 0 and said in allowed.stdout, (args, allowed.stdout, allowed.stderr)


def test_status_watch_prints_plain_lines_when_not_on_a_terminal(relay):
    r = relay.endpoint
    with Node("watched", relay=r, discovery=False, direct=False) as node:
        node.send("work", "x")
        out = cli("status", "--watch", "--iterations", "2", "--interval", "0.2", "--relay", r)
    assert out.returncode == 0, out.stderr
    headlines = [line for line in out.stdout.splitlines() if " relay relay: " in line]
    assert len(headlines) == 2, out.stdout
    assert "published -" in headlines[0] and "published 0.0/s" in headlines[1]  # a rate needs two looks
    assert any(line.startswith("work ") for line in out.stdout.splitlines())
    out = cli("status", "--watch", "--json", "--iterations", "2", "--interval", "0.2", "--relay", r)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 2 and lines[1]["time"] > lines[0]["time"]
    assert [mb["name"] for mb in lines[0]["mailboxes"]] == ["work"]


def test_status_watch_draws_with_rich_on_a_terminal(relay):
    pytest.importorskip("rich")
    with Node("watched-tty", relay=relay.endpoint, discovery=False, direct=False) as node:
        node.send("work.tty", "x")
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "murano_zmq", "status", "--watch", "--iterations", "2",
                                     "--interval", "0.2", "--relay", relay.endpoint],
                                    stdout=secondary, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})
            os.close(secondary)
            chunks, deadline = [], time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    data = os.read(primary, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            assert proc.wait(30) == 0, proc.stderr.read()
        finally:
            os.close(primary)
    screen = b"".join(chunks).decode(errors="replace")
    assert "work.tty" in screen and "─" in screen  # a rich table's rules


# --- service units ------------------------------------------------------------------------

UNITS = __import__("pathlib").Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def unit_lines(name: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            lines.setdefault(key.strip(), []).append(value.strip())
    return lines


def expand(command: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it: ${VAR} one word, $VAR split on spaces."""
    import re

    words = []
    for word in command.split():
        m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", word)
        if m and m.group(1):
            words.append(env[m.group(1)])
        elif m:
            words.extend(env[m.group(2)].split())
        else:
            words.append(word)
    return words


@pytest.mark.parametrize("unit", ["murano-zmq-relay.service", "murano-zmq-forwarder.service"])
def test_the_service_units_say_what_operations_md_promises(unit):
    lines = unit_lines(unit)
    assert lines["Type"] == ["notify"] and lines["Restart"] == ["on-failure"]
    assert lines["User"] == ["murano-zmq"] and lines["StateDirectory"] == ["murano-zmq"]
    if __import__("shutil").which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", str(UNITS / unit)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr


def test_the_relay_unit_commands_parse_and_its_check_config_runs(tmp_path):
    from murano_zmq.cli import build_parser

    lines = unit_lines("murano-zmq-relay.service")
    env = dict(value.split("=", 1) for value in lines["Environment"])
    for line in (UNITS / "relay.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    start = expand(lines["ExecStart"][0], env)
    assert start[:3] == ["/usr/bin/env", "murano-zmq", "relay"] and "/var/lib/murano-zmq" in start
    args = build_parser().parse_args(start[2:])
    assert args.metrics == "127.0.0.1:9570" and args.permissions == "/etc/murano-zmq/permissions.toml"
    check = expand(lines["ExecStartPre"][0], {**env, "MURANO_ZMQ_RELAY_ARGS": ""})
    check = [str(tmp_path / "data") if word == "/var/lib/murano-zmq" else word for word in check]
    out = cli(*check[2:])
    assert out.returncode == 0 and "configuration ok" in out.stdout, out.stdout + out.stderr


def test_the_admin_client_repeats_batches_until_done(tmp_path, monkeypatch):
    """Admin.move() and purge() ask again while the relay says messages are
    left (a relay in this process, with a small batch)."""
    import threading

    from murano_zmq.admin import Admin
    from murano_zmq.relay import admin as relay_admin
    from murano_zmq.relay.server import Relay, RelayConfig

    monkeypatch.setattr(relay_admin, "ADMIN_BATCH", 10)
    relay = Relay(RelayConfig(bind=free_tcp_endpoint(), data_dir=str(tmp_path / "data")))
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        assert relay.wait_ready(15)
        with Node("batches", relay=relay.endpoint, discovery=False, direct=False) as node:
            for i in range(25):
                node.send("dead", i)
            for i in range(12):
                node.send("junk", i)
            with Admin(relay.endpoint) as admin:
                result = admin.move("dead", "work")
                assert (result["moved"], result["left"], result["stopped"]) == (25, 0, None)
                assert admin.move("work", "dead", limit=15)["moved"] == 15
                assert admin.purge("junk") == 12
                assert [m.body for m in admin.peek("work", 3)] == [15, 16, 17]
            depth = {mb["name"]: mb["depth"] for mb in node.status()["mailboxes"]}
            assert depth == {"dead": 15, "work": 10, "junk": 0}
    finally:
        relay.stop()
        thread.join(15)
