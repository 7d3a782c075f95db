"""The wire protocol's signing and replay protection."""

from __future__ import annotations

import pytest

from accord import wire

SECRET = b"s" * 32


def _signed(now_s: float, body: bytes = b"{}") -> dict[str, str]:
    return wire.sign(SECRET, "k", "POST", "/svc/try", body, now_s=now_s)


def test_a_full_replay_memory_refuses_rather_than_forgets() -> None:
    """With the nonce memory full of live nonces, a new request is refused (retryable)
    and an old one still cannot be replayed."""
    verifier = wire.Verifier({"k": SECRET}, max_nonces=2)
    first = _signed(1000.0)
    verifier.verify("POST", "/svc/try", first, b"{}", now_s=1000.0)
    verifier.verify("POST", "/svc/try", _signed(1000.0), b"{}", now_s=1000.0)
    with pytest.raises(wire.ReplayMemoryFull):
        verifier.verify("POST", "/svc/try", _signed(1001.0), b"{}", now_s=1001.0)
    with pytest.raises(wire.SignatureError, match="replayed"):
        verifier.verify("POST", "/svc/try", first, b"{}", now_s=1002.0)


def test_nonces_outside_the_window_are_forgotten() -> None:
    """Once the skew window has passed, old nonces make room (their requests are stale)."""
    verifier = wire.Verifier({"k": SECRET}, max_nonces=1)
    old = _signed(1000.0)
    verifier.verify("POST", "/svc/try", old, b"{}", now_s=1000.0)
    later = 1000.0 + wire.MAX_SKEW_S + 1
    verifier.verify("POST", "/svc/try", _signed(later), b"{}", now_s=later)
    with pytest.raises(wire.SignatureError, match="stale"):
        verifier.verify("POST", "/svc/try", old, b"{}", now_s=later)


def test_signed_path_is_the_raw_request_path_without_query() -> None:
    """The signed path is the percent-encoded request-line path, query excluded."""
    scope = {"raw_path": b"/caf%C3%A9/try?x=1", "path": "/café/try"}
    assert wire.signed_path(scope, "/café/try") == "/caf%C3%A9/try"
    assert wire.signed_path({"path": "/a/try"}, "/a/try") == "/a/try"


def test_signed_path_without_raw_path_is_the_escaped_decoded_path() -> None:
    """Without raw_path or a fallback, the decoded path with ?, # and \\ escaped is signed."""
    assert wire.signed_path({"path": "/a/try"}) == "/a/try"
    assert wire.signed_path({"path": "/a?b#c\\d/try", "raw_path": b""}) == "/a%3Fb%23c%5Cd/try"
    assert wire.signed_path({"path": "/café/try", "raw_path": b"/caf%C3%A9/try"}) == (
        "/caf%C3%A9/try"
    )
