"""The bad-input table of TESTING.md, through the API: each case a clear 4xx whose
message names the problem (field or limit), and nothing changes (no transaction
in the log, no participant called).

Amounts live in payloads, which the coordinator carries without reading (the
participants refuse bad amounts themselves); the numbers the API does read are
the deadlines, timeouts and retry settings, and those get the zero / negative /
fractional / NaN / huge cases here. Unsigned, stale, replayed and tampered
requests to participants are the participant SDK's (tests/participant/).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from accord.server import AllowList, Limits

from .conftest import SERVICES, FakeParticipants, LiveServer, order_body, start_live_server

SHOP = "http://shop.test"
LIMITS = Limits(max_body_bytes=64 * 1024, max_branches=8, max_payload_bytes=4096, max_json_depth=16)

Body = dict[str, Any]


def edit(fn: Callable[[Body], object]) -> Callable[[], bytes | Body]:
    def make() -> Body:
        body = order_body(prefix=SHOP + "/")
        fn(body)
        return body

    return make


def branch(**changes: Any) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        body["branches"][0].update(changes)

    return apply


def retry(**changes: Any) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        body["branches"][0]["retry"].update(changes)

    return apply


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def many_branches(n: int) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        first = body["branches"][0]
        body["branches"] = [dict(copy.deepcopy(first), name=f"b{i}") for i in range(n)]

    return apply


def raw(text: bytes) -> Callable[[], bytes | Body]:
    return lambda: text


# (case id, body, headers, query, status, what the message must name)
CASES: list[tuple[str, Callable[[], bytes | Body], dict[str, str], str, int, str]] = [
    ("oversized body", edit(branch(payload={"x": "a" * 70_000})), {}, "", 413, "max_body_bytes"),
    ("too many steps (over the server limit)", edit(many_branches(9)), {}, "", 422, "max_branches"),
    ("too many steps (over the spec's 64)", edit(many_branches(65)), {}, "", 422,
     "max_branches"),
    ("deep JSON", edit(branch(payload=nested(20))), {}, "", 422, "max_json_depth"),
    ("very deep JSON", raw(
        b'{"protocol": "tcc", "branches": [{"name": "a", "participant": "http://shop.test/a",'
        b' "payload": ' + b"[" * 3000 + b"]" * 3000 + b"}]}"), {}, "", 422, "max_json_depth"),
    ("payload too large", edit(branch(payload={"x": "a" * 5000})), {}, "", 422,
     "max_payload_bytes"),
    ("malformed JSON", raw(b'{"protocol": "tcc", "branches": ['), {}, "", 400, "malformed JSON"),
    ("not an object", raw(b"[1, 2]"), {}, "", 422, "object"),
    ("empty body", raw(b""), {}, "", 400, "malformed JSON"),
    ("missing protocol", edit(lambda b: b.pop("protocol")), {}, "", 422, "protocol"),
    ("missing branches", edit(lambda b: b.pop("branches")), {}, "", 422, "branches"),
    ("no branches", edit(lambda b: b.update(branches=[])), {}, "", 422, "branches"),
    ("missing participant", edit(lambda b: b["branches"][0].pop("participant")), {}, "", 422,
     "participant"),
    ("malformed field type", edit(lambda b: b.update(timeout_s="30")), {}, "", 422, "timeout_s"),
    ("unknown field", edit(lambda b: b.update(amount=5)), {}, "", 422, "amount"),
    ("unknown protocol", edit(lambda b: b.update(protocol="2pc")), {}, "", 422, "protocol"),
    ("duplicate step names", edit(lambda b: b["branches"][1].update(name="order")), {}, "", 422,
     "duplicate branch name"),
    ("bad step name", edit(branch(name="no spaces")), {}, "", 422, "branches[0].name"),
    ("deadline zero", edit(lambda b: b.update(timeout_s=0)), {}, "", 422, "timeout_s"),
    ("deadline negative", edit(lambda b: b.update(timeout_s=-5)), {}, "", 422, "timeout_s"),
    ("deadline huge", edit(lambda b: b.update(timeout_s=1e12)), {}, "", 422, "timeout_s"),
    ("deadline NaN", raw(b'{"protocol": "tcc", "timeout_s": NaN, "branches": []}'), {}, "", 400,
     "malformed JSON"),
    ("deadline out of float range", raw(b'{"protocol": "tcc", "timeout_s": 1e400, "branches": []}'),
     {}, "", 422, "timeout_s"),
    ("call timeout zero", edit(branch(timeout_s=0)), {}, "", 422, "branches[0].timeout_s"),
    ("attempts fractional", edit(retry(maximum_attempts=2.5)), {}, "", 422,
     "branches[0].retry.maximum_attempts"),
    ("attempts zero", edit(retry(maximum_attempts=0)), {}, "", 422, "maximum_attempts"),
    ("attempts negative", edit(retry(maximum_attempts=-1)), {}, "", 422, "maximum_attempts"),
    ("attempts huge", edit(retry(maximum_attempts=10**9)), {}, "", 422, "maximum_attempts"),
    ("retry interval order", edit(retry(initial_interval_s=2, maximum_interval_s=1)), {}, "", 422,
     "maximum_interval_s"),
    ("payload number out of range", raw(
        b'{"protocol": "tcc", "branches": [{"name": "a", "participant": "http://shop.test/a",'
        b' "payload": {"amount": 1e400}}]}'), {}, "", 422, "branches[0].payload"),
    ("participant scheme ftp", edit(branch(participant="ftp://shop.test/order")), {}, "", 422,
     "http or https"),
    ("participant scheme file", edit(branch(participant="file:///etc/passwd")), {}, "", 422,
     "branches[0].participant"),
    ("participant host not allowed", edit(branch(participant="http://evil.test/order")), {}, "",
     422, "allow-list"),
    ("participant port not allowed", edit(branch(participant="http://shop.test:8080/order")), {},
     "", 422, "allow-list"),
    ("participant with credentials", edit(branch(participant="http://u:p@shop.test/order")), {},
     "", 422, "credentials"),
    ("participant with a query", edit(branch(participant="http://shop.test/order?x=1")), {}, "",
     422, "query"),
    ("participant by bare name", edit(branch(participant="order")), {}, "", 422,
     "branches[0].participant"),
    ("malformed id", edit(lambda b: b.update(id="bad id!")), {}, "", 422, "id"),
    ("malformed Idempotency-Key", edit(lambda b: None), {"idempotency-key": "bad key!"}, "", 422,
     "Idempotency-Key"),
    ("id and Idempotency-Key differ", edit(lambda b: b.update(id="a-1")),
     {"idempotency-key": "a-2"}, "", 422, "Idempotency-Key"),
    ("wait_s negative", edit(lambda b: None), {}, "?wait=true&wait_s=-1", 400, "wait_s"),
    ("wait_s over the limit", edit(lambda b: None), {}, "?wait=true&wait_s=3600", 400,
     "max_wait_s"),
    ("wait not a boolean", edit(lambda b: None), {}, "?wait=maybe", 400, "wait"),
    ("unknown query parameter", edit(lambda b: None), {}, "?wiat=true", 400, "wiat"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    participants = FakeParticipants(tuple(f"{SHOP}/{s}" for s in SERVICES))
    with start_live_server(
        participants=participants, limits=LIMITS, allow=AllowList([SHOP])
    ) as live:
        yield live


@pytest.mark.parametrize(
    ("body", "headers", "query", "status", "names"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input_is_refused_by_name_and_changes_nothing(
    server: LiveServer,
    body: Callable[[], bytes | Body],
    headers: dict[str, str],
    query: str,
    status: int,
    names: str,
) -> None:
    """Each bad submit: the documented 4xx, a JSON error naming the problem, no transaction."""
    made = body()
    kwargs: dict[str, Any] = {"content": made} if isinstance(made, bytes) else {"json": made}
    r = httpx.post(
        f"{server.url}/v1/transactions{query}",
        headers={**server.headers, **headers, "content-type": "application/json"},
        **kwargs,
    )
    assert r.status_code == status, r.text
    error = r.json()
    assert names in error["error"] or names in (error["field"] or "") + (error["limit"] or ""), (
        error
    )
    assert names in error["error"], error  # the message itself names it
    assert server.run(server.store.list()) == []
    assert server.coordinator.metrics.started == 0
    assert server.participants.calls == []


def test_a_valid_body_is_accepted_by_the_same_server(server: LiveServer) -> None:
    """The control: the table's base body, unedited, is accepted and commits."""
    r = httpx.post(
        f"{server.url}/v1/transactions?wait=true",
        json=order_body("control-1", prefix=SHOP + "/"),
        headers=server.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "committed"
