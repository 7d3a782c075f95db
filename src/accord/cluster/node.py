"""A coordinator that is one node of a cluster sharing one PostgreSQL log.

Every transaction id maps to one of N virtual shards
(:func:`~accord.cluster.shards.shard_of`). A node drives the transactions of
the shards it holds a lease on, and only those:

* **Leases.** Every ``ttl_s / 5`` the node heartbeats, renews its leases and
  counts the live members (heartbeat younger than ``ttl_s``), in one
  PostgreSQL transaction. It aims at ``ceil(N / live members)`` shards: it
  takes expired or free ones when it has fewer, and when it has more it
  *drains* the surplus (no new transaction starts in them, those running
  finish, for at most ``drain_s``) and then releases them.
* **Epochs.** Each acquisition of a shard gets a new fencing token. The node
  stamps every log record with the token of the epoch its transaction is
  driven in (:meth:`stamp`), and the log writes a row only if that token is
  still the shard's current one (:mod:`accord.log.postgres`). A node never
  trusts a lease longer than ``(monotonic time at the start of the renewal)
  + 3/4 ttl_s``: after that it sends nothing (the coordinator's ``gate``) and
  appends nothing for the shard, even before it learns that it lost it.
* **Losing a shard** (lapsed, not renewed, a write refused by the fence,
  released): the node stops driving the shard's transactions at once,
  without writing or sending anything; their fate is what the log says, and
  the next owner resumes them from it (presumed abort for those without a
  decision).
* **Acquiring a shard**: the node reads the shard's open transactions from
  the log and resumes them, then accepts new work in it.
* **Submitting** to any node works: a transaction whose shard this node
  holds is driven here; any other goes to the cluster's inbox and is driven
  by its shard's owner (:mod:`accord.cluster.inbox`); its result is read from
  the log.
* **Operator actions** (retry, abort, resolve) reach the shard's owner the
  same way, as requests in the inbox; the owner acts through its
  coordinator, under the shard's current epoch, and answers the request.

What a lease cannot prevent: a call already handed to the network before a
pause (SIGSTOP, a long GC) may still reach the participant after another node
took over. That is safe because of the protocol, not the lease: a confirm is
only ever sent for a commit decision that is durable (and never flips), and
everything else a stale node could send (a try, a cancel of a transaction
without a durable commit) is what the new owner's presumed abort does too;
participants apply each operation at most once and a cancel bars a late try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Collection, Coroutine, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from functools import partial
from typing import Any, TypeVar

from accord.cluster.inbox import Answer, Inbox, outcome, spec_from_bytes
from accord.cluster.leases import LeaseTable, check_node_id, check_schema
from accord.cluster.shards import DEFAULT_SHARDS, check_shards, shard_of
from accord.coordinator import DEFAULT_MAX_IN_FLIGHT, Coordinator, Observer, TxnResult
from accord.core.records import TxnSnapshot, TxnStatus
from accord.core.spec import TransactionSpec
from accord.errors import (
    AccordError,
    CoordinatorClosed,
    Overloaded,
    StoreError,
    TransactionNotFound,
)
from accord.log.base import Fenced
from accord.log.postgres import PostgresStore
from accord.transport.base import Transport

log = logging.getLogger("accord.cluster")

ANSWERED_MEMORY_S = 60.0


def _is_terminal(state: dict[str, Any]) -> bool:
    status = state.get("status")
    return status is not None and TxnStatus(status).terminal


_NOT_APPLICABLE = {
    "retry": "retry applies to a transaction in needs_attention or one with calls to retry",
    "abort": "abort applies to a transaction with no decision yet",
    "resolve": "resolve applies to a transaction in needs_attention",
}
T = TypeVar("T")

DEFAULT_TTL_S = 10.0
# A lease is trusted for this share of its TTL after its renewal started: the
# rest absorbs clock-rate differences and the time to notice a lost lease.
TRUST_SHARE = 0.75
# Log writes are retried (with capped backoff) for this long before the store
# gives up for good and the node stops: fencing makes late writes harmless.
STORE_RETRY_S = 300.0


class LeaseState(StrEnum):
    LOADING = "loading"  # acquired; its open transactions are being read
    READY = "ready"  # driving its transactions, taking new ones
    DRAINING = "draining"  # finishing its transactions before a release


@dataclass(slots=True)
class _Lease:
    shard: int
    token: int
    valid_until: float  # time.monotonic()
    state: LeaseState = LeaseState.LOADING


@dataclass(slots=True)
class NodeStats:
    """What a node did with its leases (counters since it started)."""

    acquired: int = 0
    lost: int = 0  # lapsed, not renewed, or fenced
    released: int = 0
    resumed: int = 0  # open transactions taken over with a shard
    dropped: int = 0  # runs stopped because their shard was lost or released
    gated: int = 0  # participant calls not sent: the lease was no longer valid
    refused_appends: int = 0  # records not even queued: the lease was no longer valid
    fenced: int = 0  # transactions with records the database refused (stale token)
    inbox_taken: int = 0  # submissions picked up from the inbox
    forwarded: int = 0  # submissions put in the inbox for another owner
    operator_requests: int = 0  # operator requests answered


class ClusterNode:
    """One coordinator of a cluster; see the module docstring.

    ::

        node = ClusterNode(dsn, transport, node_id="n1", schema="accord")
        await node.start()
        result = await (await node.submit(spec))
        await node.close()          # drains, then releases its leases
    """

    def __init__(
        self,
        dsn: str,
        transport: Transport,
        *,
        node_id: str,
        schema: str = "accord",
        shards: int = DEFAULT_SHARDS,
        ttl_s: float = DEFAULT_TTL_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        drain_s: float | None = None,
        poll_s: float = 0.5,
        pool_size: int = 4,
        observer: Observer | None = None,
    ) -> None:
        self.node = check_node_id(node_id)
        self.schema = check_schema(schema)
        self.shards = check_shards(shards)
        if not 0.5 <= ttl_s <= 3600:  # also false for NaN
            raise ValueError(f"ttl_s must be between 0.5 and 3600, got {ttl_s}")
        if not 0.01 <= poll_s <= 60:
            raise ValueError(f"poll_s must be between 0.01 and 60, got {poll_s}")
        self.ttl_s = ttl_s
        self.renew_s = ttl_s / 5
        self.trust_s = ttl_s * TRUST_SHARE
        self.drain_s = ttl_s if drain_s is None else drain_s
        if not 0 <= self.drain_s <= 3600:
            raise ValueError(f"drain_s must be between 0 and 3600, got {self.drain_s}")
        self.poll_s = poll_s
        self.stats = NodeStats()
        self.store = PostgresStore(
            dsn,
            schema=schema,
            pool_size=pool_size,
            retries=int(STORE_RETRY_S) + 5,
            max_backoff_s=1.0,
            fence=self,
            idle_in_transaction_timeout_s=ttl_s / 2,
        )
        self.coordinator = Coordinator(
            self.store,
            transport,
            max_in_flight=max_in_flight,
            observer=observer,
            gate=self._gate,
        )
        self.table = LeaseTable(dsn, schema, node_id, shards, ttl_s, on_notify=self._wake)
        self.inbox = Inbox(dsn, schema, shards, via=node_id)
        self.members = 0
        self._leases: dict[int, _Lease] = {}
        # txid -> token of the epoch it is driven in (registered before its
        # run starts; a record or call of another epoch is refused).
        self._epochs: dict[str, int] = {}
        self._driving: dict[int, set[str]] = {}  # shard -> txids driven here
        self._picked: set[str] = set()  # taken from the inbox, not finished
        self._acting: dict[int, str] = {}  # operator request id -> its txid, being acted on
        # Requests answered here lately: a read of the queue that began before
        # the answer was written may still return them.
        self._answered: dict[int, float] = {}
        # Taken-over transactions still waiting for a slot: they go before new work.
        self._resuming = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pickup = asyncio.Event()
        self._open = False  # its loops run
        self._accepting = False  # it takes new work and new shards
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopped: asyncio.Future[BaseException | None] | None = None

    # ------------------------------------------------------------ the fence

    def shard_of(self, txid: str) -> int:
        return shard_of(txid, self.shards)

    def stamp(self, txid: str) -> tuple[int, int] | None:
        """(shard, token) for a record of ``txid``, or None if this node may
        not act for it now: its shard's lease is not held, no longer trusted,
        or of another epoch than the one the transaction is driven in."""
        shard = shard_of(txid, self.shards)
        lease = self._leases.get(shard)
        if (
            lease is None
            or self._epochs.get(txid) != lease.token
            or time.monotonic() >= lease.valid_until
        ):
            self.stats.refused_appends += 1
            return None
        return shard, lease.token

    def fenced(self, stale: set[tuple[int, int]], txids: frozenset[str]) -> None:
        """The log refused rows stamped with these (shard, token) pairs: if
        such a token is the one held, another node took the shard over."""
        self.stats.fenced += len(txids)
        lost = [s for s, token in stale if (lease := self._leases.get(s)) and lease.token == token]
        if lost:
            self._lose(lost, "the log refused its writes: the lease moved to another node")

    def _gate(self, txid: str) -> BaseException | None:
        shard = shard_of(txid, self.shards)
        lease = self._leases.get(shard)
        if (
            lease is not None
            and self._epochs.get(txid) == lease.token
            and time.monotonic() < lease.valid_until
        ):
            return None
        self.stats.gated += 1
        if self._loop is not None:
            self._loop.call_soon(self._check_lapses)
        return Fenced(f"not sent: this node no longer holds shard {shard}", txid=txid)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the log, create the cluster's tables if needed, join."""
        self._loop = asyncio.get_running_loop()
        self.stopped = self._loop.create_future()
        await self.coordinator.start(recover=False)
        try:
            await self.table.ensure_schema()
            await self.inbox.open()
            renewal = await self.table.heartbeat_and_renew({})
        except BaseException:
            await self.coordinator.close()
            await self.table.close()
            await self.inbox.close()
            raise
        self.members = renewal.live_members
        self._open = self._accepting = True
        self._spawn(self._lease_loop(), "leases")
        self._spawn(self._pickup_loop(), "inbox")
        self._spawn(self._watchdog(), "watchdog")
        log.info(
            "node %s joined %s (%d shards, ttl %.1fs)",
            self.node,
            self.schema,
            self.shards,
            self.ttl_s,
        )

    async def close(self, *, drain: bool = True) -> None:
        """Leave the cluster: let running transactions finish (for at most
        ``drain_s``), stop driving the rest, write what is pending, release
        the leases (their shards are free at once) and leave."""
        if not self._open:
            return
        self._accepting = False
        for lease in self._leases.values():
            lease.state = LeaseState.DRAINING
        if drain:  # the lease loop keeps renewing meanwhile
            deadline = time.monotonic() + self.drain_s
            while (self.coordinator.in_flight or self._acting) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self._open = False
        await self._cancel_tasks(keep_current=True)
        held = {s: lease.token for s, lease in self._leases.items()}
        self._lose(held, "the node is leaving", released=True)
        with contextlib.suppress(StoreError):
            await self.store.flush()
        try:
            await self.table.release(held)
            await self.table.leave()
        except StoreError as exc:
            log.warning("node %s: could not release its leases (they expire): %s", self.node, exc)
        await self.coordinator.close()
        await self.table.close()
        await self.inbox.close()
        self._stopped(None)
        log.info("node %s left %s", self.node, self.schema)

    async def kill(self) -> None:
        """Stop at once as a killed process would (for tests and drills):
        nothing pending is written, no lease is released."""
        self._open = self._accepting = False
        self._leases.clear()
        self._epochs.clear()
        self.coordinator.drop(lambda _: True, CoordinatorClosed("the node was killed"))
        await self._cancel_tasks(keep_current=False)
        self.store.terminate()
        self.table.reset()
        self.inbox.terminate()
        await self.coordinator.close()  # the transport; the store is gone already
        self._stopped(None)

    async def __aenter__(self) -> ClusterNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stopped(self, why: BaseException | None) -> None:
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(why)

    async def _cancel_tasks(self, *, keep_current: bool) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if not (keep_current and t is current)]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        task.set_name(f"accord-node-{self.node}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ submitting

    async def submit(self, spec: TransactionSpec) -> asyncio.Future[TxnResult]:
        """Accept ``spec``; returns a future of its result. Driven here if
        this node holds its shard, else put in the inbox (durably, before this
        returns) for the owner, its result then read from the log."""
        if not self._accepting:
            raise CoordinatorClosed("the node is not running")
        shard = shard_of(spec.id, self.shards)
        lease = self._leases.get(shard)
        if lease is not None and lease.state is LeaseState.READY and self._trusted(lease):
            fut = await self._drive(spec, shard, lease.token)
            return self._or_forward(spec, fut)
        return await self._forward(spec)

    async def _drive(
        self, spec: TransactionSpec, shard: int, token: int
    ) -> asyncio.Future[TxnResult]:
        # An entry already there is the epoch of a run of this id going on.
        self._epochs.setdefault(spec.id, token)
        try:
            fut = await self.coordinator.submit(spec)
        except BaseException:
            if spec.id not in self._driving.get(shard, ()):
                self._forget_epoch(spec.id, token)
            raise
        self._track(spec.id, shard, token, fut)
        return fut

    def _or_forward(
        self, spec: TransactionSpec, fut: asyncio.Future[TxnResult]
    ) -> asyncio.Future[TxnResult]:
        """``fut``, or, if the shard is lost before the transaction ends
        here, its outcome from the new owner."""
        assert self._loop is not None
        out: asyncio.Future[TxnResult] = self._loop.create_future()

        def done(f: asyncio.Future[TxnResult]) -> None:
            if out.done():
                return
            exc = CoordinatorClosed("the node stopped") if f.cancelled() else f.exception()
            if isinstance(exc, Fenced) and self._accepting:
                self._spawn(self._follow(spec, out), "follow")
            elif exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(f.result())

        fut.add_done_callback(done)
        return out

    async def _follow(self, spec: TransactionSpec, out: asyncio.Future[TxnResult]) -> None:
        try:
            result = await self._forward(spec)
            value = await result
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            if not out.done():
                out.set_exception(exc)
            return
        if not out.done():
            out.set_result(value)

    async def _forward(self, spec: TransactionSpec) -> asyncio.Future[TxnResult]:
        await self.inbox.put([spec])
        self.stats.forwarded += 1
        return self._spawn(outcome(self.store, spec, inbox=self.inbox), "outcome")

    def _track(self, txid: str, shard: int, token: int, fut: asyncio.Future[TxnResult]) -> None:
        self._driving.setdefault(shard, set()).add(txid)
        fut.add_done_callback(partial(self._run_done, txid, shard, token))

    def _run_done(self, txid: str, shard: int, token: int, fut: asyncio.Future[TxnResult]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved: a dropped run's error is expected
        if self._epochs.get(txid) == token:
            del self._epochs[txid]
            driving = self._driving.get(shard)
            if driving is not None:
                driving.discard(txid)
        self._pickup.set()  # a slot is free

    def _forget_epoch(self, txid: str, token: int) -> None:
        if self._epochs.get(txid) == token:
            del self._epochs[txid]

    # ------------------------------------------------------------ leases

    def _trusted(self, lease: _Lease) -> bool:
        return time.monotonic() < lease.valid_until

    def _wake(self) -> None:
        self._pickup.set()

    async def _lease_loop(self) -> None:
        await asyncio.sleep(self.renew_s)  # let nodes starting together see each other
        while self._open:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._round(), timeout=self.ttl_s / 2)
            except (StoreError, TimeoutError) as exc:
                log.warning("node %s: lease round failed: %r", self.node, exc)
                self.table.reset()
            except Exception:  # the loop must outlive a bug in one round
                log.exception("node %s: lease round failed", self.node)
                self.table.reset()
            self._check_lapses()
            if self.store.failed is not None:
                log.error(
                    "node %s: the log writer failed for good: %s", self.node, self.store.failed
                )
                self._lose(list(self._leases), "the log cannot be written")
                self._stopped(self.store.failed)
                return
            await asyncio.sleep(max(0.0, self.renew_s - (time.monotonic() - started)))

    async def _round(self) -> None:
        started = time.monotonic()
        held = {s: lease.token for s, lease in self._leases.items() if lease.valid_until > started}
        renewal = await self.table.heartbeat_and_renew(held)
        self.members = renewal.live_members
        lost = []
        for shard, token in held.items():
            lease = self._leases.get(shard)
            if lease is None or lease.token != token:
                continue
            if shard in renewal.renewed:
                lease.valid_until = max(lease.valid_until, started + self.trust_s)
            else:
                lost.append(shard)
        if lost:
            self._lose(lost, "its lease was not renewed (expired or taken over)")
        await self._rebalance(started)

    async def _rebalance(self, started: float) -> None:
        if not self._accepting:
            return
        target = math.ceil(self.shards / max(self.members, 1))
        active = [
            lease for lease in self._leases.values() if lease.state is not LeaseState.DRAINING
        ]
        draining = [lease for lease in self._leases.values() if lease.state is LeaseState.DRAINING]
        if len(active) > target:
            # Drain the shards with the fewest transactions running here.
            surplus = sorted(active, key=lambda lease: len(self._driving.get(lease.shard, ())))
            self._drain([lease.shard for lease in surplus[: len(active) - target]])
            return
        deficit = target - len(active)
        for lease in draining[:deficit]:  # members left: keep what was being given up
            lease.state = LeaseState.READY
            deficit -= 1
        if deficit <= 0:
            return
        got = await self.table.acquire(deficit, exclude=list(self._leases))
        if not got:
            return
        for shard, token in got.items():
            self._leases[shard] = _Lease(shard, token, started + self.trust_s)
        self.stats.acquired += len(got)
        log.info("node %s acquired %d shards", self.node, len(got))
        self._spawn(self._adopt(got), "adopt")

    async def _adopt(self, got: dict[int, int]) -> None:
        """Resume the open transactions of freshly acquired shards, then take
        new work in them."""
        delay = 0.05
        while True:
            mine = self._still_mine(got)
            if not mine:
                return
            try:
                snaps = await self.store.load_active(shards=mine)
                # Parked there meanwhile, maybe by another node: a retry reopens them.
                await self.store.load_parked(shards=mine)
                break
            except StoreError as exc:
                log.warning("node %s: cannot read shards it acquired: %s", self.node, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        mine = self._still_mine(got)  # re-checked after the read, no await until READY
        # Runs of an earlier epoch of these shards would act with the new token: none may remain.
        self.stats.dropped += self.coordinator.drop(
            lambda t: shard_of(t, self.shards) in mine, Fenced("superseded by a new epoch")
        )
        snaps = [snap for snap in snaps if shard_of(snap.txid, self.shards) in mine]
        self.store.adopt(snaps)
        for snap in snaps:
            self._epochs[snap.txid] = got[shard_of(snap.txid, self.shards)]
        for shard in mine:
            self._leases[shard].state = LeaseState.READY
        self._resuming += len(snaps)
        try:
            await self._resume(snaps, got)
        finally:
            self._resuming -= len(snaps)
            self._pickup.set()
        if snaps:
            log.info("node %s resumed %d open transactions", self.node, len(snaps))

    async def _resume(self, snaps: list[TxnSnapshot], got: dict[int, int]) -> None:
        for snap in snaps:
            shard = shard_of(snap.txid, self.shards)
            lease = self._leases.get(shard)
            if lease is None or lease.token != got[shard] or lease.state is not LeaseState.READY:
                continue  # lost or being given up meanwhile: the next owner resumes it
            try:
                futures = await self.coordinator.resume_snapshots([snap])
            except CoordinatorClosed:
                return
            for fut in futures:
                self._track(snap.txid, shard, got[shard], fut)
            self.stats.resumed += len(futures)

    def _still_mine(self, got: dict[int, int]) -> set[int]:
        return {
            s for s, token in got.items() if (lease := self._leases.get(s)) and lease.token == token
        }

    def _drain(self, shards: list[int]) -> None:
        for shard in shards:
            self._leases[shard].state = LeaseState.DRAINING
        tokens = {s: self._leases[s].token for s in shards}
        log.info("node %s drains %d shards", self.node, len(shards))
        self._spawn(self._release_after_drain(tokens), "drain")

    async def _release_after_drain(self, tokens: dict[int, int]) -> None:
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline and any(self._driving.get(s) for s in tokens):
            await asyncio.sleep(0.05)
        held = {
            s: token
            for s, token in tokens.items()
            if (lease := self._leases.get(s))
            and lease.token == token
            and lease.state is LeaseState.DRAINING
        }
        if not held:
            return
        self._lose(held, "released to rebalance", released=True)
        with contextlib.suppress(StoreError):
            await self.store.flush()  # what was appended under these tokens
        try:
            await self.table.release(held)
        except StoreError as exc:
            log.warning("node %s: release failed (the leases will expire): %s", self.node, exc)

    def _check_lapses(self) -> None:
        now = time.monotonic()
        lapsed = [s for s, lease in self._leases.items() if lease.valid_until <= now]
        if lapsed:
            self._lose(lapsed, "its lease lapsed before it was renewed")

    async def _watchdog(self) -> None:
        while self._open:
            await asyncio.sleep(self.renew_s / 2)
            self._check_lapses()

    def _lose(self, shards: Iterable[int], why: str, *, released: bool = False) -> None:
        """Stop acting for these shards at once: no more sends, no more
        appends; runs dropped without a word to anyone."""
        lost = {s for s in shards if self._leases.pop(s, None) is not None}
        if not lost:
            return
        dropped = self.coordinator.drop(
            lambda t: shard_of(t, self.shards) in lost,
            Fenced(f"stopped: this node no longer holds the shard ({why})"),
        )
        self.store.forget(lost)
        for txid in [t for t in self._epochs if shard_of(t, self.shards) in lost]:
            del self._epochs[txid]
        for shard in lost:
            self._driving.pop(shard, None)
        self.stats.dropped += dropped
        if released:
            self.stats.released += len(lost)
            log.info("node %s released %d shards (%s)", self.node, len(lost), why)
        else:
            self.stats.lost += len(lost)
            log.warning(
                "node %s lost %d shards (%s); stopped %d transactions",
                self.node,
                len(lost),
                why,
                dropped,
            )

    # ------------------------------------------------------------ the inbox

    async def _pickup_loop(self) -> None:
        while self._open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pickup.wait(), self.poll_s)
            self._pickup.clear()
            try:
                await self._take_from_inbox()
                await self._take_requests()
            except StoreError as exc:
                log.warning("node %s: cannot read the inbox: %s", self.node, exc)
                await asyncio.sleep(self.poll_s)

    async def _take_from_inbox(self) -> None:
        ready = self._ready_shards()
        free = self.coordinator.max_in_flight - self.coordinator.in_flight
        if not ready or free <= 0 or not self._accepting or self._resuming:
            return
        rows = await self.inbox.take(ready, free + len(self._picked))
        for txid, blob in rows:
            if txid in self._picked or not self._accepting:
                continue
            shard = shard_of(txid, self.shards)
            lease = self._leases.get(shard)
            if lease is None or lease.state is not LeaseState.READY or not self._trusted(lease):
                continue
            try:
                spec = spec_from_bytes(blob)
                fut = await self._drive(spec, shard, lease.token)
            except AccordError as exc:
                log.error("node %s: inbox submission %s not started: %s", self.node, txid, exc)
                continue
            self._picked.add(txid)
            fut.add_done_callback(partial(self._unpick, txid))
            self.stats.inbox_taken += 1

    def _unpick(self, txid: str, _: asyncio.Future[TxnResult]) -> None:
        self._picked.discard(txid)

    # ------------------------------------------------------------ operators

    async def _take_requests(self) -> None:
        ready = self._ready_shards()
        if not ready or not self._accepting:
            return
        now = time.monotonic()
        for request_id, until in list(self._answered.items()):
            if until <= now:
                del self._answered[request_id]
        busy = set(self._acting.values())
        for request_id, txid, action, reason in await self.inbox.requests(ready, 100):
            # One action at a time per transaction (the next waits for a later
            # poll); none again for a request answered since the read began.
            if request_id in self._acting or request_id in self._answered or txid in busy:
                continue
            self._acting[request_id] = txid
            busy.add(txid)
            self._spawn(self._answer(request_id, txid, action, reason), "operator")

    async def _answer(self, request_id: int, txid: str, action: str, reason: str) -> None:
        try:
            shard = shard_of(txid, self.shards)
            lease = self._leases.get(shard)
            answered = await self.operate(txid, action, reason)
            if (
                answered is not None  # else: not this node's to answer now
                and lease is not None
                and await self.inbox.answer(request_id, *answered, shard=shard, token=lease.token)
            ):
                self.stats.operator_requests += 1
                self._answered[request_id] = time.monotonic() + ANSWERED_MEMORY_S
        except StoreError as exc:  # the request stays queued: tried again later
            log.warning("node %s: operator request %d: %s", self.node, request_id, exc)
        finally:
            del self._acting[request_id]

    async def operate(self, txid: str, action: str, reason: str) -> Answer | None:
        """An operator's ``action`` (retry, abort, resolve) on ``txid``, whose
        shard this node must hold: (code, answer), as the API answers it --
        200 done (resolved, or the retry or abort already finished), 202 under
        way, 404 unknown id, 409 the action does not apply to the
        transaction's state -- or None if this node cannot act for the shard
        now, or lost it meanwhile (its owner will)."""
        shard = shard_of(txid, self.shards)
        lease = self._leases.get(shard)
        if lease is None or lease.state is LeaseState.LOADING or not self._trusted(lease):
            return None
        token = lease.token
        driven = txid in self._driving.get(shard, ())
        # The action's records (and the run it may start) belong to this epoch.
        self._epochs.setdefault(txid, token)
        c = self.coordinator
        started: asyncio.Future[TxnResult] | None = None
        try:
            if action == "retry":
                done: asyncio.Future[TxnResult] | TxnStatus | None = await c.retry(txid, reason)
            elif action == "abort":
                done = await c.abort_any(txid, reason)
            elif action == "resolve":
                done = await c.resolve(txid, reason)
            else:
                return 400, {"txid": txid, "error": f"unknown action {action!r}"}
            if isinstance(done, asyncio.Future):
                started = done
            await self.store.flush()  # the answer means "recorded"
        except TransactionNotFound:
            return 404, {"txid": txid, "error": f"no transaction {txid!r}"}
        except (CoordinatorClosed, Overloaded, Fenced, StoreError):
            return None  # the request waits for a node (this one, later) that can act
        except AccordError as exc:  # the log read back disagrees: the state changed
            done, started = None, None
            refused = str(exc)
        else:
            refused = _NOT_APPLICABLE[action]
        finally:
            self._settle_epoch(txid, shard, token, driven, started)
        now_held = self._leases.get(shard)
        if now_held is None or now_held.token != token or not self._trusted(now_held):
            return None  # what it saw may be stale: the shard's owner answers
        state = await self._state_of(txid)
        if done is None:
            return 409, {"txid": txid, "action": action, **state, "error": refused}
        if isinstance(done, TxnStatus) or (
            started is not None and started.done() and _is_terminal(state)
        ):
            return 200, {"txid": txid, "action": action, **state}
        return 202, {"txid": txid, "action": action, **state}

    def _settle_epoch(
        self,
        txid: str,
        shard: int,
        token: int,
        driven: bool,
        started: asyncio.Future[TxnResult] | None,
    ) -> None:
        """After an operator's action: a run it started is tracked in its
        epoch while the shard is still held in that epoch (a lost shard's
        runs were dropped); otherwise the epoch is forgotten, unless some run
        (this action's or another's) drives the transaction now."""
        if driven:
            return
        lease = self._leases.get(shard)
        held = lease is not None and lease.token == token
        if started is not None and held:
            self._track(txid, shard, token, started)
        elif self.coordinator.live(txid) is None and txid not in self._driving.get(shard, ()):
            self._forget_epoch(txid, token)

    async def _state_of(self, txid: str) -> dict[str, Any]:
        """The transaction's status, decision and reason: as driven here, or as logged."""
        now: Any = self.coordinator.live(txid) or await self.store.get(txid)
        if now is None:
            return {}
        decision = now.decision.value if now.decision is not None else None
        return {"status": now.status.value, "decision": decision, "reason": now.reason}

    def _ready_shards(self) -> list[int]:
        now = time.monotonic()
        return [
            s
            for s, lease in self._leases.items()
            if lease.state is LeaseState.READY and lease.valid_until > now
        ]

    # ------------------------------------------------------------ status

    def owned(self) -> dict[int, str]:
        """shard -> state of every lease held now."""
        return {s: lease.state.value for s, lease in sorted(self._leases.items())}

    def status(self) -> dict[str, Any]:
        states = list(self.owned().values())
        return {
            "node": self.node,
            "schema": self.schema,
            "open": self._accepting,
            "fenced_rows": self.store.fenced_records,
            "members": self.members,
            "shards": {state.value: states.count(state.value) for state in LeaseState},
            "in_flight": self.coordinator.in_flight,
            "committed": self.coordinator.metrics.committed,
            "aborted": self.coordinator.metrics.aborted,
            "needs_attention": self.coordinator.metrics.needs_attention,
            **asdict(self.stats),
        }

    def owns(self, shards: Collection[int]) -> bool:
        return all(s in self._leases for s in shards)


__all__ = ["DEFAULT_TTL_S", "ClusterNode", "LeaseState", "NodeStats"]
