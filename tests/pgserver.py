"""A throw-away PostgreSQL server for the tests: initdb + pg_ctl in a temp dir.

Debian's postgresql package (/usr/lib/postgresql/<v>/bin) or any initdb on
PATH.  The server listens only on a unix socket inside its own directory
(no TCP port to collide with another run), trusts local connections, and is
stopped by pg_ctl, then by the postmaster's PID if that fails.  As root it
runs as the `postgres` user (initdb refuses root).

fsync is off: the tests kill relays and servers as processes, never the
machine, so the OS page cache keeps every committed write; synchronous_commit
stays on, so a commit still waits for its WAL write (and for a synchronous
standby, when one is configured).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from urllib.parse import quote, urlencode

PG_USER = "postgres"


def find_bindir() -> str | None:
    """Directory of initdb/pg_ctl/postgres, or None."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(found)) if found else None


class PostgresServer:
    """One cluster.  start() -> dsn(); stop() always leaves no process behind."""

    def __init__(self, bindir: str, root: str | None = None, settings: dict | None = None):
        self.bindir = bindir
        self.root = root or tempfile.mkdtemp(prefix="mzpg-")
        self.data = os.path.join(self.root, "data")
        self.sock_dir = self.root
        self.port = 5432  # only names the socket file: listen_addresses is empty
        self.settings = {"fsync": "off", "full_page_writes": "off", "shared_buffers": "32MB",
                         "max_connections": "200", "listen_addresses": "''",
                         "unix_socket_directories": f"'{self.sock_dir}'", "port": str(self.port),
                         "log_min_messages": "warning", "max_wal_senders": "4", "wal_level": "replica",
                         **(settings or {})}
        self.settings["unix_socket_directories"] = f"'{self.sock_dir}'"
        self.pid: int | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                ent = pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"running as root needs a '{PG_USER}' user for PostgreSQL "
                                   "(apt-get install postgresql creates it)") from None
            os.chown(self.root, ent.pw_uid, ent.pw_gid)
            self._as_user = ["runuser", "-u", PG_USER, "--"]

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [*self._as_user, os.path.join(self.bindir, args[0]), *args[1:]]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr or result.stdout}")

    def init(self) -> "PostgresServer":
        self._check(self._run("initdb", "-D", self.data, "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                              "--no-sync", "--no-instructions"), "initdb")
        self.write_settings()
        return self

    def write_settings(self) -> None:
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")

    def start(self, timeout: float = 60) -> "PostgresServer":
        log = os.path.join(self.root, "server.log")
        self._check(self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", str(int(timeout)), "start",
                              timeout=timeout + 10), f"pg_ctl start (log: {log})")
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        return self

    def standby(self, name: str = "standby1") -> "PostgresServer":
        """A streaming-replication standby of this (running) server, not
        started: pg_basebackup -R, its own socket directory."""
        # Promoted, it stands alone: it must not wait for a synchronous
        # standby of its own (docs/scale-out.md, the failover procedure).
        other = PostgresServer(self.bindir, settings={**self.settings, "synchronous_standby_names": "''"})
        self._check(other._run("pg_basebackup", "-D", other.data, "-X", "stream", "-R", "--no-sync",
                               "-d", self.dsn(application_name=name)), "pg_basebackup")
        other.settings["primary_conninfo"] = f"'{self.dsn(application_name=name)}'"
        other.write_settings()
        return other

    def promote(self) -> None:
        self._check(self._run("pg_ctl", "-D", self.data, "-w", "-t", "30", "promote", timeout=40), "pg_ctl promote")

    def dsn(self, dbname: str = "postgres", **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host={self.sock_dir} port={self.port} user={PG_USER} dbname={dbname}{extra}"

    def url(self, schema: str | None = None, dbname: str = "postgres") -> str:
        """The same as a postgresql:// URL (what `relay --store` takes)."""
        query = {"host": self.sock_dir, "port": str(self.port)}
        if schema:
            query["options"] = f"-c search_path={schema}"
        return f"postgresql://{PG_USER}@/{dbname}?{urlencode(query, quote_via=quote)}"

    def kill(self) -> None:
        """kill -9 of the postmaster (its children exit when they notice)."""
        if self.pid is not None:
            _signal(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 10)
            self._reap_children()
            self.pid = None

    def _reap_children(self) -> None:
        # Backends of a killed postmaster exit on their own; wait for them so
        # the data directory can be removed (bounded).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _holders(self.data):
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid is None:
            return
        result = self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "20", "stop", timeout=30)
        if result.returncode != 0 or not _wait_gone(self.pid, 5):
            _signal(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 10)
        self._reap_children()
        self.pid = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def import_psycopg():
    """psycopg, or skip the test module where it is not installed, except
    in CI (MURANO_ZMQ_REQUIRE_PG=1), where it must be."""
    import pytest

    if os.environ.get("MURANO_ZMQ_REQUIRE_PG") == "1":
        import psycopg

        return psycopg
    return pytest.importorskip("psycopg")


def new_schema(conninfo: str) -> str:
    """A fresh empty schema; returns its name (a store opened with
    search_path set to it sees a database of its own)."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return name


def with_schema(conninfo: str, schema: str) -> str:
    return f"{conninfo} options='-c search_path={schema}'"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our child (not under runuser): reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.02)
    return False


def _holders(data_dir: str) -> bool:
    """Is any process still running from this data directory (a backend)?"""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{d}/cwd") == data_dir:  # the postmaster and backends run there
                return True
        except OSError:
            continue
    return False
