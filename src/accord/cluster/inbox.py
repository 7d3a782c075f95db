"""Submissions and operator requests waiting for their shard's owner, and
clients that submit them.

A transaction may be submitted to any node, or by a process that is no node
at all (:class:`ClusterClient`). If the submitting node does not own the
transaction's shard, the spec goes into the ``inbox`` table: the insert's
commit is the submission's acceptance, durable from then on. The shard's
owner picks it up (woken by ``NOTIFY``, or by polling), and writes its
``Begin``; the batch that writes the Begin deletes the inbox row in the same
PostgreSQL transaction, so a submission is begun once, whoever owns the shard
when it is picked up. Its outcome is read from the log.

Acceptance checks the id first: an id already in the log or in the inbox with
a different spec is refused (:class:`~accord.errors.DuplicateTransaction`);
with the same spec the submission is the same transaction. The check and the
pickup can race (a different spec accepted in the inbox while another node
begins the id): the owner then finds the id begun and drops the inbox row,
and the waiter, comparing specs, reports the conflict.

An operator's retry, abort or resolve of a transaction goes the same way
(``operator_request``): the shard's owner acts on it through its coordinator
and writes the answer (an HTTP-like code and the transaction's state) into
the request's row, where the client reads it. An owner acts on one request
of a transaction at a time, and answers only while it still holds the
shard's lease in the epoch it acted in (the answer's UPDATE checks the
lease), so a node that lost the shard meanwhile leaves the request to the
new owner. A request is answered after the action, so a node that dies in
between leaves it to the next owner, who acts again: the second answer is
then 409 (the transaction is no longer in the state the action applies to).
A request nobody answers stays queued.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import Collection, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import msgspec

from accord.cluster.leases import _TRANSIENT, check_schema, inbox_channel
from accord.cluster.shards import shard_of
from accord.coordinator import TxnResult
from accord.core.spec import MAX_ID_LENGTH, TransactionSpec
from accord.errors import (
    AccordError,
    DuplicateTransaction,
    InvalidTransaction,
    StoreError,
    TransactionNotFound,
)
from accord.log.postgres import PostgresStore

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

MAX_BATCH = 10_000

Request = tuple[int, str, str, str]
"""An operator's request: (id, txid, action, reason)."""

Answer = tuple[int, dict[str, Any]]
"""An operator's request answered: an HTTP-like code and the transaction's state."""


def spec_bytes(spec: TransactionSpec) -> bytes:
    return _encode(spec.to_dict())


def spec_from_bytes(blob: bytes) -> TransactionSpec:
    try:
        return TransactionSpec.from_dict(_decode(blob))
    except (msgspec.DecodeError, InvalidTransaction, TypeError, ValueError) as exc:
        raise StoreError(f"unreadable spec in the inbox: {exc}") from exc


class Inbox:
    """The inbox table of one cluster, over a small pool of its own."""

    def __init__(self, dsn: str, schema: str, shards: int, *, via: str = "client") -> None:
        self.dsn = dsn
        self.schema = check_schema(schema)
        self.shards = shards
        self.via = via
        self._pool: Any = None
        s = self.schema
        self._begun = f"SELECT txid, body FROM {s}.log WHERE kind = 'begin' AND txid = ANY($1)"
        self._insert = (
            f"INSERT INTO {s}.inbox(txid, shard, spec, via)"
            " SELECT u.txid, u.shard, u.spec, $4"
            " FROM unnest($1::text[], $2::int[], $3::bytea[]) AS u(txid, shard, spec)"
            " ON CONFLICT (txid) DO NOTHING RETURNING txid"
        )
        self._waiting = f"SELECT txid, spec FROM {s}.inbox WHERE txid = ANY($1)"
        self._request = (
            f"INSERT INTO {s}.operator_request(txid, shard, action, reason)"
            " VALUES ($1, $2, $3, $4) RETURNING id"
        )
        self._requests = (
            f"SELECT id, txid, action, reason FROM {s}.operator_request"
            " WHERE answered_at IS NULL AND shard = ANY($1::int[]) ORDER BY id LIMIT $2"
        )
        # Answered only by the holder of the shard's lease in that epoch.
        self._answer = (
            f"UPDATE {s}.operator_request SET answered_at = clock_timestamp(),"
            " answered_by = $2, code = $3, answer = $4::jsonb"
            f" WHERE id = $1 AND answered_at IS NULL AND EXISTS (SELECT 1 FROM {s}.shard_lease"
            " WHERE shard = $5 AND token = $6 AND owner = $2 AND expires_at > now() FOR SHARE)"
        )
        self._answer_of = f"SELECT code, answer FROM {s}.operator_request WHERE id = $1"
        self._take = (
            f"SELECT txid, spec FROM {s}.inbox WHERE shard = ANY($1::int[])"
            " ORDER BY submitted_at LIMIT $2"
        )

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=2,
                timeout=10,
                server_settings={"application_name": f"accord-inbox:{self.schema}"},
            )
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to the inbox of {self.schema}: {exc!r}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except TimeoutError:
                pool.terminate()

    def terminate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def _call(self, what: str, fn: Any) -> Any:
        if self._pool is None:
            raise StoreError("the inbox is closed")
        for attempt in (1, 2):  # once more on a new connection if the first broke
            try:
                async with self._pool.acquire() as conn:
                    try:
                        return await fn(conn)
                    except _TRANSIENT:
                        with contextlib.suppress(asyncpg.InterfaceError):
                            conn.terminate()  # unless asyncpg released it already
                        raise
            except _TRANSIENT as exc:
                if attempt == 2:
                    raise StoreError(f"{what}: {exc!r}") from exc
            except asyncpg.PostgresError as exc:
                raise StoreError(f"{what}: {exc}") from exc
        raise AssertionError("unreachable")

    async def put(self, specs: Sequence[TransactionSpec]) -> None:
        """Accept ``specs`` durably (all or none). An id that exists with a
        different spec (in the log or waiting here) refuses the whole batch."""
        if not specs:
            return
        if len(specs) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} submissions at once, got {len(specs)}")
        blobs = {spec.id: spec_bytes(spec) for spec in specs}
        if len(blobs) != len(specs):
            raise DuplicateTransaction("the same id twice in one submission")

        async def go(conn: Any) -> None:
            async with conn.transaction():
                ids = builtins.list(blobs)
                begun = set()
                for txid, body in await conn.fetch(self._begun, ids):
                    logged = _encode(TransactionSpec.from_dict(_decode(body)["spec"]).to_dict())
                    if logged != blobs[txid]:
                        raise _conflict(txid)
                    begun.add(txid)
                rest = [t for t in ids if t not in begun]
                if not rest:
                    return
                inserted = await conn.fetch(
                    self._insert,
                    rest,
                    [shard_of(t, self.shards) for t in rest],
                    [blobs[t] for t in rest],
                    self.via,
                )
                taken = {r[0] for r in inserted}
                others = [t for t in rest if t not in taken]
                if others:
                    for txid, blob in await conn.fetch(self._waiting, others):
                        if bytes(blob) != blobs[txid]:
                            raise _conflict(txid)
                await conn.execute("SELECT pg_notify($1, '')", inbox_channel(self.schema))

        await self._call("cannot submit to the inbox", go)

    async def take(self, shards: Collection[int], limit: int) -> list[tuple[str, bytes]]:
        """The oldest submissions waiting in these shards (they stay in the
        inbox until their Begin is written)."""
        if not shards or limit <= 0:
            return []

        async def go(conn: Any) -> list[tuple[str, bytes]]:
            rows = await conn.fetch(self._take, sorted(shards), limit)
            return [(r[0], bytes(r[1])) for r in rows]

        taken: list[tuple[str, bytes]] = await self._call("cannot read the inbox", go)
        return taken

    async def waiting(self, txid: str) -> bool:
        """Whether ``txid`` waits in the inbox for its shard's owner."""

        async def go(conn: Any) -> bool:
            return bool(await conn.fetch(self._waiting, [txid]))

        found: bool = await self._call("cannot read the inbox", go)
        return found

    async def request(self, txid: str, action: str, reason: str) -> int:
        """Queue an operator's ``action`` on ``txid`` (durably); its id."""
        if action not in OPERATOR_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(OPERATOR_ACTIONS)}, got {action!r}")

        async def go(conn: Any) -> int:
            async with conn.transaction():
                shard = shard_of(txid, self.shards)
                found = await conn.fetchval(self._request, txid, shard, action, reason)
                await conn.execute("SELECT pg_notify($1, '')", inbox_channel(self.schema))
            return int(found)

        queued: int = await self._call("cannot queue the operator's request", go)
        return queued

    async def requests(self, shards: Collection[int], limit: int) -> list[Request]:
        """Unanswered operator requests in these shards, oldest first:
        (id, txid, action, reason)."""
        if not shards or limit <= 0:
            return []

        async def go(conn: Any) -> list[Request]:
            rows = await conn.fetch(self._requests, sorted(shards), limit)
            return [(r[0], r[1], r[2], r[3]) for r in rows]

        found: list[Request] = await self._call("cannot read requests", go)
        return found

    async def answer(
        self, request_id: int, code: int, answer: dict[str, Any], *, shard: int, token: int
    ) -> bool:
        """Answer a request as the holder of ``shard``'s lease in epoch
        ``token`` (``via`` is the node); False if it is answered already or
        the lease moved on (the request then waits for the shard's owner)."""

        async def go(conn: Any) -> bool:
            done = await conn.execute(
                self._answer, request_id, self.via, code, _encode(answer).decode(), shard, token
            )
            return bool(done == "UPDATE 1")

        answered: bool = await self._call("cannot answer the operator's request", go)
        return answered

    async def answer_of(self, request_id: int) -> Answer | None:
        """(code, answer) of a request, None while it waits."""

        async def go(conn: Any) -> Answer | None:
            row = await conn.fetchrow(self._answer_of, request_id)
            if row is None:
                raise StoreError(f"no operator request {request_id}")
            if row[0] is None:
                return None
            return int(row[0]), dict(_decode(row[1]))

        found: Answer | None = await self._call("cannot read the answer", go)
        return found


OPERATOR_ACTIONS = ("retry", "abort", "resolve")
MAX_REASON_CHARS = 1000


def _conflict(txid: str) -> DuplicateTransaction:
    return DuplicateTransaction(f"transaction {txid!r} exists with a different spec", txid=txid)


async def outcome(
    store: PostgresStore,
    spec: TransactionSpec,
    *,
    timeout_s: float | None = None,
    inbox: Inbox | None = None,
) -> TxnResult:
    """Wait until ``spec``'s transaction is terminal in the log, polling.

    With ``inbox``, an id found neither in the log nor waiting in the inbox
    (the Begin's batch moves it from one to the other atomically, so that
    means it was purged, or never accepted) raises TransactionNotFound
    instead of waiting forever."""
    started = time.monotonic()
    delay = 0.02
    want = spec_bytes(spec)
    while True:
        try:
            snap = await store.get(spec.id)
            if snap is None and inbox is not None and not await inbox.waiting(spec.id):
                snap = await store.get(spec.id)  # begun between the two reads?
                if snap is None:
                    raise TransactionNotFound(
                        f"transaction {spec.id!r} is neither in the log nor in the inbox"
                        " (purged, or never accepted): submit it again",
                        txid=spec.id,
                    )
        except StoreError as exc:
            if exc.txid is not None:  # its records do not hold together: no outcome to wait for
                raise
            snap = None  # the database is away: keep waiting
        if snap is not None:
            if spec_bytes(snap.spec) != want:
                raise _conflict(spec.id)
            if snap.status.terminal:
                latency_s = time.monotonic() - started
                return TxnResult(spec.id, snap.status, snap.reason, snap.branches, latency_s)
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"transaction {spec.id!r} is not terminal after {timeout_s} s")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


class ClusterClient:
    """Submits transactions to a cluster without being one of its nodes.

    ::

        async with ClusterClient("postgresql://...", schema="accord") as client:
            await client.submit_many(specs)          # accepted: durable from here on
            result = await client.result(specs[0])   # read from the log
    """

    def __init__(self, dsn: str, *, schema: str = "accord") -> None:
        self.dsn = dsn
        self.schema = check_schema(schema)
        self.store = PostgresStore(dsn, schema=schema, pool_size=2)
        self.inbox: Inbox | None = None

    async def open(self) -> None:
        await self.store.open()
        shards = self.store.cluster_shards
        if shards is None:
            await self.store.close()
            raise StoreError(
                f"schema {self.schema} is not a cluster's log yet: start a node on it first"
            )
        self.inbox = Inbox(self.dsn, self.schema, shards)
        await self.inbox.open()

    async def close(self) -> None:
        if self.inbox is not None:
            await self.inbox.close()
        await self.store.close()

    async def __aenter__(self) -> ClusterClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit_many(self, specs: Sequence[TransactionSpec]) -> None:
        """Accept ``specs`` (all or none); their owners will drive them."""
        if self.inbox is None:
            raise AccordError("the client is not open")
        for start in range(0, len(specs), MAX_BATCH):
            await self.inbox.put(specs[start : start + MAX_BATCH])

    async def submit(self, spec: TransactionSpec) -> TxnResult:
        """Submit ``spec`` and wait until it is terminal."""
        await self.submit_many([spec])
        return await self.result(spec)

    async def result(self, spec: TransactionSpec, *, timeout_s: float | None = None) -> TxnResult:
        return await outcome(self.store, spec, timeout_s=timeout_s, inbox=self.inbox)

    async def operate(
        self, txid: str, action: str, reason: str, *, timeout_s: float = 30.0
    ) -> Answer | None:
        """An operator's ``action`` (retry, abort, resolve) on ``txid``, acted
        on by its shard's owner: (code, answer) as the API answers it, or None
        if no node answered within ``timeout_s`` (the request stays queued and
        is acted on when an owner picks it up)."""
        if self.inbox is None:
            raise AccordError("the client is not open")
        if not isinstance(txid, str) or not txid or len(txid) > MAX_ID_LENGTH:
            raise ValueError(
                f"txid must be a non-empty string of at most {MAX_ID_LENGTH} characters"
            )
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise ValueError(
                f"reason must be a non-empty text of at most {MAX_REASON_CHARS} characters"
            )
        if not 0 < timeout_s <= 3600:
            raise ValueError(f"timeout_s must be in (0, 3600], got {timeout_s}")
        request_id = await self.inbox.request(txid, action, reason)
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            answered = await self.inbox.answer_of(request_id)
            if answered is not None or time.monotonic() >= deadline:
                return answered
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)


__all__ = [
    "OPERATOR_ACTIONS",
    "Answer",
    "ClusterClient",
    "Inbox",
    "outcome",
    "spec_bytes",
    "spec_from_bytes",
]
