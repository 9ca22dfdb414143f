"""A relay on PostgreSQL (`relay --store postgresql://...`), end to end.

Each test gets a schema of its own on the session's server (conftest.pg_url).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from murano_zmq import Node

from ..helpers import drain, free_tcp_endpoint, kill_mid_stream, wait_for


def _drain(endpoint: str, mailbox: str, prefetch: int = 500, expect: int = 0) -> list:
    """Every message of `mailbox`: `expect` of them (bounded), then none
    more for a while; not "until a 3 s gap", which a loaded machine makes."""
    with Node("receiver", relay=endpoint, timeout=30) as receiver:
        return drain(receiver.consume(mailbox, prefetch=prefetch), expect, quiet=3 if not expect else 0.5)


def test_relay_kill9_mid_pipelined_sends_loses_nothing(relay_factory, pg_url):
    relay = relay_factory("--store", pg_url)
    total = 20000  # enough that the kill lands mid-stream on a fast, idle machine
    with Node("sender", relay=relay.endpoint, heartbeat=0.2, timeout=60) as sender:
        futures = [sender.send_async("jobs", {"n": i}) for i in range(total // 2)]
        confirmed_before_kill = kill_mid_stream(
            relay, lambda i: sender.send_async("jobs", {"n": total // 2 + i}), futures, total // 2, 1000)
        relay_factory("--store", pg_url, endpoint=relay.endpoint)
        ids = [f.result(timeout=60) for f in futures]  # resent through the new relay
    assert len(set(ids)) == total
    seen = [m.id for m in _drain(relay.endpoint, "jobs", expect=total)]
    assert len(seen) == len(set(seen)), "a message reached application code twice"
    assert set(seen) == set(ids) and confirmed_before_kill <= set(seen)


def test_fifo_per_sender_with_one_consumer(relay_factory, pg_url):
    relay = relay_factory("--store", pg_url)
    with Node("sender", relay=relay.endpoint, timeout=30) as sender:
        sender.send_many([("fifo", i) for i in range(2500)])  # more than one READY window
    assert [m.body for m in _drain(relay.endpoint, "fifo", prefetch=100, expect=2500)] == list(range(2500))


def test_the_store_survives_a_clean_restart_with_its_mailbox_options(relay_factory, pg_url):
    relay = relay_factory("--store", pg_url)
    with Node("n", relay=relay.endpoint, timeout=30) as node:
        node.declare("limited", max_length=3, overflow="drop-head")
        node.send_many([("limited", i) for i in range(5)])
    assert relay.stop() == 0
    relay_factory("--store", pg_url, endpoint=relay.endpoint)
    assert [m.body for m in _drain(relay.endpoint, "limited", expect=3)] == [2, 3, 4]


def _relay_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "murano_zmq", "relay", "--bind", "tcp://127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=60)


def test_bad_store_urls_are_clear_errors(tmp_path):
    r = _relay_cli("--store", "mysql://x", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "expected 'sqlite' or a postgresql://" in r.stderr
    assert "Traceback" not in r.stderr
    r = _relay_cli("--store", f"postgresql://nobody@/none?host={tmp_path}&connect_timeout=2",
                   "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "cannot connect to PostgreSQL" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("options, says", [
    ("{schema} -c default_transaction_read_only=on", "cannot hold the relay's store: ReadOnlySqlTransaction"),
    ("{schema} -c statement_timeout=1", "cannot hold the relay's store: QueryCanceled"),
    ("pg_temp", "cannot hold the relay's store: UndefinedTable"),
    ("no_such_schema", "no schema of the search_path exists on this database"),
])
def test_a_server_that_connects_but_cannot_hold_the_store_is_a_clear_error(pg_server, tmp_path, options, says):
    """A read replica, a tiny statement_timeout, a search_path of pg_temp
    (the writer's temporary tables, unseen by the reader) or of no schema
    (which read as "another relay is running")."""
    from ..pgserver import new_schema

    schema = new_schema(pg_server.dsn())
    url = pg_server.url(options.format(schema=schema))  # (url() puts it after "-c search_path=")
    r = _relay_cli("--store", url, "--data-dir", str(tmp_path))
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_one_relay_per_database_until_it_dies(relay_factory, pg_url):
    relay = relay_factory("--store", pg_url)
    with Node("n", relay=relay.endpoint, timeout=30) as node:
        node.send("kept", "before")
    second = _relay_cli("--store", pg_url, "--data-dir", "/nonexistent")
    assert second.returncode == 1 and "another relay is running on this database" in second.stderr
    assert "Traceback" not in second.stderr
    relay.kill()  # its session ends with it, and the lock with the session
    relay_factory("--store", pg_url, endpoint=relay.endpoint)
    assert [m.body for m in _drain(relay.endpoint, "kept", expect=1)] == ["before"]


def test_a_standby_relay_takes_over_when_the_relay_dies(relay_factory, pg_url, tmp_path):
    """`--standby` on the same endpoint: it waits for the relay lock, binds
    when the running relay dies, and the nodes' reconnects find it."""
    relay = relay_factory("--store", pg_url)
    log = open(tmp_path / "standby.log", "wb")
    standby = subprocess.Popen([sys.executable, "-m", "murano_zmq", "--log-level", "INFO", "relay",
                                "--bind", relay.endpoint, "--store", pg_url, "--standby"],
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"standing by" in (tmp_path / "standby.log").read_bytes(), 30, what="standby waiting")
        total = 20000
        with Node("sender", relay=relay.endpoint, heartbeat=0.2, timeout=60) as sender:
            futures = [sender.send_async("jobs", {"n": i}) for i in range(total // 2)]
            confirmed_before = kill_mid_stream(
                relay, lambda i: sender.send_async("jobs", {"n": total // 2 + i}), futures, total // 2, 1000)
            killed = time.monotonic()
            wait_for(lambda: sum(f.done() for f in futures) > len(confirmed_before), 30, interval=0.005,
                     what="a confirm from the standby")
            took_over = time.monotonic() - killed
            ids = [f.result(timeout=60) for f in futures]
        print(f"standby served {took_over:.2f}s after the kill")
        assert standby.poll() is None
        seen = [m.id for m in _drain(relay.endpoint, "jobs", expect=total)]
        assert len(seen) == len(set(seen)), "a message reached application code twice"
        assert confirmed_before <= set(seen) and set(seen) == set(ids)
        assert took_over < 5, f"the standby served {took_over:.1f}s after the kill"
    finally:
        standby.kill()
        standby.wait(10)
        log.close()


def test_a_relay_whose_session_a_standby_took_over_stops(relay_factory, pg_server, pg_url, tmp_path):
    """The running relay's session (and the relay lock with it) ended under
    it, pg_terminate_backend here (a network blip, a server restart): the
    standby took the lock and served, and the relay, refused the lock at its
    next commit, reloaded and served on without it: two relays delivered
    every stored message, each to its own consumer.  Now the relay stops
    (exit 1), and the standby serves once TAKEOVER_GRACE has let it."""
    import psycopg

    relay = relay_factory("--store", pg_url)
    log = open(tmp_path / "standby.log", "wb")
    standby_endpoint = free_tcp_endpoint()
    standby = subprocess.Popen([sys.executable, "-m", "murano_zmq", "--log-level", "INFO", "relay",
                                "--bind", standby_endpoint, "--store", pg_url, "--standby"],
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"standing by" in (tmp_path / "standby.log").read_bytes(), 30, what="standby waiting")
        with Node("sender", relay=relay.endpoint, timeout=30) as sender:
            ids = sender.send_many([("jobs", {"n": i}) for i in range(200)])
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            [(holder,)] = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchall()
            assert conn.execute("SELECT pg_terminate_backend(%s)", (holder,)).fetchone()[0]
        wait_for(lambda: b"took the relay lock" in (tmp_path / "standby.log").read_bytes(), 30,
                 what="the standby taking the lock")
        with Node("poke", relay=relay.endpoint, timeout=3, direct=False) as poke:
            with pytest.raises(Exception):  # its commit finds the lock gone: not confirmed
                poke.send("other", "poke")
        assert relay.proc.wait(15) == 1, "the relay that lost its lock must stop"
        relay_log = open(relay.log_file.name, "rb").read() if relay.log_file else b""
        assert b"another relay serves the database now" in relay_log
        seen = [m.id for m in _drain(standby_endpoint, "jobs", expect=len(ids))]
        assert sorted(seen) == sorted(ids), "every stored message, once, from the standby"
        with Node("inspector", relay=standby_endpoint, timeout=30) as inspector:  # (nothing written without the lock)
            assert not [m for m in inspector.status()["mailboxes"] if m["name"] == "other" and m["depth"]]
        assert standby.poll() is None
    finally:
        standby.kill()
        standby.wait(10)
        log.close()


def _relay_lock_holders(pg_server) -> set[int]:
    import psycopg

    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        return {pid for (pid,) in conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")}


def _terminate(pg_server, pid: int) -> None:
    import psycopg

    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def test_an_idle_relay_whose_session_a_standby_took_over_stops(relay_factory, pg_server, pg_url, tmp_path):
    """As above, with no send, ack or consumer to make a commit: the relay
    learnt of its lost session only at its next commit, so an idle relay
    served on beside the standby for as long as it stayed idle.  Its idle
    check (PostgresStore.check_held) finds out: it stops on its own."""
    relay = relay_factory("--store", pg_url)
    log_path = tmp_path / "standby.log"
    log = open(log_path, "wb")
    standby_endpoint = free_tcp_endpoint()
    standby = subprocess.Popen([sys.executable, "-m", "murano_zmq", "--log-level", "INFO", "relay",
                                "--bind", standby_endpoint, "--store", pg_url, "--standby"],
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"standing by" in log_path.read_bytes(), 30, what="standby waiting")
        with Node("sender", relay=relay.endpoint, timeout=30) as sender:
            ids = sender.send_many([("jobs", {"n": i}) for i in range(50)])
        [holder] = _relay_lock_holders(pg_server)
        _terminate(pg_server, holder)
        assert relay.proc.wait(15) == 1, "an idle relay that lost its lock must stop, with no commit to make"
        assert b"another relay serves the database now" in open(relay.log_file.name, "rb").read()
        seen = [m.id for m in _drain(standby_endpoint, "jobs", expect=len(ids))]
        assert sorted(seen) == sorted(ids)
        assert standby.poll() is None
    finally:
        standby.kill()
        standby.wait(10)
        log.close()


def test_an_idle_relay_takes_its_lock_back_at_once(relay_factory, pg_server, pg_url):
    """No standby: an idle relay whose session ended connects again and
    holds the relay lock again before anything asks it to commit, so a
    relay started meanwhile is refused, and sends go on."""
    relay = relay_factory("--store", pg_url)
    with Node("sender", relay=relay.endpoint, timeout=30) as sender:
        sender.send("jobs", "before")
        [holder] = _relay_lock_holders(pg_server)
        _terminate(pg_server, holder)
        wait_for(lambda: _relay_lock_holders(pg_server) - {holder}, 15, what="the relay lock taken again")
        second = _relay_cli("--store", pg_url)
        assert second.returncode == 1 and "another relay is running on this database" in second.stderr
        sender.send("jobs", "after")
    assert relay.proc.poll() is None
    assert [m.body for m in _drain(relay.endpoint, "jobs", expect=2)] == ["before", "after"]


def test_a_standby_outlives_losing_the_server(relay_factory, pg_server, pg_url, tmp_path):
    """A standby whose session ended (a server restart, a failover) exited
    1: no standby from then on.  Now it connects again and stands by, and
    still takes over when the relay dies."""
    import psycopg

    relay = relay_factory("--store", pg_url)
    log_path = tmp_path / "standby.log"
    log = open(log_path, "wb")
    standby = subprocess.Popen([sys.executable, "-m", "murano_zmq", "--log-level", "INFO", "relay",
                                "--bind", relay.endpoint, "--store", pg_url, "--standby"],
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"standing by" in log_path.read_bytes(), 30, what="standby waiting")
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            holders = {pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")}
            others = [pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'murano-zmq relay'") if pid not in holders]
            for pid in others:  # the standby's sessions (and the relay's reader, which reconnects)
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: b"standing by again" in log_path.read_bytes(), 30, what="the standby connecting again")
        wait_for(lambda: log_path.read_bytes().count(b"standing by: another relay") >= 2, 30,
                 what="the standby waiting again")
        assert standby.poll() is None
        relay.kill()
        with Node("sender", relay=relay.endpoint, timeout=30) as sender:
            sender.send("jobs", "after the takeover")
        assert [m.body for m in _drain(relay.endpoint, "jobs", expect=1)] == ["after the takeover"]
    finally:
        standby.kill()
        standby.wait(10)
        log.close()


def test_a_standby_that_cannot_reach_the_server_at_first_exits(tmp_path):
    """A first connect that fails is a configuration to fix (a wrong host,
    password or database): one line and exit 1, not a retry for ever."""
    r = _relay_cli("--standby", "--store", "postgresql://nobody@/murano?host=/nonexistent&connect_timeout=2",
                   "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "cannot connect to PostgreSQL" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # (libpq's hint on the same line)


def test_a_standby_stops_cleanly_before_taking_over(relay_factory, pg_url, tmp_path):
    relay_factory("--store", pg_url)
    log = open(tmp_path / "standby.log", "wb")
    standby = subprocess.Popen([sys.executable, "-m", "murano_zmq", "relay", "--bind", "tcp://127.0.0.1:0",
                                "--store", pg_url, "--standby"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"standing by" in (tmp_path / "standby.log").read_bytes(), 30, what="standby waiting")
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(10) == 0
    finally:
        if standby.poll() is None:
            standby.kill()
            standby.wait(10)
        log.close()
    r = _relay_cli("--standby", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "--standby needs --store postgresql://" in r.stderr


def test_a_node_with_two_relays_moves_to_the_standby(relay_factory, pg_url, tmp_path):
    """relay=[A, B]: B is a standby on its own endpoint; A dies mid-stream,
    the node's next session goes to B, which took over the store."""
    relay = relay_factory("--store", pg_url)
    other = free_tcp_endpoint()
    log = open(tmp_path / "standby.log", "wb")
    standby = subprocess.Popen([sys.executable, "-m", "murano_zmq", "--log-level", "INFO", "relay",
                                "--bind", other, "--store", pg_url, "--standby"],
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"standing by" in (tmp_path / "standby.log").read_bytes(), 30, what="standby waiting")
        total = 20000
        with Node("sender", relay=[relay.endpoint, other], heartbeat=0.2, timeout=60) as sender:
            futures = [sender.send_async("jobs", {"n": i}) for i in range(total // 2)]
            confirmed_before = kill_mid_stream(
                relay, lambda i: sender.send_async("jobs", {"n": total // 2 + i}), futures, total // 2, 1000)
            killed = time.monotonic()
            wait_for(lambda: sum(f.done() for f in futures) > len(confirmed_before), 30, interval=0.005,
                     what="a confirm from the standby")
            took_over = time.monotonic() - killed
            ids = [f.result(timeout=60) for f in futures]
        print(f"node moved and was served {took_over:.2f}s after the kill")
        seen = [m.id for m in _drain(other, "jobs", expect=total)]
        assert len(seen) == len(set(seen)), "a message reached application code twice"
        assert confirmed_before <= set(seen) and set(seen) == set(ids)
        assert took_over < 5
    finally:
        standby.kill()
        standby.wait(10)
        log.close()
