"""A cluster node whose participants say yes at once, for benchmarks only.

    .venv/bin/python bench/null_node.py --store postgresql://...?schema=S --node-id N
        [--shards 256] [--lease-ttl 5] [--concurrency 100]

`accord cluster node` with a transport that answers OK to every call without
sending anything: what is measured is the coordinators and the log alone
(`bench/cluster.py throughput --null` starts these). It commits transactions
no participant ever saw, so it is not a command of accord's: never point it at
a schema that holds real transactions.
"""

from __future__ import annotations

import argparse
import logging
import sys

from accord.cli._loop import run
from accord.cli.cluster import serve_node
from accord.cluster import DEFAULT_SHARDS, DEFAULT_TTL_S, ClusterNode
from accord.core.machine import Outcome
from accord.log import PostgresStore, open_store
from accord.transport.base import Call, Reply, Started, Transport

_YES = Reply(Outcome.OK)


class NullTransport(Transport):
    """Participants that say yes at once, without being called."""

    def start(self, call: Call) -> Started:
        return _YES

    async def call(self, call: Call) -> Reply:
        return _YES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_TTL_S)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    store = open_store(args.store)
    if not isinstance(store, PostgresStore):
        raise SystemExit("--store must be a postgresql:// URL")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    node = ClusterNode(
        store.dsn,
        NullTransport(),
        node_id=args.node_id,
        schema=store.schema,
        shards=args.shards,
        ttl_s=args.lease_ttl,
        max_in_flight=args.concurrency,
    )
    raise SystemExit(run(serve_node(node, None)))


if __name__ == "__main__":
    main()
