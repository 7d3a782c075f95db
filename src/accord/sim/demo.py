"""Run the reference scenario end to end: seed a shop, run orders, check.

Used by ``accord demo``, ``accord recover`` and ``accord verify``. A run's
directory holds ``run.json`` (its settings), ``coordinator.db`` (the log,
unless ``--store`` put it elsewhere) and ``services/<name>.db``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accord.coordinator import Coordinator, TxnResult
from accord.core.records import TxnStatus
from accord.core.spec import Protocol
from accord.log import Store, open_store
from accord.sim import invariants
from accord.sim.faults import FAULT_KINDS, FaultConfig
from accord.sim.http_demo import RemoteShop, load_secret, new_secret, views_from_state
from accord.sim.http_shop import read_state
from accord.sim.shop import Shop
from accord.sim.workload import ShopConfig, Workload, order_spec
from accord.transport.base import Transport
from accord.transport.http import HttpTransport

Progress = Callable[[int], None]
HTTP_CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class DemoConfig:
    orders: int = 2000
    concurrency: int = 100
    protocol: str = "tcc"
    fault_rate: float = 0.05
    latency_ms: float = 0.0
    seed: int = 1
    data: str = ""
    store: str = ""
    synchronous: str = "FULL"
    call_timeout_s: float = 0.5
    # Keep the services' state in memory only (benchmarks: isolates the
    # coordinator's own cost). Such a run cannot be recovered or verified.
    services_in_memory: bool = False
    # Reach the shop over HTTP: started by the demo, or already running at
    # services_url (then secret_file holds its shared secret).
    http: bool = False
    services_url: str = ""
    secret_file: str = ""

    def __post_init__(self) -> None:
        if self.orders < 1 or self.orders > 10_000_000:
            raise ValueError(f"--orders must be between 1 and 10,000,000, got {self.orders}")
        if not 1 <= self.concurrency <= 100_000:
            raise ValueError(f"--concurrency must be between 1 and 100,000, got {self.concurrency}")
        if self.protocol not in ("tcc", "saga"):
            raise ValueError(f"--protocol must be tcc or saga, got {self.protocol!r}")
        if self.synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"--synchronous must be FULL or NORMAL, got {self.synchronous!r}")
        if not 0 <= self.fault_rate <= 1:  # also false for NaN
            raise ValueError(f"--fault-rate must be between 0 and 1, got {self.fault_rate}")
        if not 0 <= self.latency_ms <= 60_000:
            raise ValueError(f"--latency-ms must be between 0 and 60000, got {self.latency_ms}")


def _store_url(config: DemoConfig, data: Path, *, existing: bool = True) -> str:
    if config.store:
        return config.store
    path = data / "coordinator.db"
    if existing and not path.exists():
        raise FileNotFoundError(f"{path} not found: the run's log is missing")
    return f"sqlite://{path.resolve()}"


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


async def run_demo(config: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    data = Path(config.data)
    if (data / "run.json").exists():
        raise FileExistsError(f"{data} already holds a run; choose a new --data directory")
    data.mkdir(parents=True, exist_ok=True)
    (data / "run.json").write_text(json.dumps(asdict(config), indent=2))
    workload = Workload(ShopConfig(orders=config.orders, seed=config.seed))
    store = open_store(_store_url(config, data, existing=False), synchronous=config.synchronous)
    shop: Shop | RemoteShop
    if config.http:
        shop = await _remote_shop(
            config, data, fault_rate=config.fault_rate, latency_ms=config.latency_ms
        )
        transport: Transport = HttpTransport({shop.url: shop.key})
        base_url = shop.url
    else:
        shop = Shop.create(
            workload.initial_state(), None if config.services_in_memory else data / "services"
        )
        transport = shop.transport(FaultConfig(config.fault_rate, config.latency_ms), config.seed)
        shop.start()
        base_url = ""
    coordinator = Coordinator(store, transport, max_in_flight=config.concurrency)
    protocol = Protocol(config.protocol)
    # Over HTTP a call crosses processes and queues behind others: a short
    # timeout would turn load into timeouts, and timeouts into retries.
    call_timeout_s = (
        max(config.call_timeout_s, HTTP_CALL_TIMEOUT_S) if config.http else config.call_timeout_s
    )
    specs = [
        order_spec(o, protocol, call_timeout_s=call_timeout_s, base_url=base_url)
        for o in workload.orders
    ]
    await coordinator.start()
    results: list[TxnResult] = []
    done = 0

    def finished(fut: asyncio.Future[TxnResult]) -> None:
        nonlocal done
        done += 1
        if not fut.cancelled() and fut.exception() is None:
            results.append(fut.result())
        if progress is not None:
            progress(done)

    # The shop, the workload and the specs live until the end: moved out of
    # the collector's way, they are not traversed by every collection during
    # the run. Measured (20,000 orders, services in memory, SQLite FULL, six
    # runs side by side): a median of ~168 against ~205 us of CPU per transaction.
    # Unfrozen afterwards: the collector sees them again (a process that runs
    # the demo more than once, such as the tests, does not pile them up).
    remote = shop if isinstance(shop, RemoteShop) else None
    services_before = await remote.usage() if remote is not None else None
    gc.freeze()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        futures = []
        for spec in specs:
            fut = await coordinator.submit(spec)
            fut.add_done_callback(finished)
            futures.append(fut)
        await asyncio.gather(*futures, return_exceptions=True)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        gc.unfreeze()
    if isinstance(shop, RemoteShop):
        await shop.refresh()
    summary = await _summarize(coordinator, shop, store, results, elapsed, config.orders, cpu)
    if remote is not None and services_before is not None and results:
        # The services' own process, over the same span (their clock, read
        # just before and after): what serving the calls cost on that side.
        cpu_after, requests_after = await remote.usage()
        requests = requests_after - services_before[1]
        summary["requests"] = requests
        summary["requests_per_s"] = round(requests / elapsed, 1) if elapsed > 0 else 0.0
        summary["services_cpu_us_per_txn"] = round(
            (cpu_after - services_before[0]) / len(results) * 1e6, 1
        )
    summary["data"] = str(data)
    summary["protocol"] = config.protocol
    await coordinator.close()
    await shop.close()
    return summary


async def recover_run(
    data: Path, *, fault_rate: float = 0.0, progress: Progress | None = None
) -> dict[str, Any]:
    """Resume every unfinished transaction of an interrupted run, then check."""
    config = _load_config(data)
    _check_persistent(config)
    store = open_store(_store_url(config, data), synchronous=config.synchronous)
    shop: Shop | RemoteShop
    if config.http:
        shop = await _remote_shop(config, data, fault_rate=fault_rate, latency_ms=0.0)
        transport: Transport = HttpTransport({shop.url: shop.key})
    else:
        shop = Shop.open(data / "services")
        transport = shop.transport(FaultConfig(fault_rate, 0.0), config.seed + 1)
        shop.start()
    coordinator = Coordinator(store, transport, max_in_flight=config.concurrency)
    started = time.perf_counter()
    futures = await coordinator.start()
    results: list[TxnResult] = []
    for i, fut in enumerate(asyncio.as_completed(futures)):
        try:
            results.append(await fut)
        except Exception:  # noqa: BLE001 - counted as not finished below
            continue
        if progress is not None:
            progress(i + 1)
    elapsed = time.perf_counter() - started
    if isinstance(shop, RemoteShop):
        await shop.refresh()
    summary = await _summarize(coordinator, shop, store, results, elapsed, len(futures))
    summary["recovered"] = len(futures)
    summary["recovery_s"] = round(elapsed, 3)
    await coordinator.close()
    await shop.close()
    return summary


async def verify_run(data: Path) -> dict[str, Any]:
    """Check the invariants on the persisted state of a run."""
    config = _load_config(data)
    _check_persistent(config)
    store = open_store(_store_url(config, data), synchronous=config.synchronous)
    await store.open()
    try:
        snaps = await store.snapshots()
    finally:
        await store.close()
    if config.http and not (data / "services").exists():
        remote = RemoteShop(config.services_url, load_secret(Path(config.secret_file)))
        await remote.refresh()
        views = remote.views()
    elif config.http:
        # The services' files: ledgers, and their counters as the live state.
        views = views_from_state(await asyncio.to_thread(read_state, data / "services"))
    else:
        # Persisted state only: no live counters, everything is replayed.
        views = Shop.open(data / "services").views()
        for view in views.values():
            view.counters = None
    report = invariants.check(views, {s.txid: s for s in snaps})
    counts: dict[str, int] = {}
    for s in snaps:
        counts[s.status.value] = counts.get(s.status.value, 0) + 1
    return {
        "data": str(data),
        "transactions": len(snaps),
        "committed": counts.get("committed", 0),
        "aborted": counts.get("aborted", 0),
        "needs_attention": counts.get("needs_attention", 0),
        "stuck": sum(1 for s in snaps if not s.status.terminal),
        "invariants": report.passed(),
        "violations": {k: v[:10] for k, v in report.violations.items() if v},
        "duplicates_applied": report.duplicates_applied,
    }


def _reasons(snaps: list[Any]) -> dict[str, int]:
    """Why transactions aborted, grouped by the kind of reason."""
    kinds = {
        "out of stock": "out_of_stock",
        "insufficient funds": "insufficient_funds",
        "is full": "slot_full",
        "deadline": "deadline",
        "failed after": "attempts_exhausted",
        "presumed abort": "recovered_without_decision",
        "rejected": "rejected",
        "operator": "operator",
    }
    out: dict[str, int] = {}
    for s in snaps:
        if s.status is not TxnStatus.ABORTED:
            continue
        kind = next((k for text, k in kinds.items() if text in s.reason), "other")
        out[kind] = out.get(kind, 0) + 1
    return out


async def _remote_shop(
    config: DemoConfig, data: Path, *, fault_rate: float, latency_ms: float
) -> RemoteShop:
    """The HTTP shop of a run: the one at services_url, or a child process."""
    if config.services_url:
        if not config.secret_file:
            raise ValueError("--services-url needs --secret-file (the services' shared secret)")
        shop = RemoteShop(config.services_url, load_secret(Path(config.secret_file)))
        await shop.wait_ready()
        # Services someone else started: this run's faults are set on them.
        await shop.set_faults(fault_rate, latency_ms)
        return shop
    secret_file = data / "secret"
    url_file = data / "services.url"
    if not secret_file.exists():
        new_secret(secret_file)
    port = 0
    if url_file.exists():  # a later command of the same run: same port, maybe still up
        shop = RemoteShop(url_file.read_text().strip(), load_secret(secret_file))
        if await shop.answers():
            await shop.set_faults(fault_rate, latency_ms)
            return shop
        port = int(shop.url.rsplit(":", 1)[1])
    shop = await RemoteShop.start(
        data / "services", secret_file, orders=config.orders, seed=config.seed,
        fault_rate=fault_rate, latency_ms=latency_ms, port=port,
    )  # fmt: skip
    url_file.write_text(shop.url)
    return shop


def _check_persistent(config: DemoConfig) -> None:
    if config.store == "memory":
        raise ValueError("this run kept its log in memory: nothing of it survives to check")
    if config.services_in_memory:
        raise ValueError("this run kept its services in memory: nothing of them survives")


def _load_config(data: Path) -> DemoConfig:
    path = data / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --data must be a directory of a demo run")
    try:
        settings = json.loads(path.read_text())
        return DemoConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not the settings file of a demo run: {exc}") from exc


async def _summarize(
    coordinator: Coordinator,
    shop: Shop | RemoteShop,
    store: Store,
    results: list[TxnResult],
    elapsed: float,
    total: int,
    cpu_s: float | None = None,
) -> dict[str, Any]:
    await store.flush()
    snaps = await store.snapshots()
    report = invariants.check(shop.views(), {s.txid: s for s in snaps})
    by_status = {status: 0 for status in TxnStatus}
    for r in results:
        by_status[r.status] += 1
    stats = store.stats()
    faults = {kind: shop.fault_counts.get(kind, 0) for kind in FAULT_KINDS}
    faults["refused_while_down"] = shop.fault_counts.get("refused_while_down", 0)
    faults["slow_timeout"] = shop.fault_counts.get("slow_timeout", 0)
    m = coordinator.metrics
    return {
        "orders": total,
        "committed": by_status[TxnStatus.COMMITTED],
        "aborted": by_status[TxnStatus.ABORTED],
        "needs_attention": by_status[TxnStatus.NEEDS_ATTENTION],
        "stuck": sum(1 for s in snaps if not s.status.terminal),
        "unfinished": total - len(results),
        "retries": m.retries,
        "calls": m.calls,
        "call_outcomes": dict(m.outcomes),
        "faults": faults,
        "duplicates_delivered": shop.duplicates_delivered,
        "duplicates_applied": report.duplicates_applied,
        "throughput_tps": round(len(results) / elapsed, 1) if elapsed > 0 else 0.0,
        "duration_s": round(elapsed, 3),
        # CPU of this process (coordinator, log, in-process services) per
        # transaction: steadier than throughput on a shared machine.
        "cpu_us_per_txn": round(cpu_s / len(results) * 1e6, 1) if cpu_s and results else None,
        "latency_ms": _percentiles([r.latency_s for r in results]),
        "log_records": stats.records,
        "log_batches": stats.batches,
        "records_per_batch": round(stats.records_per_batch, 1),
        "log_violations": list(getattr(store, "violations", []))[:10],
        "invariants": report.passed(),
        "violations": {k: v[:10] for k, v in report.violations.items() if v},
        "needs_attention_ids": report.needs_attention[:20],
        "abort_reasons": _reasons(snaps),
    }
