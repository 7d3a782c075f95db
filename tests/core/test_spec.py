"""Validation, backoff and serialisation of transaction specs."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from accord.core.spec import (
    MAX_ATTEMPTS,
    MAX_BRANCHES,
    MAX_ID_LENGTH,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_DEPTH,
    BranchSpec,
    Op,
    Protocol,
    RetryPolicy,
    TransactionSpec,
)
from accord.errors import AccordError, InvalidTransaction


def branch(name: str = "b0", **kw: Any) -> BranchSpec:
    kw.setdefault("participant", "p")
    return BranchSpec(name=name, **kw)


def spec(*branches: BranchSpec, **kw: Any) -> TransactionSpec:
    kw.setdefault("protocol", "tcc")
    return TransactionSpec(branches=branches or (branch(),), **kw)


def field_of(call: Any) -> str:
    with pytest.raises(InvalidTransaction) as info:
        call()
    assert str(info.value).startswith(f"{info.value.field}: ")
    return info.value.field


def nested(depth: int) -> Any:
    """``depth`` lists, one inside the other."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def body(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "protocol": "tcc",
        "branches": [{"name": "a", "participant": "p"}, {"name": "b", "participant": "q"}],
    }
    data.update(over)
    return data


# ------------------------------------------------------------------ TransactionSpec


def test_invalid_transaction_is_a_value_error_and_an_accord_error() -> None:
    """InvalidTransaction can be caught as ValueError or as the package's root error."""
    with pytest.raises(InvalidTransaction) as info:
        spec(protocol="xa")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AccordError)
    assert info.value.retryable is False


def test_no_branches_is_refused() -> None:
    """A transaction needs at least one branch."""
    assert field_of(lambda: TransactionSpec(protocol=Protocol.TCC, branches=())) == "branches"


def test_more_than_the_branch_limit_is_refused_and_the_limit_itself_accepted() -> None:
    """64 branches are accepted, 65 are refused naming the field and the limit."""
    ok = tuple(branch(f"b{i}") for i in range(MAX_BRANCHES))
    assert len(spec(*ok).branches) == MAX_BRANCHES
    too_many = (*ok, branch("extra"))
    with pytest.raises(InvalidTransaction, match=f"limit is {MAX_BRANCHES}") as info:
        spec(*too_many)
    assert info.value.field == "branches"


def test_branches_must_be_a_sequence_of_branch_specs() -> None:
    """A list is accepted (and stored as a tuple); a string or a non-branch is refused."""
    assert isinstance(TransactionSpec(protocol="tcc", branches=[branch()]).branches, tuple)  # type: ignore[arg-type]
    assert field_of(lambda: TransactionSpec(protocol="tcc", branches="ab")) == "branches"  # type: ignore[arg-type]
    assert field_of(lambda: spec(branch("a"), {"name": "b"})) == "branches[1]"  # type: ignore[arg-type]


def test_duplicate_branch_names_are_refused_naming_the_second() -> None:
    """Two branches with one name are refused at the index of the repeat."""
    with pytest.raises(InvalidTransaction, match="duplicate") as info:
        spec(branch("a"), branch("b"), branch("a"), id="t-1")
    assert info.value.field == "branches[2].name"
    assert info.value.txid == "t-1"


@pytest.mark.parametrize(
    "name", ["", "-a", ".a", "a b", "a/b", "é", "x" * 65, "a\n", None, 7], ids=repr
)
def test_bad_branch_names_are_refused(name: Any) -> None:
    """Branch names are 1-64 letters, digits, '.', '_' or '-', starting alphanumeric."""
    assert field_of(lambda: spec(branch(name))) == "branches[0].name"


def test_longest_branch_name_is_accepted() -> None:
    """A 64-character name is within the limit."""
    assert spec(branch("n" * 64)).branches[0].name == "n" * 64


@pytest.mark.parametrize("participant", ["", None, 3, "p" * 2049], ids=repr)
def test_bad_participants_are_refused(participant: Any) -> None:
    """A participant is a non-empty string of at most 2048 characters."""
    assert field_of(lambda: spec(branch(participant=participant))) == "branches[0].participant"


def test_retry_must_be_a_retry_policy() -> None:
    """A branch's retry given as a dict (not a RetryPolicy) is refused."""
    assert field_of(lambda: spec(branch(retry={"maximum_attempts": 3}))) == "branches[0].retry"


def test_payload_at_the_size_limit_is_accepted_and_one_byte_more_refused() -> None:
    """The encoded payload may be exactly 64 KiB; one byte more is refused with the sizes."""
    at_limit = "x" * (MAX_PAYLOAD_BYTES - 2)  # two bytes of quotes
    assert spec(branch(payload=at_limit)).branches[0].payload == at_limit
    with pytest.raises(InvalidTransaction, match=f"{MAX_PAYLOAD_BYTES + 1} bytes") as info:
        spec(branch("a"), branch("b", payload=at_limit + "x"))
    assert info.value.field == "branches[1].payload"


@pytest.mark.parametrize(
    "payload",
    [
        object(),
        {"amount": float("nan")},
        {"amount": float("inf")},
        [float("-inf")],
        {1: "integer key"},
        {("a", "b"): 1},
        nested(MAX_PAYLOAD_DEPTH + 1),
        nested(5000),
    ],
    ids=["object", "nan", "inf", "-inf", "int-key", "tuple-key", "too-deep", "recursion-deep"],
)
def test_payloads_that_are_not_plain_json_are_refused(payload: Any) -> None:
    """A payload that JSON cannot carry unchanged through the log is refused, never crashes."""
    assert field_of(lambda: spec(branch(payload=payload))) == "branches[0].payload"


def test_payload_at_the_depth_limit_is_accepted() -> None:
    """Nesting up to the depth limit is fine."""
    assert spec(branch(payload=nested(MAX_PAYLOAD_DEPTH))).branches[0].payload is not None


@pytest.mark.parametrize(
    "timeout", [0, -1, -0.0, float("nan"), float("inf"), True, "5", None, 3600.5], ids=repr
)
def test_bad_branch_timeouts_are_refused(timeout: Any) -> None:
    """A branch timeout is a positive finite number of seconds, at most an hour, not a bool."""
    assert field_of(lambda: spec(branch(timeout_s=timeout))) == "branches[0].timeout_s"


@pytest.mark.parametrize(
    "timeout", [0, -5, float("nan"), float("-inf"), float("inf"), False, "30", 7 * 86400 + 1]
)
def test_bad_transaction_timeouts_are_refused(timeout: Any) -> None:
    """The deadline is a positive finite number of seconds, at most a week, not a bool."""
    assert field_of(lambda: spec(timeout_s=timeout)) == "timeout_s"


@pytest.mark.parametrize("protocol", ["xa", "TCC", "", None, 1], ids=repr)
def test_bad_protocols_are_refused(protocol: Any) -> None:
    """Only 'tcc' and 'saga' are protocols."""
    assert field_of(lambda: spec(protocol=protocol)) == "protocol"


def test_protocol_given_as_text_becomes_the_enum() -> None:
    """'saga' is stored as Protocol.SAGA, with the saga's operations."""
    s = spec(protocol="saga")
    assert s.protocol is Protocol.SAGA
    assert (s.prepare_op, s.commit_op, s.abort_op) == (Op.ACTION, None, Op.COMPENSATE)
    t = spec()
    assert (t.prepare_op, t.commit_op, t.abort_op) == (Op.TRY, Op.CONFIRM, Op.CANCEL)


@pytest.mark.parametrize(
    "txid",
    ["has space", "-lead", "a/b", "a\n", "x" * (MAX_ID_LENGTH + 1), 0, False, [], 12, "é"],
    ids=repr,
)
def test_bad_ids_are_refused(txid: Any) -> None:
    """Ids are up to 128 of letters, digits and '._:@-'; 0 or False is not 'no id'."""
    assert field_of(lambda: spec(id=txid)) == "id"


def test_missing_id_is_generated_and_a_given_one_kept() -> None:
    """An empty (or null) id gets a fresh random one; a valid one is kept as is."""
    a, b = spec(id=""), spec(id=None)  # type: ignore[arg-type]
    assert len(a.id) == 32 and a.id != b.id
    longest = "a" * MAX_ID_LENGTH
    assert spec(id=longest).id == longest
    assert spec(id="order-1:x@y.z_2").id == "order-1:x@y.z_2"


def test_sequential_must_be_a_bool() -> None:
    """sequential='yes' is refused rather than taken as true."""
    assert field_of(lambda: spec(sequential="yes")) == "sequential"


# ------------------------------------------------------------------ RetryPolicy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial_interval_s": 0}, "retry.initial_interval_s"),
        ({"initial_interval_s": -1.0}, "retry.initial_interval_s"),
        ({"initial_interval_s": float("nan")}, "retry.initial_interval_s"),
        ({"initial_interval_s": True}, "retry.initial_interval_s"),
        ({"initial_interval_s": 3601, "maximum_interval_s": 3601}, "retry.initial_interval_s"),
        ({"maximum_interval_s": float("inf")}, "retry.maximum_interval_s"),
        ({"initial_interval_s": 1.0, "maximum_interval_s": 0.5}, "retry.maximum_interval_s"),
        ({"backoff_coefficient": 0.5}, "retry.backoff_coefficient"),
        ({"backoff_coefficient": 0}, "retry.backoff_coefficient"),
        ({"backoff_coefficient": 101}, "retry.backoff_coefficient"),
        ({"backoff_coefficient": float("nan")}, "retry.backoff_coefficient"),
        ({"maximum_attempts": 0}, "retry.maximum_attempts"),
        ({"maximum_attempts": MAX_ATTEMPTS + 1}, "retry.maximum_attempts"),
        ({"maximum_attempts": 2.0}, "retry.maximum_attempts"),
        ({"maximum_attempts": True}, "retry.maximum_attempts"),
        ({"maximum_attempts": "3"}, "retry.maximum_attempts"),
        ({"jitter": "no"}, "retry.jitter"),
        ({"jitter": 0}, "retry.jitter"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_retry_policy_rules(kwargs: dict[str, Any], field: str) -> None:
    """Each retry policy rule raises naming its field."""
    assert field_of(lambda: RetryPolicy(**kwargs)) == field


def test_retry_policy_limits_themselves_are_accepted() -> None:
    """The boundary values of every retry limit are valid."""
    p = RetryPolicy(
        initial_interval_s=3600,
        maximum_interval_s=3600,
        backoff_coefficient=100,
        maximum_attempts=MAX_ATTEMPTS,
        jitter=False,
    )
    assert RetryPolicy(backoff_coefficient=1, maximum_attempts=1).maximum_attempts == 1
    assert p.delay_s(1, 0.0) == 3600


def test_delay_without_jitter_is_capped_exponential() -> None:
    """Without jitter the delays are 0.05, 0.1, 0.2, ... doubling up to the 2 s cap."""
    p = RetryPolicy(jitter=False)
    got = [p.delay_s(n, 0.0) for n in range(10)]
    assert got == pytest.approx([0.05, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


@given(
    failed=st.integers(0, 20_000),
    sample=st.floats(0.0, 1.0, exclude_max=True),
    initial=st.floats(0.001, 10.0),
    coefficient=st.floats(1.0, 100.0),
    extra=st.floats(0.0, 100.0),
)
def test_full_jitter_stays_within_zero_and_the_cap(
    failed: int, sample: float, initial: float, coefficient: float, extra: float
) -> None:
    """With jitter the delay is sample * cap, inside [0, cap] and never above maximum_interval."""
    p = RetryPolicy(
        initial_interval_s=initial,
        backoff_coefficient=coefficient,
        maximum_interval_s=initial + extra,
    )
    cap = RetryPolicy(
        initial_interval_s=initial,
        backoff_coefficient=coefficient,
        maximum_interval_s=initial + extra,
        jitter=False,
    ).delay_s(failed, sample)
    delay = p.delay_s(failed, sample)
    assert 0.0 <= delay <= cap <= p.maximum_interval_s
    assert delay == pytest.approx(cap * sample)
    assert cap >= min(initial, p.maximum_interval_s)


def test_delay_does_not_overflow_at_huge_attempt_counts() -> None:
    """Attempt 10,000 with the steepest backoff gives the cap, not an OverflowError."""
    p = RetryPolicy(backoff_coefficient=100, maximum_interval_s=60, jitter=False)
    assert p.delay_s(10_000, 0.5) == 60
    assert math.isfinite(RetryPolicy(backoff_coefficient=100).delay_s(10_000, 0.999))


def test_delay_caps_grow_monotonically() -> None:
    """Without jitter a later attempt never waits less than an earlier one."""
    p = RetryPolicy(
        initial_interval_s=0.01, backoff_coefficient=1.7, maximum_interval_s=30, jitter=False
    )
    caps = [p.delay_s(n, 0.0) for n in range(200)]
    assert caps == sorted(caps)


# ------------------------------------------------------------------ from_dict


def test_from_dict_builds_an_equal_spec() -> None:
    """A JSON body with every field set gives the spec it describes."""
    s = TransactionSpec.from_dict(
        {
            "id": "order-7",
            "protocol": "saga",
            "timeout_s": 12.5,
            "sequential": False,
            "branches": [
                {
                    "name": "pay",
                    "participant": "http://pay",
                    "payload": {"amount": 42},
                    "timeout_s": 2,
                    "retry": {"maximum_attempts": 3, "jitter": False},
                }
            ],
        }
    )
    assert s == TransactionSpec(
        id="order-7",
        protocol=Protocol.SAGA,
        timeout_s=12.5,
        branches=(
            BranchSpec(
                "pay",
                "http://pay",
                {"amount": 42},
                RetryPolicy(maximum_attempts=3, jitter=False),
                2,
            ),
        ),
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "body"),
        ("tcc", "body"),
        (body(colour="red"), "colour"),
        (body(branches=None), "branches"),
        ({"protocol": "tcc"}, "branches"),
        (body(branches={"name": "a"}), "branches"),
        (body(branches=[{"name": "a", "participant": "p"}] * 65), "branches"),
        (body(branches=["a"]), "branches[0]"),
        (body(branches=[{"name": "a", "participant": "p", "colour": 1}]), "branches[0].colour"),
        (body(branches=[{"name": "a", "participant": "p", "retry": 3}]), "branches[0].retry"),
        (
            body(branches=[{"name": "a", "participant": "p", "retry": {"max_attempts": 3}}]),
            "branches[0].retry.max_attempts",
        ),
        (
            body(
                branches=[
                    {"name": "a", "participant": "p"},
                    {"name": "b", "participant": "p", "retry": {"maximum_attempts": 0}},
                ]
            ),
            "branches[1].retry.maximum_attempts",
        ),
        (
            body(
                branches=[
                    {"name": "a", "participant": "p"},
                    {"name": "b", "participant": "p", "retry": {"jitter": "off"}},
                ]
            ),
            "branches[1].retry.jitter",
        ),
        (body(branches=[{"participant": "p"}]), "branches[0].name"),
        (body(branches=[{"name": "a"}]), "branches[0].participant"),
        (
            body(branches=[{"name": "a", "participant": "p", "timeout_s": "1"}]),
            "branches[0].timeout_s",
        ),
        (body(protocol="2pc"), "protocol"),
        (body(protocol=None), "protocol"),
        (body(id=0), "id"),
        (body(id="a b"), "id"),
        (body(timeout_s=-1), "timeout_s"),
        (body(sequential=1), "sequential"),
    ],
    ids=lambda v: None if isinstance(v, str) else "",
)
def test_from_dict_names_the_offending_field(data: Any, field: str) -> None:
    """Every bad body raises InvalidTransaction naming the field, nested ones by full path."""
    assert field_of(lambda: TransactionSpec.from_dict(data)) == field


def test_from_dict_defaults() -> None:
    """Omitted fields take their defaults: generated id, 30 s deadline, default retry."""
    s = TransactionSpec.from_dict(body())
    assert len(s.id) == 32
    assert s.timeout_s == 30.0 and s.sequential is False
    assert s.branches[0].retry == RetryPolicy() and s.branches[0].payload == {}
    assert s.branches[0].timeout_s == 5.0


# ------------------------------------------------------------------ round trip

_NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}\Z")
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def retry_policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(st.floats(0.001, 10.0))
    return RetryPolicy(
        initial_interval_s=initial,
        backoff_coefficient=draw(st.floats(1.0, 100.0)),
        maximum_interval_s=draw(st.floats(initial, 3600.0)),
        maximum_attempts=draw(st.integers(1, MAX_ATTEMPTS)),
        jitter=draw(st.booleans()),
    )


@st.composite
def specs(draw: st.DrawFn) -> TransactionSpec:
    names = draw(st.lists(_NAME, min_size=1, max_size=6, unique=True))
    branches = tuple(
        BranchSpec(
            name=name,
            participant=draw(st.text(min_size=1, max_size=30)),
            payload=draw(_JSON),
            retry=draw(retry_policies()),
            timeout_s=draw(st.floats(0.001, 3600.0)),
        )
        for name in names
    )
    return TransactionSpec(
        protocol=draw(st.sampled_from(Protocol)),
        branches=branches,
        id=draw(_ID),
        timeout_s=draw(st.floats(0.001, 7 * 86400.0)),
        sequential=draw(st.booleans()),
    )


@given(specs())
def test_to_dict_from_dict_round_trip(s: TransactionSpec) -> None:
    """from_dict(to_dict(spec)) == spec, also through JSON bytes (what the log stores)."""
    assert TransactionSpec.from_dict(s.to_dict()) == s
    wire = msgspec.json.decode(msgspec.json.encode(s.to_dict()))
    assert TransactionSpec.from_dict(wire) == s
