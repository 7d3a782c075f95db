"""Many concurrent orders on one hot SKU through the real coordinator never oversell."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from accord.coordinator import Coordinator, TxnResult
from accord.core.records import TxnStatus
from accord.core.spec import Protocol
from accord.log import MemoryStore, Store, open_store
from accord.sim import invariants
from accord.sim.faults import FaultConfig
from accord.sim.services import Counters
from accord.sim.shop import Shop
from accord.sim.workload import Order, order_spec

STOCK = 50
ORDERS = 300
PRICE = 7


def hot_shop_state() -> dict[str, Counters]:
    """One hot SKU with little stock; money and shipping never the limit."""
    return {
        "order": {},
        "inventory": {"sku:hot": [STOCK, 0, 0], "sku:cold": [10_000, 0, 0]},
        "payment": {**{f"account:c{i}": [1_000_000, 0] for i in range(20)}, "revenue": [0]},
        "shipping": {"slot:d0": [10_000, 0, 0], "slot:d1": [10_000, 0, 0]},
    }


def hot_orders(seed: int) -> list[Order]:
    rng = random.Random(seed)
    orders = []
    for i in range(ORDERS):
        qty = rng.randint(1, 2)
        items: tuple[tuple[str, int], ...] = (("hot", qty),)
        if rng.random() < 0.3:
            items = (("cold", 1), ("hot", qty))
        amount = PRICE * sum(q for _, q in items)
        orders.append(Order(f"h{seed}-{i:04d}", f"c{i % 20}", items, amount, f"d{i % 2}"))
    return orders


async def run_hot(
    protocol: Protocol, fault_rate: float, directory: Path | None, seed: int = 7
) -> tuple[Shop, Store, list[TxnResult], invariants.Report]:
    shop = Shop.create(hot_shop_state(), directory / "services" if directory else None)
    store: Store = (
        open_store(f"sqlite://{directory / 'log.db'}") if directory is not None else MemoryStore()
    )
    coordinator = Coordinator(
        store,
        shop.transport(FaultConfig(fault_rate, 0.0), seed),
        max_in_flight=ORDERS,
        rng=random.Random(seed),
    )
    shop.start()
    await coordinator.start()
    try:
        specs = [order_spec(o, protocol, call_timeout_s=0.05) for o in hot_orders(seed)]
        futures = [await coordinator.submit(spec) for spec in specs]
        results = list(await asyncio.gather(*futures))
        await asyncio.sleep(0.3)  # let late duplicate deliveries land: "once quiet"
        await store.flush()
        snaps = await store.snapshots()
        assert len(snaps) == ORDERS
        report = invariants.check(shop.views(), {s.txid: s for s in snaps})
    finally:
        await coordinator.close()
        await shop.close()
    return shop, store, results, report


def hot_sold(results: list[TxnResult], seed: int) -> int:
    qty = {f"order-{o.order_id}": dict(o.items)["hot"] for o in hot_orders(seed)}
    return sum(qty[r.txid] for r in results if r.status is TxnStatus.COMMITTED)


@pytest.mark.parametrize("protocol", [Protocol.TCC, Protocol.SAGA])
@pytest.mark.parametrize("storage", ["memory", "files"])
async def test_hot_sku_never_oversold(protocol: Protocol, storage: str, tmp_path: Path) -> None:
    """300 concurrent orders for 1-2 units of a 50-unit SKU: it sells out exactly, never over."""
    shop, _, results, report = await run_hot(
        protocol, 0.0, tmp_path if storage == "files" else None
    )
    available, reserved, sold = shop.services["inventory"].counters["sku:hot"]
    assert len(results) == ORDERS
    assert all(r.status.terminal for r in results)
    assert sold <= STOCK
    assert available >= 0
    assert reserved == 0
    assert available + reserved + sold == STOCK
    assert sold == hot_sold(results, 7)
    # Demand (~450 units) far exceeds stock: it sells out, and the rest are refused.
    assert available <= 1
    aborted = [r for r in results if r.status is TxnStatus.ABORTED]
    assert aborted
    assert all("out of stock" in r.reason for r in aborted)
    assert report.ok, report.violations
    assert report.duplicates_applied == 0


@pytest.mark.parametrize("protocol", [Protocol.TCC, Protocol.SAGA])
@pytest.mark.parametrize("storage", ["memory", "files"])
async def test_hot_sku_never_oversold_with_faults(
    protocol: Protocol, storage: str, tmp_path: Path
) -> None:
    """The same contention with 30% injected faults (seeded): no oversell, every invariant holds."""
    shop, _, results, report = await run_hot(
        protocol, 0.3, tmp_path if storage == "files" else None
    )
    available, reserved, sold = shop.services["inventory"].counters["sku:hot"]
    assert sum(shop.fault_counts.values()) > 0
    assert shop.duplicates_delivered > 0  # duplicates did reach the services
    assert len(results) == ORDERS
    assert all(r.status.terminal for r in results)
    assert sold <= STOCK
    assert available >= 0
    assert reserved == 0
    assert available + reserved + sold == STOCK
    assert sold == hot_sold(results, 7)
    assert any(r.status is TxnStatus.COMMITTED for r in results)
    assert report.ok, report.violations
    assert report.duplicates_applied == 0
    for r in results:
        if r.status is TxnStatus.NEEDS_ATTENTION:
            assert r.reason


async def test_persisted_state_matches_after_concurrent_run(tmp_path: Path) -> None:
    """After a faulty concurrent run, the services' files and the log replay to the same state."""
    shop, _, _, _ = await run_hot(Protocol.TCC, 0.3, tmp_path, seed=11)
    reopened = Shop.open(tmp_path / "services")
    for name, svc in shop.services.items():
        assert reopened.services[name].counters == svc.counters
        assert list(reopened.services[name].ledger) == list(svc.ledger)
    store = open_store(f"sqlite://{tmp_path / 'log.db'}")
    await store.open()
    try:
        snaps = await store.snapshots()
    finally:
        await store.close()
    views = reopened.views()
    for view in views.values():
        view.counters = None
    report = invariants.check(views, {s.txid: s for s in snaps})
    assert len(snaps) == ORDERS
    assert report.ok, report.violations
