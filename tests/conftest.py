"""Shared test settings.

Hypothesis profiles: ``ci`` (the default) keeps the property-based tests within
the CI budget; set ``ACCORD_HYPOTHESIS_EXAMPLES=N`` to run N examples of the
stateful simulation (and proportionally more of the other properties), e.g.::

    ACCORD_HYPOTHESIS_EXAMPLES=5000 .venv/bin/pytest tests/core/test_machine_stateful.py

A failing example prints its steps and a ``@reproduce_failure`` blob; the
failing example is also kept in ``.hypothesis/`` and replayed first on the next
run. ``--hypothesis-seed=N`` pins the random seed of a whole run.
``ACCORD_HYPOTHESIS_PROFILE=explore`` skips shrinking: a failure is reported
at once, unshrunk (useful for long searches and for mutation testing).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

EXAMPLES = int(os.environ.get("ACCORD_HYPOTHESIS_EXAMPLES", "200"))

settings.register_profile(
    "ci",
    max_examples=max(EXAMPLES // 2, 50),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    parent=settings.get_profile("ci"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile(os.environ.get("ACCORD_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop (not skip) a test's combinations with a backend that lacks a
    capability the test is marked with (see BACKENDS_WITHOUT in a test module)."""
    keep, drop = [], []
    for item in items:
        lacking = getattr(getattr(item, "module", None), "BACKENDS_WITHOUT", {})
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        if any(item.get_closest_marker(m) and backend in names for m, names in lacking.items()):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
