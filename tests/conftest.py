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
