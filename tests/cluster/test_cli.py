"""`accord cluster submit | status | verify | retry | abort | resolve` against a
one-node cluster and the shop's services, as real processes."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import ACCORD, Processes
from .db import pg, wait_for

pytestmark = pytest.mark.slow


def accord(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ACCORD, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_submit_status_and_verify_from_the_command_line(procs: Processes) -> None:
    """Orders submitted with `accord cluster submit --wait` all end; `status` shows
    the node owning every shard and an empty inbox; `verify` finds every invariant
    holding; bad input is refused by name."""
    procs.services(orders=40, seed=4)
    procs.node("solo", shards=8, ttl_s=2.0)
    s = procs.schema

    def owns_all() -> bool:
        tables = pg(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'shard_lease'", s
        )
        return (
            bool(tables)
            and pg(
                f"SELECT count(*) FROM {s}.shard_lease WHERE owner = 'solo' AND expires_at > now()"
            )[0][0]
            == 8
        )

    wait_for("the node to own every shard", owns_all, 30, 0.2)
    done = accord(
        "cluster", "submit", "--store", procs.store, "--services-url", procs.url,
        "--orders", "40", "--seed", "4", "--wait", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["submitted"] == 40
    assert summary["committed"] + summary["aborted"] == 40 and summary["committed"] > 0

    status = accord("cluster", "status", "--store", procs.store, "--lease-ttl", "2", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["owned"] == {"solo": 8} and st["inbox"] == 0 and st["shards"] == 8
    assert st["operator_requests_waiting"] == 0
    assert [m["node"] for m in st["members"] if m["live"]] == ["solo"]

    verify = accord(
        "cluster", "verify", "--store", procs.store, "--services-url", procs.url,
        "--secret-file", str(procs.secret), "--json",
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checked = json.loads(verify.stdout)
    assert all(checked["invariants"].values()) and checked["transactions"] == 40
    assert checked["records_by_node"].keys() == {"solo"}

    # Operator actions reach the owner; a committed order is past retry and
    # abort (409), an unknown id is 404, each exit 1 with the answer.
    (committed,) = pg(
        f"SELECT txid FROM {s}.log WHERE kind = 'end'"
        " AND convert_from(body, 'UTF8')::jsonb ->> 'status' = 'committed' LIMIT 1"
    )[0]
    for action, txid, code in (("retry", committed, 409), ("abort", "nobody", 404)):
        acted = accord(
            "cluster", action, txid, "--store", procs.store, "--reason", "ops drill", "--json"
        )
        assert acted.returncode == 1, acted.stderr
        assert json.loads(acted.stdout)["code"] == code
    blank = accord("cluster", "resolve", committed, "--store", procs.store, "--reason", " ")
    assert blank.returncode == 2 and "reason must be a non-empty text" in blank.stderr

    bad = accord("cluster", "status", "--store", "sqlite:///tmp/x.db")
    assert bad.returncode == 2 and "PostgreSQL" in bad.stderr
    bad = accord(
        "cluster", "node", "--store", procs.store, "--node-id", "no spaces",
        "--services-url", procs.url, "--secret-file", str(procs.secret),
    )  # fmt: skip
    assert bad.returncode == 2 and "node id" in bad.stderr
    bad = accord(
        "cluster", "node", "--store", procs.store, "--node-id", "n9",
        "--services-url", procs.url, "--secret-file", str(procs.secret),
        "--ca-file", "/nonexistent/ca.pem",
    )  # fmt: skip
    assert bad.returncode == 2 and "/nonexistent/ca.pem: cannot read it" in bad.stderr
    assert procs.stop("solo") == 0, procs.log("solo")
