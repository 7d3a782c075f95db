"""The simulated services: idempotent operations, barrier, refusals, bad payloads, restore."""

from __future__ import annotations

import asyncio
import copy
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.sim.services import (
    APPLIED,
    BLOCKED,
    NULL,
    REFUSED,
    REJECTED,
    RULES,
    Counters,
    Service,
    ServiceStore,
)
from accord.transport.base import Call, Reply

# ---------------------------------------------------------------- fixtures and helpers

INITIAL: dict[str, Counters] = {
    "order": {},
    "inventory": {"sku:a": [5, 0, 0], "sku:b": [10, 0, 0]},
    "payment": {"account:c": [100, 0], "account:d": [20, 0], "revenue": [0]},
    "shipping": {"slot:d0": [2, 0, 0], "slot:d1": [5, 0, 0]},
}

PAYLOAD: dict[str, dict[str, Any]] = {
    "order": {"order_id": "o1", "customer": "c", "amount": 30},
    "inventory": {"items": [["a", 2]]},
    "payment": {"account": "c", "amount": 30},
    "shipping": {"slot": "d0", "order_id": "o1"},
}

SERVICES = tuple(INITIAL)
STORAGE = ("memory", "sqlite")

Make = Callable[[str], Awaitable[Service]]


async def deliver(svc: Service, txid: str, op: Op, payload: Any, branch: str = "") -> Reply:
    """Deliver one call the way the transport does, waiting for durability."""
    call = Call(txid, branch or svc.name, op, svc.name, payload, 1, 1.0)
    started = svc.handle(call)
    if isinstance(started, Reply):
        return started
    return await started


@pytest.fixture(params=STORAGE)
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Build a service of a given name, in memory or on its own SQLite file."""
    made: list[Service] = []

    async def build(name: str, initial: Counters | None = None) -> Service:
        init = copy.deepcopy(INITIAL[name] if initial is None else initial)
        store = None
        if request.param == "sqlite":
            store = ServiceStore(tmp_path / f"{name}-{len(made)}.db")
            store.create(init)
            store.start(asyncio.get_running_loop())
        svc = Service(RULES[name](), init, store=store)
        made.append(svc)
        return svc

    yield build
    for svc in made:
        await svc.close()


def snapshot(svc: Service) -> tuple[Counters, int]:
    return copy.deepcopy(svc.counters), len(svc.ledger)


def applied_keys(svc: Service) -> Counter[tuple[str, str, str]]:
    return Counter((e.txid, e.branch, str(e.op)) for e in svc.ledger if e.kind == APPLIED)


# ---------------------------------------------------------------- run it twice, one effect

# (service, ops delivered in order; the last one is delivered twice) -> expected counters
EXPECTED: dict[tuple[str, tuple[Op, ...]], Counters] = {
    ("order", (Op.TRY,)): {"order:o1": [1, 0, 0]},
    ("order", (Op.TRY, Op.CONFIRM)): {"order:o1": [0, 1, 0]},
    ("order", (Op.TRY, Op.CANCEL)): {"order:o1": [0, 0, 1]},
    ("order", (Op.ACTION,)): {"order:o1": [0, 1, 0]},
    ("order", (Op.ACTION, Op.COMPENSATE)): {"order:o1": [0, 0, 1]},
    ("inventory", (Op.TRY,)): {"sku:a": [3, 2, 0], "sku:b": [10, 0, 0]},
    ("inventory", (Op.TRY, Op.CONFIRM)): {"sku:a": [3, 0, 2], "sku:b": [10, 0, 0]},
    ("inventory", (Op.TRY, Op.CANCEL)): {"sku:a": [5, 0, 0], "sku:b": [10, 0, 0]},
    ("inventory", (Op.ACTION,)): {"sku:a": [3, 0, 2], "sku:b": [10, 0, 0]},
    ("inventory", (Op.ACTION, Op.COMPENSATE)): {"sku:a": [5, 0, 0], "sku:b": [10, 0, 0]},
    ("payment", (Op.TRY,)): {"account:c": [70, 30], "account:d": [20, 0], "revenue": [0]},
    ("payment", (Op.TRY, Op.CONFIRM)): {
        "account:c": [70, 0],
        "account:d": [20, 0],
        "revenue": [30],
    },
    ("payment", (Op.TRY, Op.CANCEL)): {"account:c": [100, 0], "account:d": [20, 0], "revenue": [0]},
    ("payment", (Op.ACTION,)): {"account:c": [70, 0], "account:d": [20, 0], "revenue": [30]},
    ("payment", (Op.ACTION, Op.COMPENSATE)): {
        "account:c": [100, 0],
        "account:d": [20, 0],
        "revenue": [0],
    },
    ("shipping", (Op.TRY,)): {"slot:d0": [2, 1, 0], "slot:d1": [5, 0, 0]},
    ("shipping", (Op.TRY, Op.CONFIRM)): {"slot:d0": [2, 0, 1], "slot:d1": [5, 0, 0]},
    ("shipping", (Op.TRY, Op.CANCEL)): {"slot:d0": [2, 0, 0], "slot:d1": [5, 0, 0]},
    ("shipping", (Op.ACTION,)): {"slot:d0": [2, 0, 1], "slot:d1": [5, 0, 0]},
    ("shipping", (Op.ACTION, Op.COMPENSATE)): {"slot:d0": [2, 0, 0], "slot:d1": [5, 0, 0]},
}


@pytest.mark.parametrize(
    ("name", "ops"), list(EXPECTED), ids=[f"{n}-{'-'.join(o)}" for n, o in EXPECTED]
)
async def test_operation_delivered_twice_has_one_effect(
    make: Make, name: str, ops: tuple[Op, ...]
) -> None:
    """Each operation of each service, delivered twice, applies once and answers the same."""
    svc = await make(name)
    for op in ops[:-1]:
        assert (await deliver(svc, "t1", op, PAYLOAD[name])).outcome is Outcome.OK
    before, _ = snapshot(svc)
    first = await deliver(svc, "t1", ops[-1], PAYLOAD[name])
    after_first, ledger_len = snapshot(svc)
    second = await deliver(svc, "t1", ops[-1], PAYLOAD[name])
    assert first.outcome is Outcome.OK
    assert second == first
    assert after_first != before  # the first delivery did something
    assert svc.counters == EXPECTED[name, ops]
    assert len(svc.ledger) == ledger_len  # the duplicate is not even recorded
    assert svc.duplicates == 1
    assert all(n == 1 for n in applied_keys(svc).values())


# ---------------------------------------------------------------- barrier: null compensation


@pytest.mark.parametrize("name", SERVICES)
@pytest.mark.parametrize(("undo", "forward"), [(Op.CANCEL, Op.TRY), (Op.COMPENSATE, Op.ACTION)])
async def test_undo_before_forward_is_null_and_blocks_it(
    make: Make, name: str, undo: Op, forward: Op
) -> None:
    """A cancel/compensate before its try/action is an OK no-op, and the later try never applies."""
    svc = await make(name)
    initial = copy.deepcopy(svc.counters)
    reply = await deliver(svc, "t1", undo, PAYLOAD[name])
    assert reply.outcome is Outcome.OK
    assert svc.counters == initial
    late = await deliver(svc, "t1", forward, PAYLOAD[name])
    assert late.outcome is Outcome.REFUSED
    assert str(undo) in late.error
    assert svc.counters == initial
    # Again, and once more after other traffic: still barred, still nothing applied.
    await deliver(svc, "t2", forward, PAYLOAD[name])
    assert (await deliver(svc, "t1", forward, PAYLOAD[name])) == late
    assert (await deliver(svc, "t1", undo, PAYLOAD[name])) == reply
    kinds = {(e.txid, str(e.op)): e.kind for e in svc.ledger}
    assert kinds[("t1", str(forward))] == BLOCKED
    assert kinds[("t1", str(undo))] == NULL
    assert ("t1", name, str(forward)) not in applied_keys(svc)
    if forward is Op.TRY:
        confirm = await deliver(svc, "t1", Op.CONFIRM, PAYLOAD[name])
        assert confirm.outcome is Outcome.REJECTED


@pytest.mark.parametrize("name", SERVICES)
async def test_confirm_without_try_is_rejected(make: Make, name: str) -> None:
    """A confirm whose try never applied is rejected and changes nothing."""
    svc = await make(name)
    initial = copy.deepcopy(svc.counters)
    reply = await deliver(svc, "t1", Op.CONFIRM, PAYLOAD[name])
    assert reply.outcome is Outcome.REJECTED
    assert "without an applied try" in reply.error
    assert svc.counters == initial
    assert not applied_keys(svc)


@pytest.mark.parametrize("name", SERVICES)
async def test_confirm_after_cancel_is_rejected(make: Make, name: str) -> None:
    """try, cancel, confirm: the confirm is rejected and the cancel's state stands."""
    svc = await make(name)
    await deliver(svc, "t1", Op.TRY, PAYLOAD[name])
    await deliver(svc, "t1", Op.CANCEL, PAYLOAD[name])
    cancelled = copy.deepcopy(svc.counters)
    reply = await deliver(svc, "t1", Op.CONFIRM, PAYLOAD[name])
    assert reply.outcome is Outcome.REJECTED
    assert "after cancel" in reply.error
    assert svc.counters == cancelled


@pytest.mark.parametrize("name", SERVICES)
async def test_cancel_after_confirm_does_not_apply(make: Make, name: str) -> None:
    """try, confirm, cancel: the cancel must not undo a confirmed branch (never both apply)."""
    svc = await make(name)
    await deliver(svc, "t1", Op.TRY, PAYLOAD[name])
    await deliver(svc, "t1", Op.CONFIRM, PAYLOAD[name])
    confirmed = copy.deepcopy(svc.counters)
    await deliver(svc, "t1", Op.CANCEL, PAYLOAD[name])
    assert svc.counters == confirmed
    assert applied_keys(svc)[("t1", name, "cancel")] == 0


# ---------------------------------------------------------------- business refusals

# (service, payload of the refused request, words of the refusal)
REFUSALS = [
    ("inventory", {"items": [["a", 6]]}, "out of stock"),
    ("inventory", {"items": [["b", 3], ["a", 3], ["a", 3]]}, "out of stock"),
    ("payment", {"account": "c", "amount": 101}, "insufficient funds"),
    ("payment", {"account": "d", "amount": 21}, "insufficient funds"),
]


@pytest.mark.parametrize(("name", "payload", "words"), REFUSALS)
@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_refusal_leaves_state_unchanged(
    make: Make, name: str, payload: dict[str, Any], words: str, forward: Op
) -> None:
    """Short stock or funds: refused with the reason, nothing changes, the cancel is a no-op."""
    svc = await make(name)
    initial = copy.deepcopy(svc.counters)
    reply = await deliver(svc, "t1", forward, payload)
    assert reply.outcome is Outcome.REFUSED
    assert words in reply.error
    assert svc.counters == initial
    assert svc.ledger[-1].kind == REFUSED
    undo = Op.CANCEL if forward is Op.TRY else Op.COMPENSATE
    assert (await deliver(svc, "t1", undo, payload)).outcome is Outcome.OK
    assert svc.counters == initial


@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_full_slot_is_refused(make: Make, forward: Op) -> None:
    """A shipping slot at capacity refuses the next reservation and stays at capacity."""
    svc = await make("shipping")
    for txid in ("t1", "t2"):
        assert (await deliver(svc, txid, forward, PAYLOAD["shipping"])).outcome is Outcome.OK
    full = copy.deepcopy(svc.counters)
    reply = await deliver(svc, "t3", forward, PAYLOAD["shipping"])
    assert reply.outcome is Outcome.REFUSED
    assert "d0 is full" in reply.error
    assert svc.counters == full
    cap, reserved, scheduled = svc.counters["slot:d0"]
    assert reserved + scheduled == cap


# service, payload taking everything, payload of the refused order, op to free the first
DUP_REFUSALS = [
    ("inventory", {"items": [["a", 4]]}, {"items": [["a", 2]]}),
    ("payment", {"account": "c", "amount": 90}, {"account": "c", "amount": 20}),
    ("shipping", {"slot": "d0"}, {"slot": "d0"}),
]


@pytest.mark.parametrize(("name", "hog", "refused"), DUP_REFUSALS)
@pytest.mark.parametrize(("forward", "undo"), [(Op.TRY, Op.CANCEL), (Op.ACTION, Op.COMPENSATE)])
async def test_duplicate_of_refused_try_stays_refused_after_stock_frees(
    make: Make,
    name: str,
    hog: dict[str, Any],
    refused: dict[str, Any],
    forward: Op,
    undo: Op,
) -> None:
    """A refused try delivered again after capacity frees up returns the same refusal, no effect."""
    svc = await make(name)
    hogs = ["h1", "h2"] if name == "shipping" else ["h1"]
    for txid in hogs:
        assert (await deliver(svc, txid, forward, hog)).outcome is Outcome.OK
    first = await deliver(svc, "t1", forward, refused)
    assert first.outcome is Outcome.REFUSED
    for txid in hogs:
        assert (await deliver(svc, txid, undo, hog)).outcome is Outcome.OK
    freed = copy.deepcopy(svc.counters)
    assert freed == INITIAL[name]  # capacity is back
    again = await deliver(svc, "t1", forward, refused)
    assert again == first
    assert svc.counters == freed
    # A new transaction with the same request is not refused: the refusal was per key.
    assert (await deliver(svc, "t2", forward, refused)).outcome is Outcome.OK


# ---------------------------------------------------------------- malformed payloads

# (service, payload, words the rejection must contain)
MALFORMED = [
    ("order", {}, "payload.order_id"),
    ("order", {"order_id": 7}, "payload.order_id"),
    ("order", None, "payload.order_id"),
    ("inventory", {}, "payload.items"),
    ("inventory", {"items": []}, "payload.items"),
    ("inventory", {"items": "a"}, "payload.items"),
    ("inventory", {"items": [["a"]]}, "payload.items"),
    ("inventory", {"items": [["a", 0]]}, "payload.items"),
    ("inventory", {"items": [["a", -1]]}, "payload.items"),
    ("inventory", {"items": [["a", 1.5]]}, "payload.items"),
    ("inventory", {"items": [["a", True]]}, "payload.items"),
    ("inventory", {"items": [["a", "2"]]}, "payload.items"),
    ("inventory", {"items": [["a", 10**13]]}, "payload.items"),
    ("inventory", {"items": [[3, 1]]}, "payload.items"),
    ("inventory", {"items": [["a", 1]] * 17}, "payload.items"),
    ("inventory", {"items": [["nope", 1]]}, "sku:nope"),
    ("payment", {"account": "c"}, "payload.amount"),
    ("payment", {"account": "c", "amount": 0}, "payload.amount"),
    ("payment", {"account": "c", "amount": -5}, "payload.amount"),
    ("payment", {"account": "c", "amount": 2.5}, "payload.amount"),
    ("payment", {"account": "c", "amount": True}, "payload.amount"),
    ("payment", {"account": "c", "amount": "30"}, "payload.amount"),
    ("payment", {"account": "c", "amount": 10**13}, "payload.amount"),
    ("payment", {"amount": 30}, "payload.account"),
    ("payment", {"account": 5, "amount": 30}, "payload.account"),
    ("payment", {"account": "ghost", "amount": 30}, "account:ghost"),
    ("shipping", {}, "payload.slot"),
    ("shipping", {"slot": 3}, "payload.slot"),
    ("shipping", {"slot": "nope"}, "slot:nope"),
]


@pytest.mark.parametrize(("name", "payload", "words"), MALFORMED)
@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_malformed_payload_is_rejected_naming_the_field(
    make: Make, name: str, payload: Any, words: str, forward: Op
) -> None:
    """A malformed request is REJECTED with a message naming the field, and changes nothing."""
    svc = await make(name)
    initial = copy.deepcopy(svc.counters)
    reply = await deliver(svc, "t1", forward, payload)
    assert reply.outcome is Outcome.REJECTED
    assert words in reply.error
    assert svc.counters == initial
    assert svc.ledger[-1].kind == REJECTED
    assert (await deliver(svc, "t1", forward, payload)) == reply


@pytest.mark.parametrize(
    ("name", "payload", "words"),
    [
        ("payment", {"account": "c", "amount": 10**12}, "insufficient funds"),
        ("inventory", {"items": [["a", 1000]]}, "out of stock"),
    ],
)
async def test_largest_allowed_quantity_is_refused_not_rejected(
    make: Make, name: str, payload: Any, words: str
) -> None:
    """The upper bound of a quantity is valid input: refused for the business reason instead."""
    svc = await make(name)
    reply = await deliver(svc, "t1", Op.TRY, payload)
    assert reply.outcome is Outcome.REFUSED
    assert words in reply.error


# ---------------------------------------------------------------- restore from the file


async def test_restore_reproduces_counters_ledger_and_barrier(tmp_path: Path) -> None:
    """Service.restore from its SQLite file rebuilds counters, ledger and barrier exactly."""
    path = tmp_path / "inventory.db"
    store = ServiceStore(path)
    store.create(INITIAL["inventory"])
    store.start(asyncio.get_running_loop())
    svc = Service(RULES["inventory"](), INITIAL["inventory"], store=store)
    a2, a9 = {"items": [["a", 2]]}, {"items": [["a", 9]]}
    script = [
        ("t1", Op.TRY, a2),  # applied
        ("t1", Op.TRY, a2),  # duplicate
        ("t1", Op.CONFIRM, a2),  # applied
        ("t2", Op.CANCEL, a2),  # null, blocks t2's try
        ("t2", Op.TRY, a2),  # blocked
        ("t3", Op.TRY, a9),  # refused
        ("t4", Op.TRY, {"items": [["a", 0]]}),  # rejected
        ("t5", Op.ACTION, {"items": [["b", 3], ["a", 1]]}),  # applied
        ("t5", Op.COMPENSATE, {"items": [["b", 3], ["a", 1]]}),  # applied
        ("t6", Op.TRY, a2),  # applied, left reserved
        ("t7", Op.CONFIRM, a2),  # rejected: no try
    ]
    replies = [await deliver(svc, txid, op, payload) for txid, op, payload in script]
    await svc.close()

    restored = Service.restore(RULES["inventory"](), ServiceStore(path))
    assert restored.initial == svc.initial
    assert restored.counters == svc.counters == {"sku:a": [1, 2, 2], "sku:b": [10, 0, 0]}
    assert list(restored.ledger) == list(svc.ledger)
    assert [e.kind for e in restored.ledger] == [
        APPLIED,
        APPLIED,
        BLOCKED,
        NULL,
        REFUSED,
        REJECTED,
        APPLIED,
        APPLIED,
        APPLIED,
        REJECTED,
    ]
    assert restored.barrier == svc.barrier
    # The restored barrier still answers as before, with no new effect.
    restored.store.start(asyncio.get_running_loop())  # type: ignore[union-attr]
    try:
        for (txid, op, payload), reply in zip(script, replies, strict=True):
            assert (await deliver(restored, txid, op, payload)) == reply
        assert restored.counters == svc.counters
        assert len(restored.ledger) == len(svc.ledger)
        # The blocked try stays blocked even though stock is there.
        late = await deliver(restored, "t2", Op.TRY, a2)
        assert late.outcome is Outcome.REFUSED
        assert restored.counters["sku:a"] == [1, 2, 2]
        # New work after a restore continues the ledger's sequence.
        assert (await deliver(restored, "t8", Op.CANCEL, a2)).outcome is Outcome.OK
        assert restored.ledger[-1].seq == len(svc.ledger) + 2
    finally:
        await restored.close()
    again = Service.restore(RULES["inventory"](), ServiceStore(path))
    assert list(again.ledger) == list(restored.ledger)
    assert again.barrier == restored.barrier


def test_restore_refuses_a_file_that_is_not_a_service(tmp_path: Path) -> None:
    """Restoring from an empty SQLite file raises the clear 'not a service database' error."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    with pytest.raises(ValueError, match="not a service database"):
        Service.restore(RULES["order"](), ServiceStore(path))


# ---------------------------------------------------------------- random deliveries

TXIDS = [f"t{i}" for i in range(4)] + [f"s{i}" for i in range(4)]
_TCC_OPS = (Op.TRY, Op.CONFIRM, Op.CANCEL)
_SAGA_OPS = (Op.ACTION, Op.COMPENSATE)


@st.composite
def deliveries(draw: st.DrawFn) -> list[tuple[str, str, Op, dict[str, Any]]]:
    """Deliveries in any order, with duplicates: t* are TCC transactions, s* sagas."""
    payloads = {
        txid: {"items": [[draw(st.sampled_from(["a", "b"])), draw(st.integers(1, 4))]]}
        for txid in TXIDS
    }
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(TXIDS), st.sampled_from(["inventory", "other"]), st.data()),
            max_size=40,
        )
    )
    out = []
    for txid, branch, data in steps:
        ops = _TCC_OPS if txid.startswith("t") else _SAGA_OPS
        op = data.draw(st.sampled_from(ops))
        out.append((txid, branch, op, payloads[txid]))
    return out


@given(deliveries())
def test_random_deliveries_never_go_negative_or_apply_twice(
    steps: list[tuple[str, str, Op, dict[str, Any]]],
) -> None:
    """Deliveries in any order, duplicated: counters stay >= 0 and each key applies at most once."""
    svc = Service(RULES["inventory"](), {"sku:a": [4, 0, 0], "sku:b": [2, 0, 0]})
    for txid, branch, op, payload in steps:
        svc.execute(txid, branch, op, payload)
        for key, row in svc.counters.items():
            assert all(x >= 0 for x in row), (key, row, svc.ledger)
        assert sum(svc.counters["sku:a"]) == 4
        assert sum(svc.counters["sku:b"]) == 2
    assert all(n == 1 for n in applied_keys(svc).values())
    keys = Counter((e.txid, e.branch, str(e.op)) for e in svc.ledger)
    assert all(n == 1 for n in keys.values())
    for txid, branch in {(e.txid, e.branch) for e in svc.ledger}:
        ops = {str(e.op): e.kind for e in svc.ledger if (e.txid, e.branch) == (txid, branch)}
        # confirm and cancel of one branch never both apply; nothing applies after a null undo
        assert not (ops.get("confirm") == APPLIED and ops.get("cancel") == APPLIED)
        if ops.get("cancel") == NULL:
            assert ops.get("try") != APPLIED
        if ops.get("compensate") == NULL:
            assert ops.get("action") != APPLIED
