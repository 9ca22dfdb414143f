"""Pick the store a relay runs on from its --store option."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..protocol.errors import StartupError

POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreUnavailable(StartupError):
    """The store cannot be opened (no driver, no server, wrong schema,
    another relay on it): the one line an operator reads.  `transient`: the
    server is down or went away (a standby tries again)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class StandbyStopped(StoreUnavailable):
    """A standby relay was stopped before it took over."""


def check_store_url(url: str) -> str:
    """'' or 'sqlite' (SQLite in the data directory) or a postgresql:// URL;
    anything else is a ValueError naming what is accepted."""
    if url in ("", "sqlite"):
        return url
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        return url
    raise ValueError(f"--store {url!r}: expected 'sqlite' or a postgresql://... URL")


def is_sqlite(url: str) -> bool:
    return check_store_url(url) in ("", "sqlite")


def open_store(url: str, data_dir: str, standby=None, shared: bool = False):
    """The Store for `url`: SQLite in `data_dir` by default.  standby (a
    threading.Event, PostgreSQL only): wait for the running relay to end,
    until the event is set.  shared (PostgreSQL only): one of several
    relays serving from the database at once."""
    if is_sqlite(url):
        from .sqlite import SQLiteStore

        return SQLiteStore(data_dir)
    try:
        from .postgresql import PostgresStore
    except ImportError as exc:
        raise StoreUnavailable(str(exc)) from None
    return PostgresStore(url, standby=standby, shared=shared)
