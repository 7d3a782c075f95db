"""Observability of a coordinator: Prometheus metrics and OpenTelemetry tracing.

Both are :class:`~accord.Observer` s; install several through the server's
fan-out observer. See docs/operations.md for the metrics and the setup.
"""

from accord.observability.metrics import CoordinatorCollector, MetricsObserver, metrics_route
from accord.observability.tracing import TracingObserver, tracing_from_env

__all__ = [
    "CoordinatorCollector",
    "MetricsObserver",
    "TracingObserver",
    "metrics_route",
    "tracing_from_env",
]
