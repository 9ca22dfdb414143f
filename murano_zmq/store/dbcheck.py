"""What must stop a start before the relay's first connection to its database.

SQLite creates a missing database file and the relay then writes its tables
into whatever file it opened; a start on an empty store then deletes the
segment files no row points at.  So a database that is missing or empty
beside segment files (restored without it, or moved away), a dangling
symbolic link, and a file with tables the relay does not make are refused
first, in one line, with nothing created or changed.  SQLiteStore checks
this at start, and `relay --check-config` says the same.
"""

from __future__ import annotations

import os
import sqlite3

from .schema import SCHEMA
from .segments import SEGMENT_DIR, segment_number

__all__ = ["foreign_tables", "unusable_database"]


def unusable_database(data_dir: str, db_name: str) -> str | None:
    """Why the database file in `data_dir` must not be opened (nor
    created), or None."""
    path = os.path.join(data_dir, db_name)
    if os.path.islink(path) and not os.path.exists(path):
        return (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: fix the link, "
                "or remove it to start with an empty store")
    segments = _segment_files(os.path.join(data_dir, SEGMENT_DIR))
    if segments and _empty(path):
        what = "missing" if not os.path.exists(path) else "empty"
        return (f"{path} is {what}, but {os.path.join(data_dir, SEGMENT_DIR)} holds {segments} segment "
                f"file(s) of message bodies that only its rows can find: restore {db_name} (with its "
                f"-wal file) from the backup they belong to, or move {SEGMENT_DIR}/ aside to start with "
                "an empty store (docs/operations.md, 'Segment files')")
    return None


def foreign_tables(con: sqlite3.Connection, path: str) -> str | None:
    """(on a connection to an existing database, before the relay writes
    its tables) Why the database is not one of the relay's, or None.  A
    database with the relay's schema version is its own; without one, each
    table must be one the relay makes, with the relay's columns (a start
    that stopped while it made them)."""
    tables = [name for (name,) in con.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    if not tables:
        return None
    ours = _our_columns()
    unknown = [name for name in tables if name not in ours]
    if unknown:
        return (f"{path} is not a murano-zmq relay database: it holds table(s) "
                f"{', '.join(sorted(unknown)[:5])}, which the relay does not make (fix --data-dir)")
    if "meta" in tables and con.execute("SELECT 1 FROM meta WHERE key='schema'").fetchone():
        return None  # (its version is checked, and older ones migrated, by the store)
    for name in tables:
        columns = [row[1] for row in con.execute(f'PRAGMA table_info("{name}")')]
        if columns != ours[name]:
            return (f"{path} is not a murano-zmq relay database: its table {name} has the columns "
                    f"{', '.join(columns)}, and no schema version (fix --data-dir)")
    return None


def _our_columns() -> dict[str, list[str]]:
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(SCHEMA)
        return {name: [row[1] for row in con.execute(f'PRAGMA table_info("{name}")')]
                for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()


def _segment_files(segment_dir: str) -> int:
    try:
        names = os.listdir(segment_dir)
    except OSError:
        return 0
    return sum(1 for name in names if segment_number(name) is not None)


def _empty(path: str) -> bool:
    """Missing, or no bytes in it and none in a WAL beside it."""
    for name in (path, path + "-wal"):
        try:
            if os.path.getsize(name) > 0:
                return False
        except OSError:
            pass
    return True
