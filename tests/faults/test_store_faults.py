"""The relay's data directory under hostile conditions, with real relay
processes: a second relay on it, rows no mailbox owns, a full disk, another
process holding the database locked, a damaged database file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from murano_zmq import Node, StorageFull
from murano_zmq.testing import fill_disk, mount_tmpfs, relay_answers, unmount

from ..helpers import free_tcp_endpoint, wait_for


def relay_cmd(endpoint: str, data_dir: str) -> list[str]:
    return [sys.executable, "-m", "murano_zmq.relay", "--bind", endpoint, "--data-dir", data_dir]


def one_line_failure(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- two relays, one directory ---------------------------------------------------------


def test_second_relay_on_the_same_data_dir_refuses_to_start(relay):
    done = subprocess.run(relay_cmd(free_tcp_endpoint(), relay.data_dir), capture_output=True,
                          text=True, timeout=20)
    line = one_line_failure(done)
    assert "in use by another relay" in line and str(relay.pid) in line and relay.data_dir in line
    with Node("n", relay=relay.endpoint, timeout=10) as node:  # the first one is untouched
        node.send("still", "works")


def test_lock_dies_with_the_relay(relay_factory):
    relay = relay_factory()
    relay.kill()
    relay_factory(data_dir=relay.data_dir)  # no stale lock after kill -9


def test_expiry_never_spins_on_rows_no_mailbox_owns(relay_factory):
    relay = relay_factory()
    with Node("n", relay=relay.endpoint, timeout=10) as node:
        node.send("known", "x", ttl=0.2)
    relay.stop()
    db = sqlite3.connect(os.path.join(relay.data_dir, "relay.db"))
    past = time.time() - 10
    db.executemany("INSERT INTO messages (seq, mailbox, msg_id, headers, body, created, expires) "
                   "VALUES (?, 99, ?, x'80', x'00', ?, ?)",
                   [(10_000_000 + i, os.urandom(16), past, past) for i in range(2500)])
    db.commit()
    db.close()
    again = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
    with Node("n", relay=again.endpoint, timeout=10) as node:
        node.send("after", "the orphans")
        assert node.consume("after").get(timeout=10).body == "the orphans"
        before = cpu_seconds(again.pid)
        time.sleep(1.0)
        assert cpu_seconds(again.pid) - before < 0.5, "the relay spins"
    db = sqlite3.connect(os.path.join(relay.data_dir, "relay.db"))
    assert db.execute("SELECT count(*) FROM messages WHERE mailbox=99").fetchone()[0] == 0
    db.close()


# --- a full disk -------------------------------------------------------------------------


def _disk(tmp_path, size: int) -> str:
    """A tmpfs of `size` bytes under tmp_path (unmounted by the fixture)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path = str(tmp_path / "disk")
    try:
        mount_tmpfs(path, size)
    except OSError as exc:
        pytest.skip(str(exc))
    return path


@pytest.fixture
def small_disk(tmp_path):
    """Room for the relay's low-space margin, its reserve and its lone-send
    journal (17 + 4 + 16 MiB), and little more."""
    path = _disk(tmp_path, 42 << 20)
    yield path
    unmount(path)


@pytest.fixture
def roomy_disk(tmp_path):
    """Room for the relay's low-space margin beside a few thousand mailboxes."""
    path = _disk(tmp_path, 64 << 20)
    yield path
    unmount(path)


def test_disk_full_refuses_sends_keeps_serving_and_resumes(relay_factory, small_disk, tmp_path):
    data = os.path.join(small_disk, "data")
    relay = relay_factory(data_dir=data)
    ballast = os.path.join(small_disk, "ballast")
    body = os.urandom(64 * 1024)
    confirmed = []
    with Node("sender", relay=relay.endpoint, timeout=20, heartbeat=0.2) as node:
        node.send("jobs", "before the disk fills")
        fill_disk(ballast, leave_bytes=2 << 20)
        with pytest.raises(StorageFull):
            for i in range(200):  # 12.5 MiB: far more than is left
                confirmed.append(node.send("jobs", body, headers={"n": str(i)}))
        assert relay.proc.poll() is None, "the relay died on a full disk"
        # consumers and acks go on
        consumer = node.consume("jobs", prefetch=10)
        first = consumer.get(timeout=10)
        assert first.body == "before the disk fills"
        first.ack()
        with pytest.raises(StorageFull):
            node.send("jobs", "still full")
        assert node.status()["storage_full"] is True
        os.unlink(ballast)  # space returns: sends resume by themselves
        wait_for(lambda: _sends(node), 20, interval=0.3, what="sends accepted again")
        assert node.status()["storage_full"] is False
        got = set()
        while len(got) < len(confirmed):
            m = consumer.get(timeout=15)
            assert m is not None, f"{len(got)} of {len(confirmed)} confirmed messages came back"
            if m.body == body:
                got.add(m.id)
            m.ack()
        assert got == set(confirmed)
    log = (tmp_path / "relay-0.log").read_text()
    assert "database or disk is full" in log or "is nearly full" in log  # (the margin may see it first)
    assert log.count("database or disk is full") <= 3, "not rate-limited"
    assert "Traceback" not in log and "no transaction is active" not in log


def test_a_disk_filled_by_small_mailboxes_can_be_purged(relay_factory, roomy_disk, tmp_path):
    """A disk filled by thousands of small mailboxes: the WAL checkpoint
    found no room to grow the database first, so the WAL grew past the
    relay's reserve, and every delete after that grew it on.  Purges failed
    after about a hundred, each failure a reload that dropped every
    session.  Now the relay refuses sends while there is room beside its
    WAL for a checkpoint (looked at after each MiB of commands read), and
    deletes reuse the WAL."""
    from murano_zmq.admin import Admin

    relay = relay_factory(data_dir=os.path.join(roomy_disk, "data"))
    body = os.urandom(2048)
    sent = 0
    with Node("filler", relay=relay.endpoint, direct=False, timeout=30) as node:
        with pytest.raises(StorageFull):
            while sent < 100_000:
                node.send_many([(f"mb.{sent + i}", body) for i in range(200)])
                sent += 200
    assert sent > 1000
    log = tmp_path / "relay-0.log"
    with Admin(relay.endpoint, timeout=15) as admin:
        for i in range(sent):
            admin.purge(f"mb.{i}")
    assert relay.proc.poll() is None
    assert log.read_text().count("recovered ") <= 2, "reloads while purging"


def _sends(node) -> bool:
    try:
        node.send("probe", "space?")
        return True
    except StorageFull:
        return False


def _without_file_mode_override() -> None:
    """(preexec_fn) This process, root or not, obeys file modes: its
    bounding set loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so the
    exec'd relay does not have them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_segment_directory_it_cannot_write_refuses_sends_not_a_reload_loop(relay_factory, tmp_path):
    """A segment file the relay may not create (EACCES; EROFS, EIO alike)
    failed every large send's commit: the relay reloaded, asked every node
    to resend, failed again, thousands of times a second, and served no one.
    Now a failure that comes again refuses sends (StorageFull) until a
    probe write succeeds; delivery goes on, and sends come back by
    themselves once the directory is fixed.  (Sends of two: a lone send's
    body is in the journal, and goes into the database when no segment
    takes it: tests/unit/test_journal.py.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop the override of file modes (prctl)")
    data = tmp_path / "data"
    segments = data / "segments"
    segments.mkdir(parents=True, mode=0o700)
    (segments / "spare.seg-free").write_bytes(bytes(4096))  # (a retired segment, kept for the next one)
    segments.chmod(0o500)
    relay = relay_factory(data_dir=str(data), preexec_fn=_without_file_mode_override)
    log_path = tmp_path / "relay-0.log"
    big = os.urandom(64 * 1024)
    try:
        with Node("sender", relay=relay.endpoint, timeout=30, heartbeat=0.2) as node:
            node.send("jobs", "small, before")
            with pytest.raises(StorageFull, match="cannot write its store"):
                node.send_many([("jobs", big)] * 2)
            reloads = log_path.read_text().count("recovered ")
            assert node.status()["storage_full"] is True
            consumer = node.consume("jobs", prefetch=10)  # delivery goes on
            first = consumer.get(timeout=10)
            assert first is not None and first.body == "small, before"
            first.ack()
            assert relay.proc.poll() is None
            assert log_path.read_text().count("recovered ") - reloads <= 3, "the relay reloads in a loop"
            segments.chmod(0o700)
            wait_for(lambda: _sends(node), 20, interval=0.3, what="sends accepted again")
            stored = node.send_many([("jobs", big)] * 2)
            for msg_id in stored:
                got = consumer.get(timeout=10)
                assert got is not None and got.id == msg_id and got.body == big
                got.ack()
    finally:
        segments.chmod(0o700)  # (pytest removes tmp_path)
    log = log_path.read_text()
    assert "store write failed again" in log and "a probe write in" in log
    assert log.count("recovered ") < 20, "the relay reloaded in a loop"
    assert "unexpected error" not in log  # (giving back the spare it may not delete stopped it)


def test_restart_on_a_full_disk_serves_consumers_and_acks(relay_factory, small_disk, tmp_path):
    data = os.path.join(small_disk, "data")
    relay = relay_factory(data_dir=data)
    with Node("sender", relay=relay.endpoint, timeout=20) as node:
        sent = node.send_many([("jobs", i) for i in range(300)])
    fill_disk(os.path.join(small_disk, "ballast"))
    relay.kill()
    again = relay_factory(endpoint=relay.endpoint, data_dir=data)
    with Node("reader", relay=again.endpoint, timeout=20, heartbeat=0.2) as node:
        consumer = node.consume("jobs", prefetch=50)
        got = set()
        while len(got) < len(sent):
            m = consumer.get(timeout=15)
            assert m is not None, f"only {len(got)} of {len(sent)} after a restart on a full disk"
            got.add(m.id)
            m.ack()
        assert got == set(sent)
        assert again.proc.poll() is None, "the relay died at a commit of acks on a full disk"
        with pytest.raises(StorageFull):
            node.send("jobs", "no room")
    log = (tmp_path / "relay-1.log").read_text()
    assert "Traceback" not in log


# --- a locked database ---------------------------------------------------------------------


HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock, as a backup tool or a shell might hold it
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def test_database_locked_by_another_process_is_waited_out(relay, children, tmp_path):
    holder = children(HOLD_LOCK, os.path.join(relay.data_dir, "relay.db"), "7",
                      stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with Node("n", relay=relay.endpoint, timeout=30, heartbeat=0.5) as node:
        t0 = time.monotonic()
        msg_id = node.send("jobs", "through the lock")
        assert time.monotonic() - t0 >= 4  # it waited for the lock...
        assert relay.proc.poll() is None  # ...and did not die of it
        m = node.consume("jobs").get(timeout=10)
        assert m.id == msg_id
        m.ack()
    assert holder.wait(10) == 0
    log = (tmp_path / "relay-0.log").read_text()
    assert "locked" in log and "Traceback" not in log


# --- a damaged database --------------------------------------------------------------------


def test_not_a_database_is_one_line_at_start(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "relay.db").write_bytes(b"this is not sqlite " * 300)
    line = one_line_failure(subprocess.run(relay_cmd(free_tcp_endpoint(), str(data)), capture_output=True,
                                           text=True, timeout=20))
    assert str(data / "relay.db") in line and "not a database" in line and "operations.md" in line


def test_malformed_database_is_one_line_at_start(relay_factory, tmp_path):
    relay = relay_factory()
    with Node("n", relay=relay.endpoint, timeout=10) as node:
        node.send_many([("jobs", os.urandom(3000)) for _ in range(200)])
    relay.stop()
    path = os.path.join(relay.data_dir, "relay.db")
    with open(path, "r+b") as f:  # trash the pages after the first few
        f.seek(4 * 4096)
        f.write(os.urandom(64 * 4096))
    line = one_line_failure(subprocess.run(relay_cmd(free_tcp_endpoint(), relay.data_dir),
                                           capture_output=True, text=True, timeout=20))
    assert path in line and "operations.md" in line


def test_device_refuses_with_one_line(tmp_path):
    busy = free_tcp_endpoint()
    with subprocess.Popen(relay_cmd(busy, str(tmp_path / "a")), stderr=subprocess.DEVNULL) as first:
        try:
            assert relay_answers(busy, 15)
            done = subprocess.run([sys.executable, "-m", "devices.relay", "--bind", busy,
                                   "--data-dir", str(tmp_path / "b")], capture_output=True, text=True,
                                  timeout=20)
            assert "cannot bind" in one_line_failure(done)
        finally:
            first.kill()


# --- a segment file lost ---------------------------------------------------------------------


def test_a_lost_segment_file_costs_its_messages_not_the_relay(relay_factory, tmp_path):
    """Bodies of 64 KiB live in segment files (store/segments.py); one file
    deleted behind the relay's back: the restarted relay logs each message it
    lost, drops them and serves every other message."""
    relay = relay_factory()
    if os.environ.get("MURANO_ZMQ_TEST_STORE") == "postgresql":
        pytest.skip("segment files are the SQLite store's")
    big = [bytes([i]) * 65536 for i in range(4)]
    with Node("sender", relay=relay.endpoint, timeout=20) as node:
        lost_ids = node.send_many([("jobs", b) for b in big[:2]])
        node.send("jobs", "small")
    relay.stop()
    again = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)  # a second segment...
    with Node("sender", relay=again.endpoint, timeout=20) as node:
        kept_ids = node.send_many([("jobs", b) for b in big[2:]])
    again.stop()
    segments = os.path.join(relay.data_dir, "segments")
    os.unlink(os.path.join(segments, sorted(f for f in os.listdir(segments) if f.endswith(".seg"))[0]))
    third = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)  # ...the first lost
    with Node("reader", relay=third.endpoint, timeout=20) as node:
        consumer = node.consume("jobs", prefetch=10)
        got = []
        while (m := consumer.get(timeout=3)) is not None:
            got.append((m.id, m.body))
            m.ack()
    assert [body for _, body in got] == ["small", big[2], big[3]]
    assert [i for i, _ in got][1:] == kept_ids
    assert third.proc.poll() is None
    log = (tmp_path / "relay-2.log").read_text()
    assert all(i.hex() in log for i in lost_ids) and "is lost" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("damage", ["not msgpack", "wrong types"])
def test_a_damaged_run_of_messages_costs_its_messages_not_the_relay(relay_factory, tmp_path, damage):
    """A pipelined run of messages is one row of `packs` (store/packs.py),
    decoded by the relay itself; SQLite keeps no checksum of a row, so a
    damaged page reads back as other bytes.  The relay died on them
    (ValueError, exit 1) at the first consume that reached the run, and at
    every restart; --check-config said ok.  Now the check fails, and the
    relay logs the run as lost and serves every other message."""
    import msgpack

    if os.environ.get("MURANO_ZMQ_TEST_STORE") == "postgresql":
        pytest.skip("packs are the SQLite store's")
    relay = relay_factory()
    with Node("sender", relay=relay.endpoint, timeout=20) as node:
        kept = {mb: node.send_many([(mb, f"{mb}{i}") for i in range(100)]) for mb in ("a", "b")}
    relay.stop()
    db = sqlite3.connect(os.path.join(relay.data_dir, "relay.db"))
    with db:
        (first, last, mailbox), = db.execute(
            "SELECT first, last, mailbox FROM packs WHERE mailbox=(SELECT id FROM mailboxes WHERE name='b')")
        garbage = (os.urandom(4000) if damage == "not msgpack"
                   else msgpack.packb([list(range(last - first + 1))] * 3 + [None]))
        db.execute("UPDATE packs SET data=? WHERE first=?", (garbage, first))
    db.close()
    check = subprocess.run([*relay_cmd(relay.endpoint, relay.data_dir), "--check-config"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and f"{last - first + 1} message(s) in 1 run(s)" in check.stdout
    again = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
    with Node("reader", relay=again.endpoint, timeout=20) as node:
        assert set(consume_once(node, "a", 100, prefetch=50)) == set(kept["a"])
        consumer = node.consume("b", prefetch=50)
        assert consumer.get(timeout=2) is None, "a message of the damaged run was delivered"
        node.send("b", "after")
        assert consumer.get(timeout=10).body == "after"
    assert again.proc.poll() is None
    log = (tmp_path / "relay-1.log").read_text()
    assert f"messages {first}..{last} of mailbox #{mailbox} are lost" in log and "Traceback" not in log


def consume_once(node, mailbox: str, count: int, prefetch: int) -> dict[bytes, bytes]:
    """Consume and ack `count` messages of `mailbox`: id -> body; each
    must come within 15 s, and none twice."""
    consumer = node.consume(mailbox, prefetch=prefetch)
    got: dict[bytes, bytes] = {}
    while len(got) < count:
        m = consumer.get(timeout=15)
        assert m is not None, f"only {len(got)} of {count} confirmed messages came back"
        assert m.id not in got, "delivered twice"
        got[m.id] = m.body
        m.ack()
    return got


def test_lone_large_sends_outlive_a_kill_9(relay_factory, tmp_path):
    """One-at-a-time 64 KiB sends (each in a segment, with zeros written
    ahead and its pages dropped after its sync), some of them 10,000 bytes
    (an end inside a page), the relay killed with SIGKILL between them:
    the restarted relay writes a new segment and delivers every confirmed
    message once, each body whole."""
    relay = relay_factory()
    if os.environ.get("MURANO_ZMQ_TEST_STORE") == "postgresql":
        pytest.skip("segment files are the SQLite store's")
    bodies = [os.urandom(65536 if i % 3 else 10_000) for i in range(60)]
    with Node("sender", relay=relay.endpoint, timeout=20) as node:
        first = [node.send("jobs", b) for b in bodies[:30]]
    relay.kill()
    again = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
    with Node("sender", relay=again.endpoint, timeout=20) as node:
        second = [node.send("jobs", b) for b in bodies[30:]]
        got = consume_once(node, "jobs", len(bodies), prefetch=10)
    assert got == dict(zip(first + second, bodies))
    segments = os.path.join(relay.data_dir, "segments")
    assert len([f for f in os.listdir(segments) if f.endswith(".seg")]) <= 2
    assert "Traceback" not in (tmp_path / "relay-1.log").read_text()


def test_lone_large_sends_killed_mid_flight_come_back_whole(relay_factory, tmp_path):
    """One-at-a-time 64 KiB sends from a thread (on ext4, most of them
    flushed by the WAL's sync alone: store/writeback.py), the relay killed
    with SIGKILL while they go on: the node resends what was not confirmed
    to the restarted relay, and every message comes back once, its body
    whole."""
    relay = relay_factory()
    if os.environ.get("MURANO_ZMQ_TEST_STORE") == "postgresql":
        pytest.skip("segment files are the SQLite store's")
    bodies = [os.urandom(65536) for _ in range(400)]
    ids: list[bytes] = []
    failed: list[BaseException] = []
    with Node("sender", relay=relay.endpoint, timeout=30) as node:

        def send_all() -> None:
            try:
                for b in bodies:
                    ids.append(node.send("jobs", b))
            except BaseException as exc:  # (reported below)
                failed.append(exc)

        sender = threading.Thread(target=send_all)
        sender.start()
        wait_for(lambda: len(ids) >= 30 or failed, 20, what="30 confirmed sends")
        relay.kill()
        at_kill = len(ids)
        relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
        sender.join(60)
        assert not sender.is_alive() and not failed
        assert at_kill < len(bodies)  # (killed while the sends went on)
        got = consume_once(node, "jobs", len(bodies), prefetch=10)
    assert got == dict(zip(ids, bodies))
    assert "Traceback" not in (tmp_path / "relay-1.log").read_text()


def test_pipelined_large_sends_outlive_a_kill_9(relay_factory, tmp_path):
    """Pipelined 64 KiB sends (their batches written around the page cache,
    store/direct.py), some of them 10,000 bytes (runs that end inside a
    block), the relay killed with SIGKILL between two send_many calls: the
    restarted relay delivers every confirmed message once, each body whole,
    read back through its read-ahead."""
    relay = relay_factory()
    if os.environ.get("MURANO_ZMQ_TEST_STORE") == "postgresql":
        pytest.skip("segment files are the SQLite store's")
    bodies = [os.urandom(65536 if i % 7 else 10_000) for i in range(400)]
    with Node("sender", relay=relay.endpoint, timeout=30) as node:
        first = node.send_many([("jobs", b) for b in bodies[:200]])
    relay.kill()
    again = relay_factory(endpoint=relay.endpoint, data_dir=relay.data_dir)
    with Node("sender", relay=again.endpoint, timeout=30) as node:
        second = node.send_many([("jobs", b) for b in bodies[200:]])
        got = consume_once(node, "jobs", len(bodies), prefetch=50)
    assert got == dict(zip(first + second, bodies))
    assert "Traceback" not in (tmp_path / "relay-1.log").read_text()
