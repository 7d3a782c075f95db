"""The four simulated services of the reference shop (docs: SCENARIO.md).

Each service keeps its state as named counters (``key -> [int, ...]``) and an
append-only ledger of every operation it answered. Business rules turn an
operation into an *effect*: a list of ``(key, deltas)`` added to the counters.
The ledger is the service's source of truth: its SQLite file holds the
initial counters and the ledger, and state after a restart is the initial
state with every applied effect replayed. That also lets the checker verify
that no counter ever went negative, at any point of the history.

Idempotency (the barrier) lives here too, keyed by (transaction, branch,
operation):

* a duplicate gets the first answer again and changes nothing;
* a cancel / compensate whose try / action never applied is a recorded no-op
  (null compensation) and *blocks* that try / action: arriving later, it is
  refused and never applied (no hanging reservation);
* a confirm needs its try applied and no cancel; confirm and cancel of one
  branch can never both apply (each sees the other's ledger entry, and the
  event loop runs one operation at a time).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from accord._completion import Completion
from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.log.groupcommit import LoopCommitter
from accord.transport.base import Call, Reply

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

Counters = dict[str, list[int]]
Effect = list[tuple[str, list[int]]]

APPLIED = "applied"  # the effect was applied
REFUSED = "refused"  # business refusal (answered, nothing applied)
NULL = "null"  # cancel / compensate with nothing to undo
BLOCKED = "blocked"  # a try / action barred by an earlier cancel
REJECTED = "rejected"  # the request was malformed or out of order

_FORWARD = {Op.CANCEL: Op.TRY, Op.COMPENSATE: Op.ACTION, Op.CONFIRM: Op.TRY}
_UNDO = {Op.TRY: Op.CANCEL, Op.ACTION: Op.COMPENSATE}


class Refusal(Exception):
    """A business refusal raised by a rule (short stock, funds, capacity)."""


class BadRequest(Exception):
    """The payload is malformed."""


class Entry(NamedTuple):
    """One answered operation, as kept in the ledger."""

    seq: int
    txid: str
    branch: str
    op: str
    kind: str
    effect: Effect
    detail: str = ""

    def reply(self) -> Reply:
        if self.kind in (APPLIED, NULL):
            return _OK
        if self.kind in (REFUSED, BLOCKED):
            return Reply(Outcome.REFUSED, error=self.detail)
        return Reply(Outcome.REJECTED, error=self.detail)


_OK = Reply(Outcome.OK)

Rule = Callable[[Counters, Any], Effect]


class Rules:
    """A service's business logic: op -> function(counters, payload) -> effect."""

    name = "service"
    columns: tuple[str, ...] = ()

    def rule(self, op: Op) -> Rule:
        raise NotImplementedError


# ---------------------------------------------------------------- payload parsing


def _int(payload: Any, field: str, *, minimum: int = 1) -> int:
    if not isinstance(payload, dict) or field not in payload:
        raise BadRequest(f"payload.{field} is required")
    value = payload[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"payload.{field} must be a whole number, got {value!r}")
    if value < minimum or value > 10**12:
        raise BadRequest(f"payload.{field} must be between {minimum} and 10^12, got {value}")
    return value


def _str(payload: Any, field: str) -> str:
    if not isinstance(payload, dict) or not isinstance(payload.get(field), str):
        raise BadRequest(f"payload.{field} must be a string")
    return str(payload[field])


def _items(payload: Any) -> list[tuple[str, int]]:
    items = payload.get("items") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items or len(items) > 16:
        raise BadRequest("payload.items must be a list of 1-16 [sku, quantity] pairs")
    out = []
    for item in items:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or isinstance(item[1], bool)
            or not isinstance(item[1], int)
            or not 1 <= item[1] <= 1000
        ):
            raise BadRequest(f"payload.items: bad item {item!r}")
        out.append((item[0], item[1]))
    return out


def _need(counters: Counters, key: str) -> list[int]:
    row = counters.get(key)
    if row is None:
        raise BadRequest(f"unknown key {key!r}")
    return row


# ---------------------------------------------------------------- the four services


class OrderRules(Rules):
    """order:<id> -> [pending, confirmed, cancelled]"""

    name = "order"
    columns = ("pending", "confirmed", "cancelled")

    def rule(self, op: Op) -> Rule:
        return {
            Op.TRY: lambda c, p: [(f"order:{_str(p, 'order_id')}", [1, 0, 0])],
            Op.CONFIRM: lambda c, p: [(f"order:{_str(p, 'order_id')}", [-1, 1, 0])],
            Op.CANCEL: lambda c, p: [(f"order:{_str(p, 'order_id')}", [-1, 0, 1])],
            Op.ACTION: lambda c, p: [(f"order:{_str(p, 'order_id')}", [0, 1, 0])],
            Op.COMPENSATE: lambda c, p: [(f"order:{_str(p, 'order_id')}", [0, -1, 1])],
        }[op]


class InventoryRules(Rules):
    """sku:<id> -> [available, reserved, sold]"""

    name = "inventory"
    columns = ("available", "reserved", "sold")

    def rule(self, op: Op) -> Rule:
        return {
            Op.TRY: self._take((-1, 1, 0)),
            Op.CONFIRM: self._move((0, -1, 1)),
            Op.CANCEL: self._move((1, -1, 0)),
            Op.ACTION: self._take((-1, 0, 1)),
            Op.COMPENSATE: self._move((1, 0, -1)),
        }[op]

    @staticmethod
    def _take(sign: tuple[int, int, int]) -> Rule:
        def take(counters: Counters, payload: Any) -> Effect:
            items = _items(payload)
            need: dict[str, int] = {}
            for sku, qty in items:
                need[sku] = need.get(sku, 0) + qty
            for sku, qty in need.items():
                if _need(counters, f"sku:{sku}")[0] < qty:
                    raise Refusal(f"out of stock: {sku} has fewer than {qty} available")
            return [(f"sku:{sku}", [s * qty for s in sign]) for sku, qty in need.items()]

        return take

    @staticmethod
    def _move(sign: tuple[int, int, int]) -> Rule:
        def move(counters: Counters, payload: Any) -> Effect:
            need: dict[str, int] = {}
            for sku, qty in _items(payload):
                need[sku] = need.get(sku, 0) + qty
            return [(f"sku:{sku}", [s * qty for s in sign]) for sku, qty in need.items()]

        return move


class PaymentRules(Rules):
    """account:<id> -> [balance, held]; revenue -> [revenue]"""

    name = "payment"
    columns = ("balance", "held")

    def rule(self, op: Op) -> Rule:
        def acct(p: Any) -> str:
            return f"account:{_str(p, 'account')}"

        def try_(c: Counters, p: Any) -> Effect:
            amount = _int(p, "amount")
            if _need(c, acct(p))[0] < amount:
                raise Refusal(f"insufficient funds: {_str(p, 'account')} cannot pay {amount}")
            return [(acct(p), [-amount, amount])]

        def charge(c: Counters, p: Any) -> Effect:
            amount = _int(p, "amount")
            if _need(c, acct(p))[0] < amount:
                raise Refusal(f"insufficient funds: {_str(p, 'account')} cannot pay {amount}")
            return [(acct(p), [-amount, 0]), ("revenue", [amount])]

        return {
            Op.TRY: try_,
            Op.CONFIRM: lambda c, p: [
                (acct(p), [0, -_int(p, "amount")]),
                ("revenue", [_int(p, "amount")]),
            ],
            Op.CANCEL: lambda c, p: [(acct(p), [_int(p, "amount"), -_int(p, "amount")])],
            Op.ACTION: charge,
            Op.COMPENSATE: lambda c, p: [
                (acct(p), [_int(p, "amount"), 0]),
                ("revenue", [-_int(p, "amount")]),
            ],
        }[op]


class ShippingRules(Rules):
    """slot:<day> -> [capacity, reserved, scheduled]"""

    name = "shipping"
    columns = ("capacity", "reserved", "scheduled")

    def rule(self, op: Op) -> Rule:
        def slot(p: Any) -> str:
            return f"slot:{_str(p, 'slot')}"

        def reserve(sign: list[int]) -> Rule:
            def go(c: Counters, p: Any) -> Effect:
                cap, reserved, scheduled = _need(c, slot(p))
                if reserved + scheduled >= cap:
                    raise Refusal(f"shipping slot {_str(p, 'slot')} is full")
                return [(slot(p), sign)]

            return go

        return {
            Op.TRY: reserve([0, 1, 0]),
            Op.CONFIRM: lambda c, p: [(slot(p), [0, -1, 1])],
            Op.CANCEL: lambda c, p: [(slot(p), [0, -1, 0])],
            Op.ACTION: reserve([0, 0, 1]),
            Op.COMPENSATE: lambda c, p: [(slot(p), [0, 0, -1])],
        }[op]


RULES: dict[str, type[Rules]] = {
    r.name: r for r in (OrderRules, InventoryRules, PaymentRules, ShippingRules)
}


# ---------------------------------------------------------------- persistence


class ServiceStore:
    """A service's own SQLite file: initial counters and the ledger.

    WAL with ``synchronous=NORMAL``: a commit survives the crash of the
    process (what the crash tests do to the coordinator, which hosts these
    simulated services), not the loss of the machine. Ledger rows are
    group-committed like the coordinator's log; a reply is sent only once
    its row is committed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: LoopCommitter[tuple[Any, ...]] = LoopCommitter(
            self._connect, _write_ledger, name=f"{path.stem}-writer"
        )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def create(self, initial: Counters) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            conn.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
                CREATE TABLE IF NOT EXISTS ledger (
                    seq INTEGER PRIMARY KEY, txid TEXT NOT NULL, branch TEXT NOT NULL,
                    op TEXT NOT NULL, kind TEXT NOT NULL, effect BLOB NOT NULL,
                    detail TEXT NOT NULL DEFAULT ''
                );
                """
            )
            conn.execute("INSERT INTO meta(key, value) VALUES ('initial', ?)", (_encode(initial),))
        finally:
            conn.close()

    def load(self) -> tuple[Counters, list[Entry]]:
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist")
        conn = self._connect()
        try:
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'initial'").fetchone()
            except sqlite3.Error as exc:
                raise ValueError(f"{self.path}: not a service database ({exc})") from exc
            if row is None:
                raise ValueError(f"{self.path}: not a service database")
            initial = {k: list(v) for k, v in _decode(row[0]).items()}
            entries = [
                Entry(seq, txid, branch, op, kind, [(k, list(d)) for k, d in _decode(eff)], detail)
                for seq, txid, branch, op, kind, eff, detail in conn.execute(
                    "SELECT seq, txid, branch, op, kind, effect, detail FROM ledger ORDER BY seq"
                )
            ]
            return initial, entries
        finally:
            conn.close()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._writer.start(loop)

    def append(self, entry: Entry) -> None:
        self._writer.append(
            (
                entry.seq,
                entry.txid,
                entry.branch,
                entry.op,
                entry.kind,
                _encode(entry.effect),
                entry.detail,
            )
        )

    def sync(self) -> Completion[Any] | None:
        return self._writer.sync()

    async def close(self) -> None:
        await self._writer.close()


def _write_ledger(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO ledger(seq, txid, branch, op, kind, effect, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


# ---------------------------------------------------------------- the service


class Service:
    """One simulated participant: rules + counters + barrier + ledger."""

    def __init__(
        self, rules: Rules, initial: Counters, *, store: ServiceStore | None = None
    ) -> None:
        self.rules = rules
        self.name = rules.name
        self.initial = {k: list(v) for k, v in initial.items()}
        self.counters: Counters = {k: list(v) for k, v in initial.items()}
        self.ledger: list[Entry] = []
        self.barrier: dict[tuple[str, str, str], Entry] = {}
        self.store = store
        self.duplicates = 0  # deliveries answered from the barrier
        self._waiting: list[tuple[Completion[Reply], Reply]] = []
        self._batch: Completion[Any] | None = None
        self._rules = {op: rules.rule(op) for op in Op}

    @classmethod
    def restore(cls, rules: Rules, store: ServiceStore) -> Service:
        """Rebuild from the service's file: initial counters + replayed ledger."""
        initial, entries = store.load()
        service = cls(rules, initial, store=store)
        for entry in entries:
            service._record(entry, replaying=True)
        return service

    def handle(self, call: Call) -> Reply | Completion[Reply]:
        """Answer ``call`` once its ledger entry is durable."""
        reply = self.execute(call.txid, call.branch, call.op, call.payload)
        if self.store is None:
            return reply
        pending = self.store.sync()
        if pending is None:
            return reply
        fut: Completion[Reply] = Completion()
        self._waiting.append((fut, reply))
        if pending is not self._batch:
            self._batch = pending
            pending.add_done_callback(self._release)
        return fut

    def _release(self, batch: Completion[Any]) -> None:
        waiting, self._waiting = self._waiting, []
        self._batch = None
        failed = batch.exception()
        for fut, reply in waiting:
            if fut.done():
                continue
            if failed is not None:
                # Not durable: the caller must not learn of it (it may be lost).
                fut.set_result(Reply(Outcome.TRANSIENT, error=f"storage error: {failed}"))
            else:
                fut.set_result(reply)

    def execute(self, txid: str, branch: str, op: Op, payload: Any) -> Reply:
        """Apply one operation through the barrier (synchronous, atomic)."""
        # Op is a StrEnum: it hashes and compares as its string value, so keys
        # built from it match keys read back from the database.
        key = (txid, branch, op)
        seen = self.barrier.get(key)
        if seen is not None:
            self.duplicates += 1
            return seen.reply()
        forward = _FORWARD.get(op)
        if forward is not None:
            fwd = self.barrier.get((txid, branch, forward))
            if op is Op.CONFIRM:
                if fwd is None or fwd.kind != APPLIED:
                    return self._answer(
                        txid, branch, op, REJECTED, [], "confirm without an applied try"
                    )
                if (txid, branch, Op.CANCEL) in self.barrier:
                    return self._answer(txid, branch, op, REJECTED, [], "confirm after cancel")
            elif (txid, branch, Op.CONFIRM) in self.barrier and self.barrier[
                (txid, branch, Op.CONFIRM)
            ].kind == APPLIED:
                return self._answer(txid, branch, op, REJECTED, [], f"{op} after confirm")
            elif fwd is None or fwd.kind != APPLIED:
                if fwd is None:
                    # Bar the forward operation from ever applying later.
                    self._answer(
                        txid, branch, forward, BLOCKED, [], f"{op} arrived before {forward}"
                    )
                return self._answer(txid, branch, op, NULL, [], f"nothing to {op}")
        try:
            effect = self._rules[op](self.counters, payload)
        except Refusal as exc:
            return self._answer(txid, branch, op, REFUSED, [], str(exc))
        except BadRequest as exc:
            return self._answer(txid, branch, op, REJECTED, [], str(exc))
        return self._answer(txid, branch, op, APPLIED, effect)

    def _answer(
        self, txid: str, branch: str, op: Op, kind: str, effect: Effect, detail: str = ""
    ) -> Reply:
        entry = Entry(len(self.ledger) + 1, txid, branch, str(op), kind, effect, detail)
        self._record(entry, replaying=False)
        if self.store is not None:
            self.store.append(entry)
        return entry.reply()

    def _record(self, entry: Entry, *, replaying: bool) -> None:
        self.ledger.append(entry)
        key = (entry.txid, entry.branch, entry.op)
        # The barrier keeps the first answer; a second ledger entry for a key
        # can only come from a bug, and the checker counts those.
        self.barrier.setdefault(key, entry)
        counters = self.counters
        for k, deltas in entry.effect:
            row = counters.get(k)
            if row is None:
                row = counters[k] = [0] * len(deltas)
            for i, d in enumerate(deltas):
                row[i] += d

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
