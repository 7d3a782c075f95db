"""Which virtual shard a transaction belongs to.

A cluster has a fixed number N of virtual shards (256 by default), many more
than it will ever have coordinators, so that coordinators can join and leave
without moving any data: only the ownership of whole shards moves. A
transaction's shard is a stable hash of its id, the same in every process and
every Python version (CRC-32 of the UTF-8 id, modulo N; never ``hash()``,
which is salted per process).
"""

from __future__ import annotations

import zlib

DEFAULT_SHARDS = 256
MAX_SHARDS = 16_384


def check_shards(shards: int) -> int:
    """``shards`` if it is a valid shard count, else ValueError naming the limit."""
    if type(shards) is not int or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an integer between 1 and {MAX_SHARDS}, got {shards!r}")
    return shards


def shard_of(txid: str, shards: int) -> int:
    """The shard of transaction ``txid`` in a cluster of ``shards`` shards."""
    return zlib.crc32(txid.encode()) % shards


__all__ = ["DEFAULT_SHARDS", "MAX_SHARDS", "check_shards", "shard_of"]
