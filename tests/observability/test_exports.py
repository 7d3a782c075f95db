"""accord.observability's public names are deliberate."""

from __future__ import annotations

import accord.observability

EXPECTED = [
    "CoordinatorCollector",
    "MetricsObserver",
    "TracingObserver",
    "metrics_route",
    "tracing_from_env",
]


def test_public_names_are_pinned() -> None:
    """accord.observability exports exactly these names, and each of them exists."""
    assert accord.observability.__all__ == EXPECTED
    for name in EXPECTED:
        assert getattr(accord.observability, name) is not None
