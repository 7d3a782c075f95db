"""Virtual shards: a stable, process-independent hash of the transaction id."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from accord.cluster.shards import DEFAULT_SHARDS, MAX_SHARDS, check_shards, shard_of


@pytest.mark.parametrize(
    ("txid", "shards", "expected"),
    [
        ("order-1-0000000", 256, 242),
        ("order-7-0001234", 256, 169),
        ("a", 256, 67),
        ("é", 7, 4),
        ("x" * 128, 64, 55),
        ("anything", 1, 0),
    ],
)
def test_shard_of_is_pinned(txid: str, shards: int, expected: int) -> None:
    """The mapping is part of the log's format (rows carry it): these values never change."""
    assert shard_of(txid, shards) == expected


def test_shard_of_is_the_same_in_another_process() -> None:
    """Unlike hash(), the shard does not depend on the process's hash seed."""
    ids = [f"order-3-{i:07d}" for i in range(50)]
    code = (
        "from accord.cluster.shards import shard_of; import sys;"
        "print(','.join(str(shard_of(t, 256)) for t in sys.argv[1:]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, *ids],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345"},
    )  # fmt: skip
    assert other.stdout.strip() == ",".join(str(shard_of(t, 256)) for t in ids)


def test_shards_of_workload_ids_are_spread_evenly() -> None:
    """Sequential order ids fill every shard, none more than 1.5x the mean."""
    counts = Counter(shard_of(f"order-1-{i:07d}", DEFAULT_SHARDS) for i in range(25_600))
    assert len(counts) == DEFAULT_SHARDS
    assert max(counts.values()) <= 1.5 * 100 and min(counts.values()) >= 0.5 * 100


def test_every_shard_is_in_range() -> None:
    """shard_of returns 0..n-1 for any id and any valid n."""
    for n in (1, 2, 3, 255, 256, 1000, MAX_SHARDS):
        for txid in ("", "a", "order-1-0000001", "ü" * 40):
            assert 0 <= shard_of(txid, n) < n


@pytest.mark.parametrize("bad", [0, -1, MAX_SHARDS + 1, 2.0, True, "256"])
def test_invalid_shard_counts_are_refused_by_name(bad: object) -> None:
    """A shard count that is not an integer in range is a clear error naming the limit."""
    with pytest.raises(ValueError, match=f"shards must be an integer between 1 and {MAX_SHARDS}"):
        check_shards(bad)  # type: ignore[arg-type]
