"""`murano-zmq relay --check-config`: validate a relay's configuration
without starting it (for `ExecStartPre=` in a service unit, and for people).

Checks the security options and files (own key, authorized keys,
permissions), the data directory (exists or can be made, is writable, its
relay.db opens and passes SQLite's quick_check, every message whose body is
in a segment file finds it whole), the bind endpoint, the
metrics address and the discovery interfaces.  Nothing is created or
changed: a data directory that does not exist yet is only checked for a
parent the relay could create it in.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..store.dbcheck import foreign_tables, unusable_database
from ..store.packs import damaged_packs, stored_count
from ..store.schema import SCHEMA_VERSION
from ..store.journal import FILE_NAME as JOURNAL_FILE, check_file as check_journal_file
from ..store.segments import SEGMENT_DIR
from ..store.sqlite import SQLiteStore
from .config import RelayConfig

DB_NAME = SQLiteStore.DB_NAME


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


def check_config(config: RelayConfig) -> list[Check]:
    return [*_security(config), _data_dir(config.data_dir, config.create_parents), _bind(config.bind),
            *_metrics(config.metrics), *_discovery(config.discovery_interfaces)]


def _security(config: RelayConfig) -> list[Check]:
    from ..security.relay import RelaySecurity, SecurityConfigError

    try:
        security = RelaySecurity.from_options(config.key, config.key_dir, config.authorized_keys,
                                              config.permissions, config.allow_all)
    except SecurityConfigError as exc:
        return [Check(False, "security", str(exc))]
    checks = [Check(True, "security", security.describe())]
    if security.key is not None:
        checks.append(_secret_key_mode(config))
    if security.permissions is not None and security.keys is not None:
        # Identities of the permissions file that match no authorized key
        # grant nothing today: often a typo, so say so (not a failure).
        from fnmatch import fnmatchcase

        names = security.keys.names()
        unmatched = [r.identity for r in security.permissions.current.rules
                     if not any(fnmatchcase(n, r.identity) for n in names)]
        detail = (f"{len(security.permissions.current.rules)} identity table(s) in {security.permissions.path}"
                  + (f"; matching no authorized key: {', '.join(unmatched)}" if unmatched else ""))
        checks.append(Check(True, "permissions", detail))
    return checks


def _secret_key_mode(config: RelayConfig) -> Check:
    from ..security.keys import SECRET_SUFFIX, resolve_key_path

    path = resolve_key_path(config.key, config.key_dir or None, SECRET_SUFFIX)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Check(False, "secret key", f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    return Check(True, "secret key", f"{path} (mode {mode:o})")


def _data_dir(data_dir: str, create_parents: bool = False) -> Check:
    path = Path(data_dir)
    if not path.exists():
        up = path.absolute().parent
        if not create_parents and not up.is_dir():
            what = "is not a directory" if up.exists() else "does not exist"
            return Check(False, "data dir", f"{path}: its parent {up} {what} (create it, or fix --data-dir)")
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            return Check(False, "data dir", f"{path} does not exist and {parent} is not writable")
        return Check(True, "data dir", f"{path} does not exist yet; the relay will create it in {parent}")
    if not path.is_dir():
        return Check(False, "data dir", f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(False, "data dir", f"{path} is not writable by uid {os.geteuid()}")
    holder = _lock_holder(path)
    if holder is not None:
        return Check(False, "data dir", f"{path} is in use by another relay (pid {holder})")
    refusal = unusable_database(str(path), DB_NAME) or check_journal_file(str(path / JOURNAL_FILE))
    if refusal is not None:
        return Check(False, "data dir", refusal)
    journal = path / JOURNAL_FILE
    if journal.exists() and not os.access(journal, os.R_OK | os.W_OK):
        return Check(False, "data dir", f"{journal} is not readable and writable by uid {os.geteuid()}")
    db = path / DB_NAME
    if not db.exists():
        return Check(True, "data dir", f"{path} (writable; no {DB_NAME} yet)")
    if not os.access(db, os.R_OK | os.W_OK):
        return Check(False, "data dir", f"{db} is not readable and writable by uid {os.geteuid()}")
    try:
        # With no -wal (a clean stop) the file is all there is: immutable, or
        # SQLite would create -wal and -shm to read it.  With one (a crash),
        # reading it rebuilds -shm, the WAL's index, which changes no data.
        wal = db.with_name(DB_NAME + "-wal").exists()
        con = sqlite3.connect(f"file:{db}?mode=ro{'' if wal else '&immutable=1'}", uri=True, timeout=5)
        try:
            foreign = foreign_tables(con, str(db))
            if foreign is not None:
                return Check(False, "data dir", foreign)
            version = _schema_version(con)
            if version is not None and version > SCHEMA_VERSION:
                return Check(False, "data dir", f"{db} has schema version {version}, this relay reads "
                                                f"{SCHEMA_VERSION} and older (a newer relay's database)")
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
            count = stored_count(con)
            lost = _bodies_missing(con, path / SEGMENT_DIR) if verdict == "ok" else 0
            damaged = damaged_packs(con) if verdict == "ok" else (0, 0)
        finally:
            con.close()
    except sqlite3.Error as exc:
        return Check(False, "data dir", f"{db} is not a usable relay database: {exc}")
    if verdict != "ok":
        return Check(False, "data dir", f"{db} fails SQLite's quick_check: {verdict}")
    if damaged[0]:
        return Check(False, "data dir", f"{damaged[1]} message(s) in {damaged[0]} run(s) of {db} cannot be read "
                                        "(a damaged page: SQLite keeps no checksum of a row); the relay serves "
                                        "the others and logs these as lost: restore the database from a backup "
                                        "to keep them")
    if lost:
        return Check(False, "data dir", f"{lost} message(s) have their body in a segment file of "
                                        f"{path / SEGMENT_DIR} that is missing or cut short: restore the "
                                        "directory from the backup it was taken with (the relay would log "
                                        "and drop them; docs/operations.md, 'Segment files')")
    return Check(True, "data dir", f"{path} (writable; {DB_NAME} passes quick_check, {count} message(s))")


def _schema_version(con: sqlite3.Connection) -> int | None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    except sqlite3.OperationalError:  # (no meta table yet)
        return None
    return row[0] if row and isinstance(row[0], int) else None


def _bodies_missing(con: sqlite3.Connection, segment_dir: Path) -> int:
    """How many messages point at segment bytes that are not there."""
    if "seg" not in {r[1] for r in con.execute("PRAGMA table_info(messages)")}:
        return 0  # schema 1: every body in the database
    lost = 0
    for seg, n, extent in con.execute("SELECT seg, count(*), max(seg_off + seg_len) FROM messages "
                                      "WHERE seg IS NOT NULL GROUP BY seg"):
        try:
            size = (segment_dir / f"{seg:012d}.seg").stat().st_size
        except OSError:
            lost += n
            continue
        if extent > size:
            lost += con.execute("SELECT count(*) FROM messages WHERE seg=? AND seg_off + seg_len > ?",
                                (seg, size)).fetchone()[0]
    return lost


def _lock_holder(path: Path) -> str | None:
    """The pid in relay.lock if a running relay holds it (store/lock.py), else None.
    Only a shared, non-blocking try: nothing is written."""
    import fcntl

    from ..store.lock import LOCK_NAME

    try:
        fd = os.open(path / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(fd)


def _bind(endpoint: str) -> Check:
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        try:
            port = urlsplit(endpoint.replace("tcp://", "http://", 1)).port
        except ValueError:
            port = None
        if port is None and not endpoint.endswith(":*"):
            return Check(False, "bind", f"{endpoint!r} has no valid port (tcp://HOST:PORT)")
        if not rest.rpartition(":")[0]:
            return Check(False, "bind", f"{endpoint!r} has no host (tcp://HOST:PORT; * for every interface)")
        return _trial_bind(endpoint)
    if scheme == "ipc":
        parent = os.path.dirname(rest) or "."
        if not rest or not os.path.isdir(parent):
            return Check(False, "bind", f"{endpoint!r}: the directory {parent} does not exist")
        return Check(True, "bind", endpoint)  # (not tried: a bind would unlink a running relay's socket file)
    if scheme == "inproc":
        return Check(False, "bind", inproc_problem(endpoint))
    return Check(False, "bind", f"{endpoint!r}: expected tcp://HOST:PORT or ipc://PATH")


def inproc_problem(endpoint: str) -> str:
    """Why a relay device (not a relay embedded in a program, whose nodes
    may share its zmq.Context) cannot serve on an inproc:// endpoint."""
    return (f"{endpoint!r} is reachable only inside the relay's process: no node could connect "
            "(tcp://HOST:PORT or ipc://PATH)")


def _trial_bind(endpoint: str) -> Check:
    """Bind a throwaway socket there and close it: an address this host
    does not have fails as the relay's bind would.  An address in use now
    (this relay, running) is not a failure of the configuration."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            return Check(True, "bind", f"{endpoint} (in use now: the relay running there?)")
        return Check(False, "bind", f"cannot bind {endpoint}: {exc.strerror}")
    finally:
        sock.close(0)
    return Check(True, "bind", endpoint)


def _metrics(address: str) -> list[Check]:
    if not address:
        return []
    from .metrics import parse_address

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        return [Check(False, "metrics", str(exc))]
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return [Check(False, "metrics", "needs prometheus-client: pip install 'murano-zmq[metrics]'")]
    return [Check(True, "metrics", f"http://{host}:{port}/metrics")]


def _discovery(interfaces: str) -> list[Check]:
    if not interfaces:
        return []
    from ..discovery.zeroconf import parse_interfaces

    try:
        chosen = parse_interfaces(interfaces)
    except ValueError as exc:
        return [Check(False, "discovery", str(exc))]
    return [Check(True, "discovery", f"advertised on {chosen if isinstance(chosen, list) else 'all interfaces'}")]


def print_checks(config: RelayConfig) -> int:
    """`relay --check-config`: one line per check and a summary; 0 if all passed, else 1."""
    checks = check_config(config)
    for check in checks:
        print(check.line())
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} check(s) passed, {failed} failed" if failed
          else f"configuration ok ({len(checks)} checks)")
    return 1 if failed else 0
