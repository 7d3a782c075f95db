"""Durable logs: one interface, three homes (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

from accord.log.base import SCHEMA_VERSION, Store, StoreStats, TxnRow
from accord.log.memory import MemoryStore
from accord.log.sqlite import SQLiteStore

__all__ = [
    "SCHEMA_VERSION",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "StoreStats",
    "TxnRow",
    "open_store",
]


def open_store(url: str, *, synchronous: str = "FULL") -> Store:
    """A store from a URL: ``memory``, ``sqlite:///path/to/log.db`` or a bare path."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite://"):
        # sqlite:///var/lib/accord/log.db is absolute, sqlite://log.db relative.
        return SQLiteStore(Path(url.removeprefix("sqlite://")), synchronous=synchronous)
    if url.startswith(("postgres://", "postgresql://")):
        raise ValueError(
            "the PostgreSQL store is not available yet (issue #5); use sqlite:///PATH or memory"
        )
    if "://" in url:
        raise ValueError(f"unknown store URL scheme in {url!r}: use memory or sqlite:///PATH")
    return SQLiteStore(Path(url), synchronous=synchronous)
