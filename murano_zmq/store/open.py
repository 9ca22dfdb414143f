"""Pick the store a relay runs on from its --store option."""

from __future__ import annotations

from urllib.parse import urlsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreUnavailable(RuntimeError):
    """The store cannot be opened (no driver, no server, wrong schema)."""


def check_store_url(url: str) -> str:
    """'' or 'sqlite' (SQLite in the data directory) or a postgresql:// URL;
    anything else is a ValueError naming what is accepted."""
    if url in ("", "sqlite"):
        return url
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        return url
    raise ValueError(f"--store {url!r}: expected 'sqlite' or a postgresql://... URL")


def open_store(url: str, data_dir: str):
    """The Store for `url`: SQLite in `data_dir` by default."""
    if check_store_url(url) in ("", "sqlite"):
        from .sqlite import SQLiteStore

        return SQLiteStore(data_dir)
    try:
        from .postgresql import PostgresStore
    except ImportError as exc:
        raise StoreUnavailable(str(exc)) from None
    return PostgresStore(url)
