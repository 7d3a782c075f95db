"""Durable logs: one interface, three homes (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from accord.log.base import SCHEMA_VERSION, Store, StoreStats, TxnRow
from accord.log.memory import MemoryStore
from accord.log.postgres import PostgresStore
from accord.log.sqlite import SQLiteStore

__all__ = [
    "SCHEMA_VERSION",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "StoreStats",
    "TxnRow",
    "open_store",
]


def open_store(url: str, *, synchronous: str = "FULL") -> Store:
    """A store from a URL: ``memory``, ``sqlite:///path/to/log.db``, a bare path,
    or ``postgresql://user@host/db?schema=NAME`` (also ``postgres://``; the
    schema defaults to ``accord``, other query parameters go to the driver)."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite://"):
        # sqlite:///var/lib/accord/log.db is absolute, sqlite://log.db relative.
        return SQLiteStore(Path(url.removeprefix("sqlite://")), synchronous=synchronous)
    if url.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in query if k == "schema"), "accord")
        rest = urlencode([(k, v) for k, v in query if k != "schema"])
        return PostgresStore(urlunsplit(parts._replace(query=rest)), schema=schema)
    if "://" in url:
        raise ValueError(
            f"unknown store URL scheme in {url!r}: use memory, sqlite:///PATH or postgresql://"
        )
    return SQLiteStore(Path(url), synchronous=synchronous)
