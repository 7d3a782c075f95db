"""The participant SDK's public names are deliberate."""

from __future__ import annotations

import accord.participant

EXPECTED = [
    "DEFAULT_MIN_RETENTION_S",
    "MAX_KEY_CHARS",
    "MAX_RESULT_BYTES",
    "Barrier",
    "BarrierError",
    "BarrierResult",
    "Handler",
    "Kind",
    "Participant",
    "PostgresBarrier",
    "Refusal",
    "SQLiteBarrier",
    "retry_horizon_s",
]


def test_public_names_are_pinned() -> None:
    """accord.participant exports exactly these names, and each of them exists."""
    assert accord.participant.__all__ == EXPECTED
    for name in EXPECTED:
        assert getattr(accord.participant, name) is not None


def test_refusal_is_an_accord_error() -> None:
    """Refusal and BarrierError sit under accord's root exception, and are not retryable."""
    assert issubclass(accord.participant.Refusal, accord.AccordError)
    assert issubclass(accord.participant.BarrierError, accord.AccordError)
    assert not accord.participant.Refusal("short").retryable
