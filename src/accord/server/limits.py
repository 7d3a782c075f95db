"""What the API accepts: request limits and the participant allow-list.

Every breach is refused with a 4xx whose message names the limit, before
anything reaches the coordinator or the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from accord.core.spec import MAX_BRANCHES, MAX_PAYLOAD_BYTES

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on requests. Branch count and payload size can only be lowered
    below what a transaction spec allows (64 branches, 64 KiB a payload)."""

    max_body_bytes: int = 1024 * 1024
    max_branches: int = MAX_BRANCHES
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    # Nesting of the whole request body: the object itself is depth 1, a
    # branch's payload object depth 4.
    max_json_depth: int = 32
    # Longest wait=true (and operator wait) before answering 202 anyway.
    max_wait_s: float = 30.0
    max_reason_chars: int = 1000
    max_list_limit: int = 1000
    # How long a submit may wait for an in-flight slot before 503.
    admission_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_branches <= MAX_BRANCHES:
            raise ValueError(f"max_branches must be between 1 and {MAX_BRANCHES}")
        if not 2 <= self.max_payload_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_payload_bytes must be between 2 and {MAX_PAYLOAD_BYTES}")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if not 4 <= self.max_json_depth <= 256:
            raise ValueError("max_json_depth must be between 4 and 256")
        if not 0 < self.max_wait_s <= 3600:
            raise ValueError("max_wait_s must be in (0, 3600]")
        if not 0 <= self.admission_wait_s <= 60:
            raise ValueError("admission_wait_s must be between 0 and 60")
        if self.max_reason_chars < 1 or self.max_list_limit < 1:
            raise ValueError("max_reason_chars and max_list_limit must be at least 1")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (decoded JSON) nests deeper than ``limit`` levels
    (a scalar is depth 1, ``[]`` and ``{}`` too). Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if type(item) is dict:
            stack.extend((v, depth + 1) for v in item.values())
        elif type(item) is list:
            stack.extend((v, depth + 1) for v in item)
    return False


@dataclass(frozen=True, slots=True)
class _Rule:
    scheme: str
    host: str  # lower case; "*.example.com" matches subdomains only
    port: int | None  # None: any port
    path: str  # "" or "/prefix" (matched at a path boundary)

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if scheme != self.scheme:
            return False
        if self.host.startswith("*."):
            if not host.endswith(self.host[1:]) or host == self.host[2:]:
                return False
        elif host != self.host:
            return False
        if self.port is not None and port != self.port:
            return False
        p = self.path
        return not p or path == p or path.startswith(p + "/")


class AllowList:
    """Which participant URLs transactions may name.

    Each entry is ``scheme://host[:port][/path]``: the scheme must be http or
    https; the host is exact (case-insensitive) or ``*.domain`` for any
    subdomain; the port defaults to the scheme's, ``:*`` means any; a path
    matches that prefix at a path boundary. A URL with credentials, a query
    or a fragment is never allowed. The coordinator never follows a
    participant's redirect (see ``accord.transport.http``), so a listed host
    cannot send calls elsewhere.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        self._rules = tuple(_parse_rule(e) for e in self.entries)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def check(self, participant: str) -> str | None:
        """None if ``participant`` is allowed, else why not."""
        shown = participant if len(participant) <= 200 else participant[:200] + "..."
        if any(c in participant for c in "?#\\") or any(ord(c) < 33 for c in participant):
            return f"{shown!r} must be a plain http(s) URL (no query, fragment, spaces)"
        try:
            url = URL(participant)
        except (TypeError, ValueError):
            return f"{shown!r} is not a valid URL"
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            return f"{shown!r} must use http or https"
        if not url.host:
            return f"{shown!r} has no host"
        if url.user is not None or url.password is not None:
            # Not echoed: the URL holds a secret.
            return "a participant URL must not carry credentials (user:password@)"
        port = url.port or _DEFAULT_PORTS[scheme]
        path = url.path.rstrip("/")
        if not any(r.matches(scheme, url.host.lower(), port, path) for r in self._rules):
            return f"{shown!r} is not in the participant allow-list"
        return None


def _parse_rule(entry: str) -> _Rule:
    wildcard_port = entry.endswith(":*") or ":*/" in entry
    text = entry.replace(":*", "", 1) if wildcard_port else entry
    star = text.find("://*.")
    placeholder = "wildcard-placeholder."
    if star >= 0:
        text = text[: star + 3] + placeholder + text[star + 5 :]
    try:
        url = URL(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"allow-list entry {entry!r} is not a URL: {exc}") from None
    if url.scheme not in _DEFAULT_PORTS or not url.host:
        raise ValueError(f"allow-list entry {entry!r} must be http(s)://host[:port][/path]")
    if url.user or url.password or url.query_string or url.fragment:
        raise ValueError(f"allow-list entry {entry!r} must not have credentials, query or fragment")
    host = url.host.lower()
    if host.startswith(placeholder):
        host = "*." + host[len(placeholder) :]
    port = None if wildcard_port else (url.port or _DEFAULT_PORTS[url.scheme])
    return _Rule(url.scheme, host, port, url.path.rstrip("/"))
