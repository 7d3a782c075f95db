"""accord: a distributed transaction coordinator (TCC and saga) for Python services."""

from accord.client import ApiError, Client, SyncClient
from accord.cluster import ClusterClient, ClusterNode
from accord.coordinator import Coordinator, Observer, TxnResult
from accord.core.machine import Outcome
from accord.core.records import Decision, TxnStatus
from accord.core.spec import BranchSpec, Op, Protocol, RetryPolicy, TransactionSpec
from accord.errors import (
    AccordError,
    CoordinatorClosed,
    DuplicateTransaction,
    InvalidTransaction,
    Overloaded,
    SchemaVersionError,
    StoreError,
    TransactionNotFound,
)
from accord.log import MemoryStore, SQLiteStore, Store, open_store
from accord.transport import Call, HttpTransport, InProcessTransport, Reply, Transport

__version__ = "0.1.0"

__all__ = [
    "AccordError",
    "ApiError",
    "BranchSpec",
    "Call",
    "Client",
    "ClusterClient",
    "ClusterNode",
    "Coordinator",
    "CoordinatorClosed",
    "Decision",
    "DuplicateTransaction",
    "HttpTransport",
    "InProcessTransport",
    "InvalidTransaction",
    "MemoryStore",
    "Observer",
    "Op",
    "Outcome",
    "Overloaded",
    "Protocol",
    "Reply",
    "RetryPolicy",
    "SQLiteStore",
    "SchemaVersionError",
    "Store",
    "StoreError",
    "SyncClient",
    "TransactionNotFound",
    "TransactionSpec",
    "Transport",
    "TxnResult",
    "TxnStatus",
    "open_store",
]
