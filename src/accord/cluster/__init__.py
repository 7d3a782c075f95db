"""Several coordinators sharing one PostgreSQL log: shards, leases, fencing.

* :mod:`accord.cluster.shards`: a transaction id's virtual shard.
* :mod:`accord.cluster.leases`: the lease, member and inbox tables.
* :mod:`accord.cluster.node`: :class:`ClusterNode`, a coordinator that drives
  the shards it holds leases on.
* :mod:`accord.cluster.inbox`: submissions for shards another node owns, and
  :class:`ClusterClient` for processes that only submit.

How it fits together, and what it costs: docs/scalability.md.
"""

from accord.cluster.inbox import ClusterClient
from accord.cluster.node import DEFAULT_TTL_S, ClusterNode, LeaseState, NodeStats
from accord.cluster.shards import DEFAULT_SHARDS, shard_of

__all__ = [
    "DEFAULT_SHARDS",
    "DEFAULT_TTL_S",
    "ClusterClient",
    "ClusterNode",
    "LeaseState",
    "NodeStats",
    "shard_of",
]
