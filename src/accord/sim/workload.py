"""The reference workload: customers, SKUs with skewed popularity, day slots.

Everything derives from the seed, so a run's orders can be regenerated for
checking without storing them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from accord.core.spec import BranchSpec, Protocol, RetryPolicy, TransactionSpec
from accord.sim.services import Counters

SERVICES = ("order", "inventory", "payment", "shipping")


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    customer: str
    items: tuple[tuple[str, int], ...]
    amount: int
    slot: str


@dataclass(frozen=True, slots=True)
class ShopConfig:
    orders: int = 2000
    customers: int = 200
    skus: int = 50
    days: int = 7
    seed: int = 1
    zipf_s: float = 1.1
    hot_skus: int = 3
    # Stock of a hot SKU covers this share of its expected demand: it runs out.
    hot_stock_share: float = 0.6


class Workload:
    """Initial state of the four services and the orders, from one seed."""

    def __init__(self, config: ShopConfig) -> None:
        self.config = config
        rng = random.Random(config.seed)
        c = config
        weights = [1 / (rank + 1) ** c.zipf_s for rank in range(c.skus)]
        total = sum(weights)
        self.popularity = [w / total for w in weights]
        self.prices = [rng.randint(100, 5000) for _ in range(c.skus)]
        lines_per_order, qty_per_line = 2.0, 1.5
        demand = [c.orders * lines_per_order * qty_per_line * p for p in self.popularity]
        self.stock = [
            math.ceil(d * c.hot_stock_share) if rank < c.hot_skus else math.ceil(d * 2) + 10
            for rank, d in enumerate(demand)
        ]
        mean_amount = lines_per_order * qty_per_line * sum(self.prices) / c.skus
        # At least two orders' worth each, so small runs do not abort for money.
        per_customer = max(c.orders / c.customers, 2.0) * mean_amount
        self.balances = [
            rng.randint(int(per_customer * 0.6), int(per_customer * 1.6) + 1)
            for _ in range(c.customers)
        ]
        self.capacity = [math.ceil(c.orders / c.days * 1.05) + 1 for _ in range(c.days)]
        self.orders = [self._order(rng, i) for i in range(c.orders)]

    def _order(self, rng: random.Random, i: int) -> Order:
        c = self.config
        lines = rng.randint(1, 3)
        picked: dict[int, int] = {}
        for sku in rng.choices(range(c.skus), self.popularity, k=lines):
            picked[sku] = picked.get(sku, 0) + rng.randint(1, 2)
        items = tuple((f"sku-{sku}", qty) for sku, qty in sorted(picked.items()))
        amount = sum(self.prices[sku] * qty for sku, qty in picked.items())
        return Order(
            order_id=f"{c.seed}-{i:07d}",
            customer=f"cust-{rng.randrange(c.customers)}",
            items=items,
            amount=amount,
            slot=f"day-{rng.randrange(c.days)}",
        )

    def initial_state(self) -> dict[str, Counters]:
        return {
            "order": {},
            "inventory": {f"sku:sku-{i}": [s, 0, 0] for i, s in enumerate(self.stock)},
            "payment": {
                **{f"account:cust-{i}": [b, 0] for i, b in enumerate(self.balances)},
                "revenue": [0],
            },
            "shipping": {f"slot:day-{d}": [cap, 0, 0] for d, cap in enumerate(self.capacity)},
        }


def order_spec(
    order: Order,
    protocol: Protocol,
    *,
    timeout_s: float = 30.0,
    call_timeout_s: float = 0.5,
    retry: RetryPolicy | None = None,
    base_url: str = "",
) -> TransactionSpec:
    """The global transaction of one order: one branch per service, reached
    by name in process or at ``{base_url}/{service}`` over HTTP."""
    items = [list(item) for item in order.items]
    payloads = {
        "order": {"order_id": order.order_id, "customer": order.customer, "amount": order.amount},
        "inventory": {"items": items},
        "payment": {"account": order.customer, "amount": order.amount},
        "shipping": {"slot": order.slot, "order_id": order.order_id},
    }
    # Confirms and cancels must get through: a generous budget (about a
    # minute of capped backoff) before a branch is parked as needs-attention.
    policy = retry or RetryPolicy(maximum_interval_s=1.0, maximum_attempts=60)
    return TransactionSpec(
        id=f"order-{order.order_id}",
        protocol=protocol,
        timeout_s=timeout_s,
        branches=tuple(
            BranchSpec(
                name=s,
                participant=f"{base_url}/{s}" if base_url else s,
                payload=payloads[s],
                retry=policy,
                timeout_s=call_timeout_s,
            )
            for s in SERVICES
        ),
    )
