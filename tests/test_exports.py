"""The public API: what `import accord` offers is deliberate."""

from __future__ import annotations

import accord

EXPECTED = [
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


def test_public_names_are_exactly_the_expected_sorted_list() -> None:
    """accord.__all__ is the pinned list, sorted, and every name resolves."""
    assert accord.__all__ == EXPECTED
    assert sorted(accord.__all__) == accord.__all__
    for name in accord.__all__:
        assert getattr(accord, name) is not None


def test_every_public_error_derives_from_the_root() -> None:
    """Each exported exception is an AccordError."""
    errors = [getattr(accord, n) for n in accord.__all__ if n.endswith(("Error", "Closed"))]
    errors += [accord.DuplicateTransaction, accord.Overloaded, accord.TransactionNotFound]
    errors += [accord.InvalidTransaction]
    assert all(issubclass(e, accord.AccordError) for e in errors)
