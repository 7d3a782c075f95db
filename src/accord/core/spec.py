"""What a global transaction is: its branches, its protocol and its policies.

These are validated value types. Construction either succeeds or raises
:class:`~accord.errors.InvalidTransaction` naming the field and the limit, so
nothing half-valid ever reaches the log.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from accord.errors import InvalidTransaction

MAX_BRANCHES = 64
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ID_LENGTH = 128
MAX_TIMEOUT_S = 3600.0
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_ATTEMPTS = 1000
MAX_PAYLOAD_DEPTH = 64
# Used with fullmatch: with match, "$" would also accept a trailing newline.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_json_encoder = msgspec.json.Encoder()


class Protocol(StrEnum):
    """The two protocols accord runs."""

    TCC = "tcc"
    SAGA = "saga"


class Op(StrEnum):
    """Participant operations. TCC: try/confirm/cancel. Saga: action/compensate."""

    TRY = "try"
    CONFIRM = "confirm"
    CANCEL = "cancel"
    ACTION = "action"
    COMPENSATE = "compensate"


def _finite_positive(name: str, value: float, upper: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTransaction(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidTransaction(name, f"must be a positive finite number, got {value!r}")
    if value > upper:
        raise InvalidTransaction(name, f"must be at most {upper:g}, got {value!r}")


def _check_json(payload: Any, where: str) -> None:
    """Reject what the encoder accepts but JSON cannot carry unchanged through the
    log: NaN and infinities (encoded as null), non-string object keys (encoded
    as strings) and nesting deep enough to fail decoding in a deeper stack."""
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidTransaction(where, f"{value!r} is not a JSON number")
        elif isinstance(value, dict | list | tuple):
            if depth > MAX_PAYLOAD_DEPTH:
                raise InvalidTransaction(
                    where, f"is nested more than {MAX_PAYLOAD_DEPTH} levels deep"
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise InvalidTransaction(where, f"object keys must be strings, got {key!r}")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter, bounded by attempts.

    The delay before attempt ``n + 1`` (after ``n`` failed attempts) is drawn
    uniformly from ``[0, min(maximum_interval_s, initial_interval_s *
    backoff_coefficient ** (n - 1))]`` when ``jitter`` is on, else that cap.
    In the prepare phase the transaction's deadline bounds retries too.
    """

    initial_interval_s: float = 0.05
    backoff_coefficient: float = 2.0
    maximum_interval_s: float = 2.0
    maximum_attempts: int = 10
    jitter: bool = True

    def __post_init__(self) -> None:
        _finite_positive("retry.initial_interval_s", self.initial_interval_s, MAX_TIMEOUT_S)
        _finite_positive("retry.maximum_interval_s", self.maximum_interval_s, MAX_TIMEOUT_S)
        _finite_positive("retry.backoff_coefficient", self.backoff_coefficient, 100.0)
        if self.backoff_coefficient < 1:
            raise InvalidTransaction(
                "retry.backoff_coefficient", f"must be >= 1, got {self.backoff_coefficient!r}"
            )
        if self.maximum_interval_s < self.initial_interval_s:
            raise InvalidTransaction(
                "retry.maximum_interval_s", "must be >= retry.initial_interval_s"
            )
        if isinstance(self.maximum_attempts, bool) or not isinstance(self.maximum_attempts, int):
            raise InvalidTransaction("retry.maximum_attempts", "must be an integer")
        if not 1 <= self.maximum_attempts <= MAX_ATTEMPTS:
            raise InvalidTransaction(
                "retry.maximum_attempts",
                f"must be between 1 and {MAX_ATTEMPTS}, got {self.maximum_attempts}",
            )
        if not isinstance(self.jitter, bool):
            # A truthy string such as "no" must not silently mean "on".
            raise InvalidTransaction("retry.jitter", f"must be true or false, got {self.jitter!r}")

    def delay_s(self, failed_attempts: int, jitter_sample: float) -> float:
        """Seconds to wait after ``failed_attempts`` failures; ``jitter_sample`` in [0, 1)."""
        exponent = max(failed_attempts - 1, 0)
        # Cap the exponent so that large attempt counts cannot overflow a float.
        cap = min(
            self.maximum_interval_s,
            self.initial_interval_s * self.backoff_coefficient ** min(exponent, 64),
        )
        return cap * jitter_sample if self.jitter else cap

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial_interval_s": self.initial_interval_s,
            "backoff_coefficient": self.backoff_coefficient,
            "maximum_interval_s": self.maximum_interval_s,
            "maximum_attempts": self.maximum_attempts,
            "jitter": self.jitter,
        }


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class BranchSpec:
    """One participant's part of a global transaction."""

    name: str
    participant: str
    payload: Any = field(default_factory=dict)
    retry: RetryPolicy = DEFAULT_RETRY
    timeout_s: float = 5.0

    def validate(self, where: str) -> None:
        if (
            not isinstance(self.name, str)
            or not _NAME_RE.fullmatch(self.name)
            or len(self.name) > 64
        ):
            raise InvalidTransaction(
                f"{where}.name",
                "must be 1-64 characters of letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit, got {self.name!r}",
            )
        if not isinstance(self.participant, str) or not self.participant:
            raise InvalidTransaction(f"{where}.participant", "must be a non-empty string")
        if len(self.participant) > 2048:
            raise InvalidTransaction(f"{where}.participant", "must be at most 2048 characters")
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidTransaction(f"{where}.retry", "must be a RetryPolicy")
        _finite_positive(f"{where}.timeout_s", self.timeout_s, MAX_TIMEOUT_S)
        try:
            size = len(_json_encoder.encode(self.payload))
        except RecursionError:
            raise InvalidTransaction(
                f"{where}.payload", f"is nested more than {MAX_PAYLOAD_DEPTH} levels deep"
            ) from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidTransaction(f"{where}.payload", f"must be JSON-encodable: {exc}") from exc
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidTransaction(
                f"{where}.payload", f"is {size} bytes encoded, the limit is {MAX_PAYLOAD_BYTES}"
            )
        _check_json(self.payload, f"{where}.payload")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "participant": self.participant,
            "payload": self.payload,
            "retry": self.retry.to_dict(),
            "timeout_s": self.timeout_s,
        }


@dataclass(frozen=True, slots=True)
class TransactionSpec:
    """A global transaction as submitted: validated on construction.

    ``timeout_s`` is the deadline relative to submission: the prepare phase
    (TCC tries, saga forward actions) must finish by then or the transaction
    aborts. Confirms, cancels and compensations are not bounded by it; they are
    retried per branch policy and park the transaction as needs-attention when
    they run out.
    """

    protocol: Protocol
    branches: tuple[BranchSpec, ...]
    id: str = ""
    timeout_s: float = 30.0
    sequential: bool = False

    def __post_init__(self) -> None:
        # Only an absent id (empty or None) is generated; 0, False or [] are
        # malformed ids and must not silently lose the caller's idempotency key.
        if self.id is None or self.id == "":
            object.__setattr__(self, "id", uuid.uuid4().hex)
        if (
            not isinstance(self.id, str)
            or len(self.id) > MAX_ID_LENGTH
            or not _ID_RE.fullmatch(self.id)
        ):
            raise InvalidTransaction(
                "id",
                f"must be 1-{MAX_ID_LENGTH} characters of letters, digits and '._:@-', "
                f"got {self.id!r}",
            )
        try:
            object.__setattr__(self, "protocol", Protocol(self.protocol))
        except ValueError:
            raise InvalidTransaction(
                "protocol", f"must be 'tcc' or 'saga', got {self.protocol!r}", txid=self.id
            ) from None
        if not isinstance(self.branches, tuple):
            if isinstance(self.branches, Sequence) and not isinstance(self.branches, str):
                object.__setattr__(self, "branches", tuple(self.branches))
            else:
                raise InvalidTransaction("branches", "must be a list of branches", txid=self.id)
        if not self.branches:
            raise InvalidTransaction("branches", "at least one branch is required", txid=self.id)
        if len(self.branches) > MAX_BRANCHES:
            raise InvalidTransaction(
                "branches",
                f"{len(self.branches)} branches, the limit is {MAX_BRANCHES}",
                txid=self.id,
            )
        seen: set[str] = set()
        for i, branch in enumerate(self.branches):
            if not isinstance(branch, BranchSpec):
                raise InvalidTransaction(f"branches[{i}]", "must be a BranchSpec", txid=self.id)
            branch.validate(f"branches[{i}]")
            if branch.name in seen:
                raise InvalidTransaction(
                    f"branches[{i}].name", f"duplicate branch name {branch.name!r}", txid=self.id
                )
            seen.add(branch.name)
        _finite_positive("timeout_s", self.timeout_s, MAX_DEADLINE_S)
        if not isinstance(self.sequential, bool):
            raise InvalidTransaction("sequential", "must be true or false", txid=self.id)

    @property
    def prepare_op(self) -> Op:
        return Op.TRY if self.protocol is Protocol.TCC else Op.ACTION

    @property
    def commit_op(self) -> Op | None:
        return Op.CONFIRM if self.protocol is Protocol.TCC else None

    @property
    def abort_op(self) -> Op:
        return Op.CANCEL if self.protocol is Protocol.TCC else Op.COMPENSATE

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "protocol": self.protocol.value,
            "timeout_s": self.timeout_s,
            "sequential": self.sequential,
            "branches": [b.to_dict() for b in self.branches],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransactionSpec:
        """Build a spec from its JSON form, raising InvalidTransaction on bad input."""
        if not isinstance(data, Mapping):
            raise InvalidTransaction("body", "must be a JSON object")
        unknown = set(data) - {"id", "protocol", "timeout_s", "sequential", "branches"}
        if unknown:
            raise InvalidTransaction(sorted(unknown)[0], "unknown field")
        raw_branches = data.get("branches")
        if not isinstance(raw_branches, list):
            raise InvalidTransaction("branches", "must be a list of branches")
        if len(raw_branches) > MAX_BRANCHES:
            raise InvalidTransaction(
                "branches", f"{len(raw_branches)} branches, the limit is {MAX_BRANCHES}"
            )
        branches = []
        for i, raw in enumerate(raw_branches):
            if not isinstance(raw, Mapping):
                raise InvalidTransaction(f"branches[{i}]", "must be an object")
            unknown = set(raw) - {"name", "participant", "payload", "retry", "timeout_s"}
            if unknown:
                raise InvalidTransaction(f"branches[{i}].{sorted(unknown)[0]}", "unknown field")
            retry_raw = raw.get("retry")
            if retry_raw is None:
                retry = DEFAULT_RETRY
            elif isinstance(retry_raw, Mapping):
                fields = set(RetryPolicy.__dataclass_fields__)
                unknown = set(retry_raw) - fields
                if unknown:
                    raise InvalidTransaction(
                        f"branches[{i}].retry.{sorted(unknown)[0]}", "unknown field"
                    )
                try:
                    retry = RetryPolicy(**retry_raw)
                except InvalidTransaction as exc:
                    raise InvalidTransaction(
                        f"branches[{i}].{exc.field}", str(exc).split(": ", 1)[1]
                    ) from None
            else:
                raise InvalidTransaction(f"branches[{i}].retry", "must be an object")
            branches.append(
                BranchSpec(
                    name=raw.get("name", ""),
                    participant=raw.get("participant", ""),
                    payload=raw.get("payload", {}),
                    retry=retry,
                    timeout_s=raw.get("timeout_s", 5.0),
                )
            )
        return cls(
            id=data.get("id", ""),
            protocol=data.get("protocol", ""),
            branches=tuple(branches),
            timeout_s=data.get("timeout_s", 30.0),
            sequential=data.get("sequential", False),
        )
