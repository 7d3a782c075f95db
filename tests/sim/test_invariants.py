"""The invariant checker catches each kind of violation, on real shapes from a demo run."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from accord.core.records import TxnSnapshot, TxnStatus
from accord.log import open_store
from accord.sim import invariants
from accord.sim.demo import DemoConfig, run_demo
from accord.sim.invariants import ServiceView
from accord.sim.services import APPLIED, NULL, REFUSED, Entry
from accord.sim.shop import Shop

Views = dict[str, ServiceView]
Snaps = dict[str, TxnSnapshot]


async def _load(data: Path) -> tuple[Views, Snaps, dict[str, dict[str, list[int]]]]:
    shop = Shop.open(data / "services")
    store = open_store(f"sqlite://{data / 'coordinator.db'}")
    await store.open()
    try:
        snaps = await store.snapshots()
    finally:
        await store.close()
    live = {name: copy.deepcopy(svc.counters) for name, svc in shop.services.items()}
    views = {
        name: ServiceView(name, copy.deepcopy(svc.initial), list(svc.ledger), None)
        for name, svc in shop.services.items()
    }
    return views, {s.txid: s for s in snaps}, live


def _demo(tmp_path_factory: pytest.TempPathFactory, protocol: str) -> Callable[[], tuple]:
    data = tmp_path_factory.mktemp(f"demo-{protocol}") / "run"
    summary = asyncio.run(
        run_demo(
            DemoConfig(
                orders=50, concurrency=20, fault_rate=0.0, seed=2, data=str(data), protocol=protocol
            )
        )
    )
    assert all(summary["invariants"].values())
    loaded = asyncio.run(_load(data))

    def fresh() -> tuple[Views, Snaps, dict[str, dict[str, list[int]]]]:
        return copy.deepcopy(loaded)

    return fresh


@pytest.fixture(scope="module")
def tcc_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], tuple]:
    return _demo(tmp_path_factory, "tcc")


@pytest.fixture(scope="module")
def saga_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], tuple]:
    return _demo(tmp_path_factory, "saga")


def failed(report: invariants.Report) -> set[str]:
    return {name for name, problems in report.violations.items() if problems}


def names(report: invariants.Report, invariant: str, txid: str) -> bool:
    return any(txid in problem for problem in report.violations[invariant])


def entry(e: Entry, **change: object) -> Entry:
    fields = {
        "seq": e.seq,
        "txid": e.txid,
        "branch": e.branch,
        "op": e.op,
        "kind": e.kind,
        "effect": e.effect,
        "detail": e.detail,
    }
    fields.update(change)
    return Entry(**fields)  # type: ignore[arg-type]


def renumber(entries: list[Entry]) -> list[Entry]:
    return [entry(e, seq=i + 1) for i, e in enumerate(entries)]


def ops_of(view: ServiceView, txid: str) -> dict[str, str]:
    return {str(e.op): e.kind for e in view.ledger if e.txid == txid}


def pick(
    snaps: Snaps, status: TxnStatus, views: Views, *, last: bool = False, **need: dict[str, str]
) -> str:
    """The first (or last) transaction of ``status`` whose ledgers show ``need[service]``."""
    for txid, snap in sorted(snaps.items(), reverse=last):
        if snap.status is not status:
            continue
        if all(
            all(ops_of(views[svc], txid).get(op) == kind for op, kind in want.items())
            for svc, want in need.items()
        ):
            return txid
    raise AssertionError(f"the demo run has no {status} transaction with {need}")


def index(view: ServiceView, txid: str, op: str) -> int:
    return next(i for i, e in enumerate(view.ledger) if e.txid == txid and str(e.op) == op)


# ---------------------------------------------------------------- the untampered run


def test_real_run_passes_every_invariant(tcc_run: Callable[[], tuple]) -> None:
    """The untouched demo run passes, with persisted and with live counters."""
    views, snaps, live = tcc_run()
    assert len(snaps) == 50
    assert {s.status for s in snaps.values()} == {TxnStatus.COMMITTED, TxnStatus.ABORTED}
    report = invariants.check(views, snaps)
    assert report.ok, report.violations
    for name, view in views.items():
        view.counters = live[name]
    report = invariants.check(views, snaps)
    assert report.ok, report.violations
    assert report.duplicates_applied == 0
    assert report.needs_attention == []


# ---------------------------------------------------------------- atomicity


def test_committed_with_one_service_cancelled_breaks_atomicity(
    tcc_run: Callable[[], tuple],
) -> None:
    """A committed transaction whose order branch was cancelled fails atomicity only, named."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.COMMITTED, views, order={"confirm": APPLIED})
    ledger = list(views["order"].ledger)
    i = index(views["order"], txid, "confirm")
    key = ledger[i].effect[0][0]
    ledger[i] = entry(ledger[i], op="cancel", effect=[(key, [-1, 0, 1])])
    views["order"].ledger = ledger
    report = invariants.check(views, snaps)
    assert failed(report) == {"atomicity"}
    assert names(report, "atomicity", txid)


def test_aborted_with_hanging_reservation_breaks_atomicity(tcc_run: Callable[[], tuple]) -> None:
    """An aborted transaction whose inventory reservation was never cancelled fails atomicity."""
    views, snaps, _ = tcc_run()
    # The last one: a hanging reservation of an earlier order would starve later tries.
    txid = pick(
        snaps, TxnStatus.ABORTED, views, last=True, inventory={"try": APPLIED, "cancel": APPLIED}
    )
    ledger = list(views["inventory"].ledger)
    del ledger[index(views["inventory"], txid, "cancel")]
    views["inventory"].ledger = renumber(ledger)
    report = invariants.check(views, snaps)
    assert failed(report) == {"atomicity"}
    assert names(report, "atomicity", txid)


def test_effects_unknown_to_the_log_break_atomicity(tcc_run: Callable[[], tuple]) -> None:
    """Applied effects of a transaction missing from the log are flagged as unknown to it."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.COMMITTED, views)
    del snaps[txid]
    report = invariants.check(views, snaps)
    assert "atomicity" in failed(report)
    assert any(txid in p and "unknown to the log" in p for p in report.violations["atomicity"])
    # Its sale, payment and shipment are no longer backed by a committed order.
    assert failed(report) == {"atomicity", "stock", "money", "shipping"}


# ---------------------------------------------------------------- exactly once


def test_try_applied_after_its_cancel_breaks_exactly_once(tcc_run: Callable[[], tuple]) -> None:
    """A try that applied after a (null) cancel of the same branch fails exactly_once, named."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.ABORTED, views, order={"try": APPLIED, "cancel": APPLIED})
    ledger = list(views["order"].ledger)
    i = index(views["order"], txid, "try")
    null = entry(ledger[i], op="cancel", kind=NULL, effect=[], detail="nothing to cancel")
    ledger.insert(i, null)
    views["order"].ledger = renumber(ledger)
    report = invariants.check(views, snaps)
    assert failed(report) == {"exactly_once"}
    assert any(
        txid in p and "applied after its cancel" in p for p in report.violations["exactly_once"]
    )


def test_same_key_applied_twice_breaks_exactly_once(tcc_run: Callable[[], tuple]) -> None:
    """A payment try applied twice fails exactly_once (and money) and counts a duplicate applied."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.COMMITTED, views, payment={"try": APPLIED})
    ledger = list(views["payment"].ledger)
    i = index(views["payment"], txid, "try")
    ledger.insert(i + 1, ledger[i])
    views["payment"].ledger = renumber(ledger)
    report = invariants.check(views, snaps)
    assert failed(report) == {"exactly_once", "money"}
    assert names(report, "exactly_once", txid)
    assert report.duplicates_applied == 1


def test_refusal_answered_twice_is_a_duplicate_but_not_applied(
    tcc_run: Callable[[], tuple],
) -> None:
    """A refused try recorded twice fails exactly_once but counts no duplicate applied."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.ABORTED, views, payment={"try": REFUSED})
    ledger = list(views["payment"].ledger)
    i = index(views["payment"], txid, "try")
    ledger.insert(i + 1, ledger[i])
    views["payment"].ledger = renumber(ledger)
    report = invariants.check(views, snaps)
    assert failed(report) == {"exactly_once"}
    assert names(report, "exactly_once", txid)
    assert report.duplicates_applied == 0


def test_compensation_without_its_action_breaks_exactly_once(
    saga_run: Callable[[], tuple],
) -> None:
    """A saga compensation applied with no action before it fails exactly_once, named."""
    views, snaps, _ = saga_run()
    txid = pick(
        snaps, TxnStatus.ABORTED, views, inventory={"action": APPLIED, "compensate": APPLIED}
    )
    ledger = list(views["inventory"].ledger)
    del ledger[index(views["inventory"], txid, "action")]
    views["inventory"].ledger = renumber(ledger)
    report = invariants.check(views, snaps)
    assert "exactly_once" in failed(report)
    assert any(
        txid in p and "applied without action" in p for p in report.violations["exactly_once"]
    )
    assert failed(report) <= {"exactly_once", "stock"}


def test_order_row_going_negative_is_not_a_shipping_violation(
    tcc_run: Callable[[], tuple],
) -> None:
    """An order row driven negative (cancel without try) is blamed on the order, not shipping."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.ABORTED, views, order={"try": APPLIED, "cancel": APPLIED})
    ledger = list(views["order"].ledger)
    del ledger[index(views["order"], txid, "try")]
    views["order"].ledger = renumber(ledger)
    report = invariants.check(views, snaps)
    assert names(report, "exactly_once", txid)
    assert "shipping" not in failed(report), report.violations["shipping"]


# ---------------------------------------------------------------- stock and money


def _first_negative(view: ServiceView, key: str, column: int, shift: int) -> str:
    """The transaction at which ``key[column]`` first goes negative after lowering it by shift."""
    value = view.initial[key][column] - shift
    for e in view.ledger:
        for k, deltas in e.effect:
            if k == key:
                value += deltas[column]
                if value < 0:
                    return e.txid
    raise AssertionError("never negative")


def _lowest(view: ServiceView, key: str, column: int) -> int:
    value = low = view.initial[key][column]
    for e in view.ledger:
        for k, deltas in e.effect:
            if k == key:
                value += deltas[column]
                low = min(low, value)
    return low


def test_stock_going_negative_breaks_stock(tcc_run: Callable[[], tuple]) -> None:
    """A SKU whose available count goes below zero at some point fails stock, naming the txn."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.COMMITTED, views, inventory={"try": APPLIED})
    view = views["inventory"]
    key = view.ledger[index(view, txid, "try")].effect[0][0]
    shift = _lowest(view, key, 0) + 1
    culprit = _first_negative(view, key, 0, shift)
    view.initial[key][0] -= shift
    report = invariants.check(views, snaps)
    assert failed(report) == {"stock"}
    assert any(
        culprit in p and key in p and "went negative" in p for p in report.violations["stock"]
    )


def test_balance_going_negative_breaks_money(tcc_run: Callable[[], tuple]) -> None:
    """An account whose balance goes below zero at some point fails money, naming the txn."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.COMMITTED, views, payment={"try": APPLIED})
    view = views["payment"]
    key = view.ledger[index(view, txid, "try")].effect[0][0]
    shift = _lowest(view, key, 0) + 1
    culprit = _first_negative(view, key, 0, shift)
    view.initial[key][0] -= shift
    report = invariants.check(views, snaps)
    assert failed(report) == {"money"}
    assert any(
        culprit in p and key in p and "went negative" in p for p in report.violations["money"]
    )


# ---------------------------------------------------------------- nothing stuck


@pytest.mark.parametrize("status", [TxnStatus.PREPARING, TxnStatus.ABORTING])
def test_non_terminal_transaction_breaks_nothing_stuck(
    tcc_run: Callable[[], tuple], status: TxnStatus
) -> None:
    """A transaction left non-terminal in the log fails nothing_stuck only, named."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.ABORTED, views)
    snaps[txid] = dataclasses.replace(snaps[txid], status=status)
    report = invariants.check(views, snaps)
    assert failed(report) == {"nothing_stuck"}
    assert names(report, "nothing_stuck", txid)


def test_needs_attention_needs_a_reason(tcc_run: Callable[[], tuple]) -> None:
    """Needs-attention with a reason is listed, not a violation; without a reason it is one."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.ABORTED, views)
    snaps[txid] = dataclasses.replace(
        snaps[txid], status=TxnStatus.NEEDS_ATTENTION, reason="cancel of 'payment' failed"
    )
    report = invariants.check(views, snaps)
    assert report.ok, report.violations
    assert report.needs_attention == [txid]
    snaps[txid] = dataclasses.replace(snaps[txid], reason="")
    report = invariants.check(views, snaps)
    assert failed(report) == {"nothing_stuck"}
    assert names(report, "nothing_stuck", txid)


# ---------------------------------------------------------------- shipping


def test_over_capacity_slot_breaks_shipping(tcc_run: Callable[[], tuple]) -> None:
    """A slot whose reservations exceed its capacity fails shipping, naming the txn."""
    views, snaps, _ = tcc_run()
    txid = pick(snaps, TxnStatus.COMMITTED, views, shipping={"try": APPLIED})
    view = views["shipping"]
    key = view.ledger[index(view, txid, "try")].effect[0][0]
    used = peak = 0
    culprit = ""
    for e in view.ledger:
        for k, d in e.effect:
            if k == key:
                used += d[1] + d[2]
                if used > peak:
                    peak, culprit = used, e.txid
    view.initial[key][0] = peak - 1
    report = invariants.check(views, snaps)
    assert failed(report) == {"shipping"}
    assert any(
        culprit in p and key in p and "over capacity" in p for p in report.violations["shipping"]
    )


# ---------------------------------------------------------------- live state vs ledger


def test_live_counters_differing_from_ledger_break_state_matches_ledger(
    tcc_run: Callable[[], tuple],
) -> None:
    """Live counters that differ from the replayed ledger fail state_matches_ledger, naming keys."""
    views, snaps, live = tcc_run()
    for name, view in views.items():
        view.counters = live[name]
    key = sorted(live["inventory"])[0]
    live["inventory"][key][0] += 1
    report = invariants.check(views, snaps)
    assert failed(report) == {"state_matches_ledger"}
    assert any("inventory" in p and key in p for p in report.violations["state_matches_ledger"])
    live["inventory"][key][0] -= 1
    live["payment"]["account:ghost"] = [5, 0]
    report = invariants.check(views, snaps)
    assert failed(report) == {"state_matches_ledger"}
    assert any("account:ghost" in p for p in report.violations["state_matches_ledger"])
