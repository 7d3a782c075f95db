"""``accord demo | recover | verify | services | serve | txn ...``."""

from __future__ import annotations

import datetime as dt
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import uvicorn
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from accord.cli import remote
from accord.cli._loop import run
from accord.cli._options import CaFileOption, ClientCertOption
from accord.cli.cluster import cluster_app
from accord.core.records import BranchSummary, TxnStatus
from accord.errors import AccordError
from accord.log import MemoryStore, Store, open_store
from accord.observability import tracing_from_env
from accord.server.limits import Limits
from accord.server.run import (
    ServeOptions,
    load_keys,
    load_tokens,
    serve_forever,
    server_config,
)
from accord.sim.demo import DemoConfig, recover_run, run_demo, verify_run
from accord.sim.http_demo import load_secret, new_secret
from accord.sim.http_shop import KEY_ID, Faults, build_app, create_databases
from accord.sim.http_shop_pg import PgShop
from accord.sim.workload import ShopConfig, Workload
from accord.transport.http import read_tls

app = typer.Typer(
    help="accord: a distributed transaction coordinator (TCC and saga).",
    no_args_is_help=True,
    add_completion=False,
)
txn_app = typer.Typer(help="Inspect the transactions in a log.", no_args_is_help=True)
app.add_typer(txn_app, name="txn")
app.add_typer(cluster_app, name="cluster")
remote.register(txn_app)

err = Console(stderr=True)
out = Console()


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def _progress(total: int, label: str, enabled: bool) -> tuple[Any, Any]:
    if not enabled or total == 0:
        return None, None
    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task(label, total=total)
    return bar, lambda done: bar.update(task, completed=done)


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key in (
        "orders",
        "recovered",
        "transactions",
        "committed",
        "aborted",
        "needs_attention",
        "stuck",
        "retries",
        "duplicates_delivered",
        "duplicates_applied",
        "throughput_tps",
        "requests_per_s",
        "duration_s",
        "recovery_s",
    ):
        if key in summary:
            table.add_row(key.replace("_", " "), str(summary[key]))
    if summary.get("cpu_us_per_txn") is not None:
        cpu = f"{summary['cpu_us_per_txn']} us here"
        if "services_cpu_us_per_txn" in summary:
            cpu += f", {summary['services_cpu_us_per_txn']} us in the services"
        table.add_row("CPU per transaction", cpu)
    if "latency_ms" in summary:
        lat = summary["latency_ms"]
        table.add_row("latency p50/p95/p99", f"{lat['p50']} / {lat['p95']} / {lat['p99']} ms")
    if "records_per_batch" in summary:
        table.add_row(
            "log group commit",
            f"{summary['log_records']} records in {summary['log_batches']} commits "
            f"({summary['records_per_batch']} per commit)",
        )
    if summary.get("faults"):
        faults = ", ".join(f"{k} {v}" for k, v in summary["faults"].items() if v)
        table.add_row("faults injected", faults or "none")
    if summary.get("abort_reasons"):
        table.add_row(
            "abort reasons", ", ".join(f"{k} {v}" for k, v in summary["abort_reasons"].items())
        )
    out.print(table)
    inv = Table(title="Invariants", title_justify="left")
    inv.add_column("invariant")
    inv.add_column("result")
    for name, ok in summary["invariants"].items():
        inv.add_row(name, "[green]pass[/]" if ok else "[bold red]FAIL[/]")
    out.print(inv)
    for name, problems in summary.get("violations", {}).items():
        for problem in problems:
            out.print(f"[red]{name}[/]: {problem}")


def _finish(summary: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary(title, summary)
    if not all(summary["invariants"].values()):
        raise typer.Exit(1)


@app.command()
def demo(
    orders: Annotated[int, typer.Option(help="Orders to run.")] = 2000,
    concurrency: Annotated[int, typer.Option(help="Transactions in flight at once.")] = 100,
    protocol: Annotated[str, typer.Option(help="tcc or saga.")] = "tcc",
    fault_rate: Annotated[float, typer.Option(help="Probability of a fault per call.")] = 0.05,
    latency_ms: Annotated[float, typer.Option(help="Median injected latency (0 = none).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the faults.")] = 1,
    data: Annotated[
        Path | None, typer.Option(help="Directory for the log and the services' databases.")
    ] = None,
    store: Annotated[
        str, typer.Option(help="Log URL: sqlite:///PATH, postgresql://... or memory.")
    ] = "",
    synchronous: Annotated[
        str, typer.Option(help="SQLite log durability: FULL (default) or NORMAL.")
    ] = "FULL",
    services: Annotated[
        str,
        typer.Option(
            help="Where the simulated services keep their state: sqlite (own files,"
            " survives a crash) or memory (benchmarks; cannot be recovered)."
        ),
    ] = "sqlite",
    http: Annotated[
        bool, typer.Option("--http", help="Reach the shop over HTTP (starts `accord services`).")
    ] = False,
    services_url: Annotated[
        str,
        typer.Option(
            help="Use the HTTP services running at this URL (their faults are set where"
            " they run: `accord services --fault-rate`, or POST /admin/faults)."
        ),
    ] = "",
    secret_file: Annotated[
        str, typer.Option(help="With --services-url: file holding their hex shared secret.")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Seed a shop, run orders through accord with faults, check every invariant."""
    if data is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        data = Path(".accord") / f"run-{stamp}-{time.time_ns() % 10**6:06d}"
    try:
        config = DemoConfig(
            orders=orders,
            concurrency=concurrency,
            protocol=protocol,
            fault_rate=fault_rate,
            latency_ms=latency_ms,
            seed=seed,
            data=str(data),
            store=store,
            synchronous=synchronous.upper(),
            services_in_memory=services == "memory",
            http=http or bool(services_url),
            services_url=services_url,
            secret_file=str(Path(secret_file).resolve()) if secret_file else "",
        )
        if services not in ("sqlite", "memory"):
            raise ValueError(f"--services must be sqlite or memory, got {services!r}")
        if store and store != "memory":
            open_store(store)  # validate the URL before anything is created
    except ValueError as exc:
        _fail(str(exc))
    bar, update = _progress(orders, "orders", not as_json)
    try:
        if bar is not None:
            with bar:
                summary = run(run_demo(config, update))
        else:
            summary = run(run_demo(config, update))
    except (AccordError, OSError, ValueError) as exc:
        _fail(str(exc))
    _finish(summary, as_json, f"accord demo ({protocol}, {orders} orders) in {data}")


@app.command("services")
def services_command(
    data: Annotated[
        Path | None, typer.Option(help="Directory of the services' databases (SQLite).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    orders: Annotated[int, typer.Option(help="Size the shop for this many orders.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the initial state and the faults.")] = 1,
    fault_rate: Annotated[float, typer.Option(help="Probability of a fault per call.")] = 0.0,
    latency_ms: Annotated[float, typer.Option(help="Median injected latency.")] = 0.0,
    secret_file: Annotated[
        Path | None, typer.Option(help="Hex shared secret (created, mode 0600, if missing).")
    ] = None,
    pg: Annotated[
        str,
        typer.Option(
            help="Keep the state in PostgreSQL (postgresql://...), one schema per service."
        ),
    ] = "",
    pg_schema_prefix: Annotated[
        str, typer.Option(help="With --pg: the schemas are PREFIX_order, PREFIX_inventory, ...")
    ] = "accord_shop",
    barrier_retention_s: Annotated[
        float,
        typer.Option(
            help="Delete barrier rows older than this (hourly); at least the coordinator's "
            "retry horizon plus its worst downtime (accord.participant.retry_horizon_s)."
        ),
    ] = 7 * 24 * 3600.0,
) -> None:
    """Run the shop's four services over HTTP: /order, /inventory, /payment, /shipping."""
    if not 0 < port < 65536:
        _fail(f"--port must be between 1 and 65535, got {port}")
    if data is None and not pg:
        _fail("give --data DIR (SQLite) or --pg URL (PostgreSQL)")
    if data is None and secret_file is None:
        _fail("with --pg and no --data, give --secret-file")
    try:
        faults = Faults(fault_rate=fault_rate, latency_ms=latency_ms, seed=seed)
        faults.validate()
        secret_path = secret_file or Path(data or ".") / "secret"
        secret = load_secret(secret_path) if secret_path.exists() else new_secret(secret_path)
        if pg:
            shop = PgShop(
                pg,
                lambda: Workload(ShopConfig(orders=orders, seed=seed)).initial_state(),
                prefix=pg_schema_prefix,
            )
            app_, _ = build_app(None, secret, faults, pg=shop, retention_s=barrier_retention_s)
        else:
            assert data is not None
            if not (data / "order.db").exists():
                data.mkdir(parents=True, exist_ok=True)
                initial = Workload(ShopConfig(orders=orders, seed=seed)).initial_state()
                create_databases(data, initial)
            app_, _ = build_app(data, secret, faults, retention_s=barrier_retention_s)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    err.print(f"shop services on http://{host}:{port} (secret in {secret_path})")
    # No proxy headers (nothing sits in front of the shop), no Server or Date
    # header: a few microseconds of every call (bench/http_services.py).
    uvicorn.run(
        app_,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )


@app.command()
def serve(
    data: Annotated[
        Path | None, typer.Option(help="Directory of the log (coordinator.db) and API token.")
    ] = None,
    store: Annotated[
        str, typer.Option(help="Log URL instead: sqlite:///PATH or postgresql://...")
    ] = "",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8600,
    keys: Annotated[
        Path | None,
        typer.Option(help="JSON: participant URL prefix -> {key_id, secret (hex)}."),
    ] = None,
    services_url: Annotated[
        str, typer.Option(help="The shop of `accord services` (signed with --secret-file).")
    ] = "",
    secret_file: Annotated[
        Path | None, typer.Option(help="With --services-url: their hex shared secret.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            help="Allowed participant URL prefix (repeat): scheme://host:port/path;"
            " host may be *.domain, port may be *."
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="API tokens, one a line (default DATA/api-token, created if missing)."),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No API token (only behind your own auth).")
    ] = False,
    max_in_flight: Annotated[int, typer.Option(help="Transactions driven at once.")] = 1000,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, seconds to let in-flight work finish.")
    ] = 10.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1024 * 1024,
    max_wait: Annotated[float, typer.Option(help="Longest ?wait=true, in seconds.")] = 30.0,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
) -> None:
    """Run the coordinator as an HTTP service (REST API, see docs/api.md)."""
    if not 0 < port < 65536:
        _fail(f"--port must be between 1 and 65535, got {port}")
    if (data is None) == (not store):
        _fail("give --data DIR or --store URL (one of them)")
    if not 1 <= max_in_flight <= 100_000:
        _fail("--max-in-flight must be between 1 and 100000")
    if bool(services_url) != (secret_file is not None):
        _fail("--services-url and --secret-file go together")
    try:
        if data is not None:
            data.mkdir(parents=True, exist_ok=True)
            store_url = f"sqlite://{(data / 'coordinator.db').resolve()}"
        else:
            store_url = store
            open_store(store_url)  # validate the URL before anything starts
        signing = load_keys(keys) if keys is not None else {}
        if services_url and secret_file is not None:
            signing[services_url.rstrip("/")] = (KEY_ID, load_secret(secret_file))
        tokens: tuple[str, ...] = ()
        token_path = token_file or (data / "api-token" if data is not None else None)
        if not no_auth:
            if token_path is None:
                raise ValueError("with --store, give --token-file (or --no-auth)")
            tokens = load_tokens(token_path, create=True)
        options = ServeOptions(
            store_url=store_url,
            host=host,
            port=port,
            keys=signing,
            allow=tuple(allow or ()),
            tokens=tokens,
            require_auth=not no_auth,
            max_in_flight=max_in_flight,
            drain_timeout_s=drain_timeout,
            limits=Limits(max_body_bytes=max_body_bytes, max_wait_s=max_wait),
            # Off unless ACCORD_OTEL_EXPORTER asks for it (docs/operations.md).
            tracing=tracing_from_env(),
            tls=read_tls(ca_file, client_cert),
        )
        server_config(options)  # the server's own checks, before anything starts
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    where = "NO AUTHENTICATION" if no_auth else f"token in {token_path}"
    err.print(f"accord serve on http://{host}:{port} (log {store_url}; {where})")
    serve_forever(options)


@app.command()
def recover(
    data: Annotated[Path, typer.Option(help="Directory of an interrupted demo run.")],
    fault_rate: Annotated[float, typer.Option(help="Faults to inject while recovering.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Resume every unfinished transaction of a run, wait until all are terminal, check."""
    try:
        summary = run(recover_run(data, fault_rate=fault_rate))
    except (AccordError, OSError, ValueError) as exc:
        _fail(str(exc))
    _finish(summary, as_json, f"accord recover {data}")


@app.command()
def verify(
    data: Annotated[Path, typer.Option(help="Directory of a demo run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check the invariants on the persisted state of a run."""
    try:
        summary = run(verify_run(data))
    except (AccordError, OSError, ValueError) as exc:
        _fail(str(exc))
    _finish(summary, as_json, f"accord verify {data}")


def _open_log(data: Path | None, store: str) -> Store:
    if store:
        try:
            opened = open_store(store)
        except ValueError as exc:
            _fail(str(exc))
    elif data is not None:
        path = data / "coordinator.db"
        if not path.exists():
            _fail(f"{path} not found: --data must be a directory of a demo run")
        opened = open_store(f"sqlite://{path.resolve()}")
    else:
        _fail("give --data DIR or --store URL")
    if isinstance(opened, MemoryStore):
        _fail("an in-memory log cannot be inspected from another process")
    return opened


T = TypeVar("T")


def _on_log(log: Store, read: Callable[[Store], Awaitable[T]]) -> T:
    """Open ``log``, run ``read`` on it, close it."""

    async def go() -> T:
        await log.open()
        try:
            return await read(log)
        finally:
            await log.close()

    return run(go())


@txn_app.command("list")
def txn_list(
    data: Annotated[Path | None, typer.Option(help="Directory of a demo run.")] = None,
    store: Annotated[str, typer.Option(help="Log URL (sqlite:///PATH, postgresql://...).")] = "",
    state: Annotated[str, typer.Option(help="Only this status.")] = "",
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    after: Annotated[
        str, typer.Option(help="Start after this id (paging); with --url, a next_cursor.")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    url: Annotated[str, typer.Option(help="Ask a running server instead.")] = "",
    since: Annotated[int, typer.Option(help="With --url: created at or after (Unix ms).")] = 0,
    token: remote.Token = "",
    token_file: remote.TokenFile = None,
) -> None:
    """List transactions, in id order (of a log, or of a server with --url)."""
    if url:
        remote.list_remote(
            url, token, token_file, state=state, limit=limit, after=after,
            since_ms=since or None, as_json=as_json,
        )  # fmt: skip
        return
    status = None
    if state:
        try:
            status = TxnStatus(state)
        except ValueError:
            _fail(f"--state must be one of {', '.join(s.value for s in TxnStatus)}")
    if not 1 <= limit <= 100_000:
        _fail("--limit must be between 1 and 100000")
    rows = _on_log(_open_log(data, store), lambda log: log.list(status, limit, after or None))
    if as_json:
        for r in rows:
            sys.stdout.write(
                json.dumps(
                    {
                        "id": r.id,
                        "protocol": r.protocol,
                        "status": r.status.value,
                        "decision": r.decision,
                        "reason": r.reason,
                        "branches": r.branches,
                        "created_at_ms": r.created_at_ms,
                        "updated_at_ms": r.updated_at_ms,
                    }
                )
                + "\n"
            )
        return
    table = Table(title=f"{len(rows)} transactions")
    for col in ("id", "protocol", "status", "branches", "created", "reason"):
        table.add_column(col)
    for r in rows:
        created = dt.datetime.fromtimestamp(r.created_at_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
        table.add_row(
            *remote.cells(r.id, r.protocol, r.status.value, r.branches, created, r.reason[:60])
        )
    out.print(table)


@txn_app.command("purge")
def txn_purge(
    older_than_days: Annotated[
        float,
        typer.Option(
            help="Delete committed and aborted transactions whose last record is older"
            " than this many days (their ids can then be submitted again as new ones)."
        ),
    ],
    data: Annotated[Path | None, typer.Option(help="Directory of a demo run.")] = None,
    store: Annotated[str, typer.Option(help="Log URL (sqlite:///PATH, postgresql://...).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Delete finished transactions from a log (open and needs_attention ones stay)."""
    if not 0 < older_than_days <= 100_000:  # also false for NaN
        _fail(f"--older-than-days must be a positive number of days, got {older_than_days}")
    before_ms = int((time.time() - older_than_days * 86_400) * 1000)
    if before_ms <= 0:
        _fail(f"--older-than-days {older_than_days:g} reaches back before 1970")
    log = _open_log(data, store)
    try:
        purged = _on_log(log, lambda log: log.purge(before_ms))
    except (AccordError, OSError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps({"purged": purged, "before_ms": before_ms}) + "\n")
    else:
        out.print(f"purged {purged} finished transactions last written before {before_ms} (ms)")


@txn_app.command("show")
def txn_show(
    txid: Annotated[str, typer.Argument(help="Transaction id.")],
    data: Annotated[Path | None, typer.Option(help="Directory of a demo run.")] = None,
    store: Annotated[str, typer.Option(help="Log URL (sqlite:///PATH, postgresql://...).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    url: Annotated[str, typer.Option(help="Ask a running server instead.")] = "",
    token: remote.Token = "",
    token_file: remote.TokenFile = None,
) -> None:
    """Show one transaction: status, decision, branches, history."""
    if url:
        remote.show_remote(url, token, token_file, txid, as_json=as_json)
        return
    snap = _on_log(_open_log(data, store), lambda log: log.get(txid))
    if snap is None:
        _fail(f"no transaction {txid!r} in this log")
    detail: dict[str, Any] = {
        "id": snap.txid,
        "protocol": snap.spec.protocol.value,
        "status": snap.status.value,
        "decision": snap.decision.value if snap.decision else None,
        "reason": snap.reason,
        "created_at_ms": snap.created_at_ms,
        "deadline_at_ms": snap.deadline_at_ms,
        "updated_at_ms": snap.updated_at_ms,
        "branches": [
            {"name": b.name, "participant": b.participant, "payload": b.payload}
            | (
                {
                    "status": s.status,
                    "op": s.op,
                    "attempts": s.attempts,
                    "error": s.error,
                    "result": s.result,
                }
                if s is not None
                else {}
            )
            for b, s in zip(
                snap.spec.branches,
                list[BranchSummary | None](snap.branches) or [None] * len(snap.spec.branches),
                strict=True,
            )
        ],
        "history": [
            {"record": type(r).__name__, **{k: v for k, v in r._asdict().items() if k != "spec"}}
            for r in snap.history
        ],
    }
    if as_json:
        sys.stdout.write(json.dumps(detail, default=str) + "\n")
        return
    out.print(
        f"[bold]{escape(detail['id'])}[/] {detail['protocol']} [bold]{detail['status']}[/]"
        f" decision={detail['decision']} reason={escape(repr(detail['reason']))}"
    )
    table = Table(title="branches")
    for col in ("name", "participant", "status", "op", "attempts", "error"):
        table.add_column(col)
    for b in detail["branches"]:
        table.add_row(
            *remote.cells(
                b["name"],
                b["participant"],
                b.get("status", "-"),
                b.get("op", "-"),
                b.get("attempts", "-"),
                str(b.get("error", ""))[:60],
            )
        )
    out.print(table)
    history = Table(title="log records")
    history.add_column("record")
    history.add_column("detail")
    for h in detail["history"]:
        rest = {k: v for k, v in h.items() if k not in ("record", "txid", "branches")}
        history.add_row(*remote.cells(h["record"], json.dumps(rest, default=str)[:100]))
    out.print(history)


def tune_gc() -> None:
    """Collect the young generation less often.

    A coordinator allocates many short-lived objects per transaction, and
    CPython's default threshold (700 allocations) then runs collections so
    often that they cost more than the work itself: measured here, the demo's
    in-memory configuration went from ~1,700 to ~3,700 tx/s with this setting.
    Long-lived state is frozen out of the collector's way after start-up.
    """
    gc.set_threshold(50_000, 20, 100)
    gc.freeze()


def main() -> None:
    tune_gc()
    app()
