"""A data directory whose database the relay must not open (store/dbcheck.py):
missing or empty beside segment files, a dangling link, someone else's
file, a lone-send journal that is not a file (store/journal.py).  The start is refused in one line, and nothing in the directory is
created, changed or deleted; `relay --check-config` says the same."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from murano_zmq.protocol.errors import StartupError
from murano_zmq.store.base import StoredMessage
from murano_zmq.store.sqlite import SQLiteStore
from tests.helpers import segment_files


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A data directory holding one message whose body is in a segment file."""
    data_dir = tmp_path_factory.mktemp("stored")
    store = SQLiteStore(str(data_dir))
    store._db.execute("INSERT INTO mailboxes VALUES (1, 'q', x'80', 1)")
    store.commit_insert([StoredMessage(1, 1, bytes(16), b"", b"b" * 300_000, 1.0, None, 0)])
    store.close()
    assert len(segment_files(data_dir)) == 1
    return data_dir


def snapshot(data_dir) -> dict[str, str]:
    """Every file below the directory and the hash of its bytes (a link: its target)."""
    out = {}
    for root, _, files in os.walk(data_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, data_dir)
            if os.path.islink(path) and not os.path.exists(path):
                out[rel] = "-> " + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def remove_database(data_dir) -> None:
    for name in os.listdir(data_dir):
        if name.startswith("relay.db"):
            os.remove(os.path.join(data_dir, name))


def make_foreign(data_dir, sql: str) -> None:
    remove_database(data_dir)
    con = sqlite3.connect(os.path.join(data_dir, "relay.db"))
    con.execute(sql)
    con.commit()
    con.close()


CASES = {
    "missing database": (remove_database, "relay.db is missing, but"),
    "empty database": (lambda d: open(os.path.join(d, "relay.db"), "w").close(), "relay.db is empty, but"),
    "dangling link": (lambda d: (remove_database(d), os.symlink(os.path.join(d, "elsewhere.db"),
                                                                 os.path.join(d, "relay.db"))),
                      "which does not exist"),
    "someone else's tables": (lambda d: make_foreign(d, "CREATE TABLE users (id, name)"),
                              "it holds table(s) users"),
    "a messages table not ours": (lambda d: make_foreign(d, "CREATE TABLE messages (x)"),
                                  "its table messages has the columns x"),
    "a journal that is a directory": (lambda d: (os.remove(os.path.join(d, "lone.journal")),
                                                 os.mkdir(os.path.join(d, "lone.journal"))),
                                      "lone.journal is not a regular file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_database_the_relay_must_not_open_is_refused_with_nothing_changed(stored, tmp_path, case):
    prepare, expected = CASES[case]
    data_dir = tmp_path / "data"
    shutil.copytree(stored, data_dir)
    prepare(str(data_dir))
    before = snapshot(data_dir)
    with pytest.raises(StartupError, match=re.escape(expected)):
        SQLiteStore(str(data_dir))
    assert snapshot(data_dir) == before  # the segment file kept; no database created or written
    assert not os.path.exists(os.path.join(data_dir, "elsewhere.db"))
    checked = subprocess.run([sys.executable, "-m", "murano_zmq.relay", "--check-config", "--data-dir",
                              str(data_dir), "--bind", "tcp://127.0.0.1:5999"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1
    assert "FAIL  data dir" in checked.stdout and expected in checked.stdout
    assert snapshot(data_dir) == before


def test_a_missing_database_without_segments_is_a_new_store(tmp_path):
    os.makedirs(tmp_path / "segments")
    SQLiteStore(str(tmp_path)).close()
    assert os.path.getsize(tmp_path / "relay.db") > 0


def test_tables_a_start_left_half_made_are_the_relays_own(tmp_path):
    """A first start that stopped after some of its tables: the next goes on."""
    con = sqlite3.connect(tmp_path / "relay.db")
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    con.execute("CREATE TABLE mailboxes (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
                "options BLOB NOT NULL, declared INTEGER NOT NULL)")
    con.commit()
    con.close()
    SQLiteStore(str(tmp_path)).close()


def test_stored_options_that_fail_todays_checks_are_kept_not_refused(tmp_path, caplog):
    """An older release took a dead-letter name ending in a newline (its
    pattern ended in $): a start keeps the mailbox and its options as stored,
    with a warning, instead of refusing the data directory."""
    import logging

    import msgpack

    from murano_zmq.relay.engine import RelayEngine

    store = SQLiteStore(str(tmp_path))
    store._db.execute("INSERT INTO mailboxes VALUES (1, 'work', ?, 1)",
                      (msgpack.packb({"dead_letter": "dlq\n", "max_length": 5}),))
    store.close()
    store = SQLiteStore(str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="murano_zmq.relay"):
            engine = RelayEngine(store, 1.0)
        options = engine.boxes.by_name["work"].options
        assert options.dead_letter == "dlq\n" and options.max_length == 5
        assert "fail this relay's checks" in caplog.text
    finally:
        store.close()


def test_a_mailbox_adopted_from_a_shared_database_keeps_what_this_relay_knows(caplog):
    """A newer relay on the same database declared it with an option this
    one does not know (delivery_limit, to a release before it): every adopt
    raised "unknown mailbox option(s)"."""
    import types

    from murano_zmq.relay.mailboxes import Mailboxes
    from murano_zmq.store.base import MailboxRow

    boxes = Mailboxes(types.SimpleNamespace(shared=None))
    mb = boxes.adopt(MailboxRow(7, "work", {"ttl": 30, "an_option_of_later": 3}, True), 0.0)
    assert mb.options.ttl == 30 and boxes.by_name["work"] is mb
    assert "an_option_of_later" in caplog.text
