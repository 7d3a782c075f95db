"""The invariants of SCENARIO.md, checked against the services' ledgers and
the coordinator's log once everything is quiet.

Each check returns a list of violations, each naming the transaction (or SKU,
account, slot) concerned. Nothing here trusts the services' live counters:
state is recomputed by replaying each ledger from the initial counters, and
the live counters (when given) must equal that replay.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from accord.core.records import TxnSnapshot, TxnStatus
from accord.core.spec import Op, Protocol
from accord.sim.services import APPLIED, Counters, Entry

INVARIANTS = (
    "atomicity",
    "stock",
    "money",
    "exactly_once",
    "nothing_stuck",
    "shipping",
    "state_matches_ledger",
)

_FORWARD = {Op.TRY.value, Op.ACTION.value}
# Which invariant a service's counter going negative breaks.
_INVARIANT_OF = {"payment": "money", "inventory": "stock", "shipping": "shipping"}
_UNDO = {Op.CANCEL.value, Op.COMPENSATE.value}


@dataclass(slots=True)
class ServiceView:
    """What the checker needs of a service."""

    name: str
    initial: Counters
    ledger: Sequence[Entry]
    counters: Counters | None = None  # live state, if the service is running


@dataclass(slots=True)
class Report:
    violations: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in INVARIANTS})
    needs_attention: list[str] = field(default_factory=list)
    duplicates_applied: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def passed(self) -> dict[str, bool]:
        return {name: not v for name, v in self.violations.items()}


def _net(entries: list[Entry]) -> str:
    """A branch's net effect at one service from its ledger entries."""
    applied = {e.op for e in entries if e.kind == APPLIED}
    if Op.TRY.value in applied:
        if Op.CONFIRM.value in applied:
            return "done"
        if Op.CANCEL.value in applied:
            return "undone"
        return "reserved"
    if Op.ACTION.value in applied:
        return "undone" if Op.COMPENSATE.value in applied else "done"
    return "none"


def check(services: Mapping[str, ServiceView], txns: Mapping[str, TxnSnapshot]) -> Report:
    report = Report()
    v = report.violations
    # Per service, per transaction: ledger entries.
    per_txn: dict[str, dict[str, list[Entry]]] = {name: defaultdict(list) for name in services}
    state: dict[str, Counters] = {}  # replayed from each ledger
    for name, svc in services.items():
        seen: dict[tuple[str, str, str], int] = {}
        undone_at: dict[tuple[str, str], int] = {}
        for e in svc.ledger:
            per_txn[name][e.txid].append(e)
            key = (e.txid, e.branch, e.op)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                v["exactly_once"].append(f"{name}: {key} answered {seen[key]} times")
                if e.kind == APPLIED:
                    report.duplicates_applied += 1
            if e.op in _UNDO:
                undone_at.setdefault((e.txid, e.branch), e.seq)
            if e.kind != APPLIED:
                continue
            if e.op in _FORWARD and (e.txid, e.branch) in undone_at:
                v["exactly_once"].append(f"{name}: {e.txid} {e.op} applied after its cancel")
            if e.op not in _FORWARD:
                fwd = (
                    Op.TRY.value if e.op in (Op.CONFIRM.value, Op.CANCEL.value) else Op.ACTION.value
                )
                if not any(
                    x.op == fwd and x.kind == APPLIED and x.seq < e.seq
                    for x in per_txn[name][e.txid]
                ):
                    v["exactly_once"].append(f"{name}: {e.txid} {e.op} applied without {fwd}")
        state[name] = _replay(name, svc, v)

    # Atomicity and nothing stuck, per transaction of the log.
    net: dict[str, dict[str, str]] = {}
    for txid, snap in txns.items():
        states = {name: _net(per_txn[name].get(txid, [])) for name in services}
        net[txid] = states
        status = snap.status
        if not status.terminal:
            v["nothing_stuck"].append(f"{txid}: still {status}")
            continue
        if status is TxnStatus.NEEDS_ATTENTION:
            report.needs_attention.append(txid)
            if not snap.reason:
                v["nothing_stuck"].append(f"{txid}: needs attention without a reason")
            continue
        want = {"done"} if status is TxnStatus.COMMITTED else {"none", "undone"}
        wrong = {n: s for n, s in states.items() if s not in want}
        if wrong:
            v["atomicity"].append(f"{txid}: {status} but {wrong}")
    for name in services:
        for txid, entries in per_txn[name].items():
            if txid not in txns and _net(entries) not in ("none", "undone"):
                v["atomicity"].append(f"{txid}: applied at {name} but unknown to the log")

    _conservation(services, state, txns, net, v)
    return report


def _replay(name: str, svc: ServiceView, v: dict[str, list[str]]) -> Counters:
    """Recompute state from the ledger; nothing may ever go negative."""
    state = {k: list(r) for k, r in svc.initial.items()}
    for e in svc.ledger:
        for key, deltas in e.effect:
            row = state.setdefault(key, [0] * len(deltas))
            for i, d in enumerate(deltas):
                row[i] += d
            if any(x < 0 for x in row):
                inv = _INVARIANT_OF.get(name, "atomicity")
                v[inv].append(f"{name}: {key} went negative ({row}) at {e.txid} {e.op}")
            if name == "shipping" and row[1] + row[2] > row[0]:
                v["shipping"].append(f"{key} over capacity ({row}) at {e.txid} {e.op}")
    if svc.counters is not None:
        live = {k: r for k, r in svc.counters.items() if any(r) or k in svc.initial}
        replayed = {k: r for k, r in state.items() if any(r) or k in svc.initial}
        if live != replayed:
            keys = _diff(live, replayed)[:5]
            v["state_matches_ledger"].append(f"{name}: live state differs from ledger at {keys}")
    return state


def _diff(a: Counters, b: Counters) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _conservation(
    services: Mapping[str, ServiceView],
    state: dict[str, Counters],
    txns: Mapping[str, TxnSnapshot],
    net: dict[str, dict[str, str]],
    v: dict[str, list[str]],
) -> None:
    """Stock, money, shipping and orders against the committed transactions."""
    sold: dict[str, int] = defaultdict(int)
    reserved: dict[str, int] = defaultdict(int)
    revenue = held = 0
    slots_done: dict[str, int] = defaultdict(int)
    slots_reserved: dict[str, int] = defaultdict(int)
    for txid, snap in txns.items():
        branches = {b.name: b.payload for b in snap.spec.branches}
        states = net[txid]
        tcc = snap.spec.protocol is Protocol.TCC
        inv, pay, ship = (
            branches.get("inventory"),
            branches.get("payment"),
            branches.get("shipping"),
        )
        if inv is not None:
            for sku, qty in inv.get("items", []):
                if states.get("inventory") == "done":
                    sold[f"sku:{sku}"] += qty
                elif states.get("inventory") == "reserved" and tcc:
                    reserved[f"sku:{sku}"] += qty
        if pay is not None:
            if states.get("payment") == "done":
                revenue += pay.get("amount", 0)
            elif states.get("payment") == "reserved":
                held += pay.get("amount", 0)
        if ship is not None:
            key = f"slot:{ship.get('slot')}"
            if states.get("shipping") == "done":
                slots_done[key] += 1
            elif states.get("shipping") == "reserved":
                slots_reserved[key] += 1

    if "inventory" in services:
        svc, counters = services["inventory"], state["inventory"]
        for key, (avail0, _, _) in svc.initial.items():
            a, r, s = counters[key]
            if a + r + s != avail0:
                v["stock"].append(f"{key}: available+reserved+sold = {a + r + s} != {avail0}")
            if r != reserved[key]:
                v["stock"].append(f"{key}: reserved {r}, expected {reserved[key]}")
            if s != sold[key]:
                v["stock"].append(f"{key}: sold {s}, committed orders bought {sold[key]}")
    if "payment" in services:
        svc, counters = services["payment"], state["payment"]
        total0 = sum(r[0] + r[1] for k, r in svc.initial.items() if k.startswith("account:"))
        total0 += svc.initial.get("revenue", [0])[0]
        balances = sum(r[0] for k, r in counters.items() if k.startswith("account:"))
        held_now = sum(r[1] for k, r in counters.items() if k.startswith("account:"))
        revenue_now = counters.get("revenue", [0])[0]
        if balances + held_now + revenue_now != total0:
            v["money"].append(
                f"balances+held+revenue = {balances + held_now + revenue_now} != {total0}"
            )
        if held_now != held:
            v["money"].append(f"held {held_now}, expected {held}")
        if revenue_now != revenue:
            v["money"].append(f"revenue {revenue_now}, committed orders paid {revenue}")
    if "shipping" in services:
        svc, counters = services["shipping"], state["shipping"]
        for key, (cap, r, s) in counters.items():
            if r + s > cap:
                v["shipping"].append(f"{key}: scheduled+reserved {r + s} > capacity {cap}")
            if s != slots_done[key] or r != slots_reserved[key]:
                v["shipping"].append(
                    f"{key}: scheduled {s} reserved {r}, expected {slots_done[key]}"
                    f" and {slots_reserved[key]}"
                )
    if "order" in services:
        svc, counters = services["order"], state["order"]
        for txid, snap in txns.items():
            payload = {b.name: b.payload for b in snap.spec.branches}.get("order")
            if payload is None or snap.status is TxnStatus.NEEDS_ATTENTION:
                continue
            row = counters.get(f"order:{payload.get('order_id')}", [0, 0, 0])
            confirmed = row[1] == 1 and row[0] == 0
            if (snap.status is TxnStatus.COMMITTED) != confirmed or row[0] != 0:
                v["atomicity"].append(f"{txid}: order row {row} for a {snap.status} transaction")
