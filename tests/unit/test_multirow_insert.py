"""MultiRowInsert (store/sqlite.py): many rows per INSERT statement, in
runs of 2**k rows, counted as SQLite stored them."""

from __future__ import annotations

import sqlite3

import pytest

from murano_zmq.store.sqlite import MultiRowInsert


@pytest.fixture
def db():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
    yield conn
    conn.close()


INSERT = MultiRowInsert("INSERT OR IGNORE INTO t (k, v) VALUES ", "(?, ?)", 2)


@pytest.mark.parametrize("count", [0, 1, 2, 3, 63, 64, 65, 129, 1000])
def test_every_row_goes_in_once_in_order(db, count):
    params = [x for k in range(count) for x in (k, b"v%d" % k)]
    assert INSERT.run(db, params) == count
    assert db.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(k, b"v%d" % k) for k in range(count)]


def test_rows_an_or_ignore_skips_are_not_counted(db):
    INSERT.run(db, [1, b"first", 3, b"first"])
    assert INSERT.run(db, [0, b"a", 1, b"again", 2, b"b", 3, b"again", 4, b"c"]) == 3
    assert dict(db.execute("SELECT k, v FROM t")) == {0: b"a", 1: b"first", 2: b"b", 3: b"first", 4: b"c"}


def test_statements_are_one_per_power_of_two(db):
    """1000 rows in 64-row statements and one for each set bit of the rest:
    never more statements than that, so sqlite3's cache keeps them all."""
    statements = []
    db.set_trace_callback(statements.append)
    INSERT.run(db, [x for k in range(1000) for x in (k, b"")])
    assert [s.count("(") for s in statements] == [64 + 1] * 15 + [32 + 1, 8 + 1]  # 1000 = 15*64 + 32 + 8
    assert len(INSERT._sql) == 7  # 1, 2, 4, ..., 64


def test_a_failing_statement_raises(db):
    """(OR IGNORE skips a NULL in a NOT NULL column too; a plain INSERT fails.)"""
    strict = MultiRowInsert("INSERT INTO t (k, v) VALUES ", "(?, ?)", 2)
    with pytest.raises(sqlite3.IntegrityError):
        strict.run(db, [1, b"x", 2, None])
    assert INSERT.run(db, [3, b"x", 4, None]) == 1
