"""``accord cluster node | submit | status | verify``: coordinators sharing one log.

Several ``accord cluster node`` processes on one PostgreSQL schema share its
shards (docs/scalability.md). ``submit`` puts the reference workload's orders
in the cluster's inbox (any node's owner of the shard drives each),
``status`` shows who owns what, ``verify`` checks the scenario's invariants
against the shop's services and the whole log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from accord.cli._loop import run
from accord.cli._options import CaFileOption, ClientCertOption
from accord.cluster import DEFAULT_SHARDS, DEFAULT_TTL_S, ClusterClient, ClusterNode
from accord.cluster.inbox import Answer
from accord.cluster.leases import read_status
from accord.core.records import TxnStatus
from accord.core.spec import Protocol
from accord.errors import AccordError
from accord.log import PostgresStore, open_store
from accord.sim import invariants
from accord.sim.demo import HTTP_CALL_TIMEOUT_S
from accord.sim.http_demo import RemoteShop, load_secret
from accord.sim.http_shop import KEY_ID
from accord.sim.workload import ShopConfig, Workload, order_spec
from accord.transport.http import HttpTransport, read_tls

cluster_app = typer.Typer(
    help="Run coordinators as a cluster on one PostgreSQL log (sharded, leased, fenced).",
    no_args_is_help=True,
)
err = Console(stderr=True)
out = Console()

StoreOption = Annotated[
    str, typer.Option(help="The shared log: postgresql://USER@HOST/DB?schema=NAME.")
]


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def _pg(store: str) -> tuple[str, str]:
    """(dsn, schema) of a postgresql:// store URL."""
    try:
        opened = open_store(store)
    except ValueError as exc:
        _fail(str(exc))
    if not isinstance(opened, PostgresStore):
        _fail("a cluster's log lives in PostgreSQL: give --store postgresql://...?schema=NAME")
    return opened.dsn, opened.schema


def _shop(services_url: str, secret_file: str) -> tuple[str, bytes]:
    if not services_url or not secret_file:
        _fail("give --services-url URL and --secret-file FILE (the shop's services)")
    try:
        return services_url.rstrip("/"), load_secret(Path(secret_file))
    except ValueError as exc:
        _fail(str(exc))


@cluster_app.command("node")
def node_command(
    store: StoreOption,
    node_id: Annotated[str, typer.Option(help="This node's name, unique in the cluster.")],
    services_url: Annotated[str, typer.Option(help="The shop's services (participants).")] = "",
    secret_file: Annotated[str, typer.Option(help="Hex shared secret of the services.")] = "",
    shards: Annotated[
        int, typer.Option(help="Virtual shards of the cluster (fixed when it is created).")
    ] = DEFAULT_SHARDS,
    lease_ttl: Annotated[float, typer.Option(help="Lease time-to-live in seconds.")] = (
        DEFAULT_TTL_S
    ),
    concurrency: Annotated[int, typer.Option(help="Transactions driven at once.")] = 100,
    drain: Annotated[
        float | None,
        typer.Option(help="Seconds to let transactions finish before giving shards up."),
    ] = None,
    status_file: Annotated[
        Path | None, typer.Option(help="Write this node's status (JSON) here every second.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level on stderr.")] = "INFO",
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
) -> None:
    """Run one coordinator of a cluster until SIGTERM or SIGINT (then drain and leave)."""
    dsn, schema = _pg(store)
    url, secret = _shop(services_url, secret_file)
    try:
        tls = read_tls(ca_file, client_cert)
    except ValueError as exc:
        _fail(str(exc))
    transport = HttpTransport({url: (KEY_ID, secret)}, **tls)
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        node = ClusterNode(
            dsn,
            transport,
            node_id=node_id,
            schema=schema,
            shards=shards,
            ttl_s=lease_ttl,
            max_in_flight=concurrency,
            drain_s=drain,
        )
    except ValueError as exc:
        _fail(str(exc))
    try:
        code = run(serve_node(node, status_file))
    except (AccordError, OSError, ValueError) as exc:
        _fail(str(exc))
    raise typer.Exit(code)


async def serve_node(node: ClusterNode, status_file: Path | None) -> int:
    """Run ``node`` until SIGTERM or SIGINT, or until it stops by itself
    (then exit status 1); write its status to ``status_file`` every second."""
    await node.start()
    assert node.stopped is not None
    loop = asyncio.get_running_loop()
    leave = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, leave.set)
    writer = asyncio.ensure_future(_write_status(node, status_file)) if status_file else None
    leaving = asyncio.ensure_future(leave.wait())
    waits: list[asyncio.Future[Any]] = [leaving, node.stopped]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    why = node.stopped.result() if node.stopped.done() else None
    await node.close()
    for task in (writer, leaving):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if status_file is not None:
        _dump(status_file, node.status())
    if why is not None:
        err.print(f"[bold red]node {escape(node.node)} stopped:[/] {escape(str(why))}")
        return 1
    return 0


async def _write_status(node: ClusterNode, path: Path) -> None:
    while True:
        _dump(path, node.status())
        await asyncio.sleep(1.0)


def _dump(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


@cluster_app.command("submit")
def submit_command(
    store: StoreOption,
    services_url: Annotated[str, typer.Option(help="The shop's services (participants).")],
    orders: Annotated[int, typer.Option(help="Orders of the workload (as `accord services`).")] = (
        2000
    ),
    seed: Annotated[int, typer.Option(help="Seed of the workload (as `accord services`).")] = 1,
    first: Annotated[int, typer.Option(help="Submit orders from this index...")] = 0,
    count: Annotated[int, typer.Option(help="...this many (0 = to the end).")] = 0,
    protocol: Annotated[str, typer.Option(help="tcc or saga.")] = "tcc",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every one is terminal.")] = (
        False
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Put the reference workload's orders in the cluster's inbox (durably accepted)."""
    dsn, schema = _pg(store)
    if not 1 <= orders <= 10_000_000:
        _fail(f"--orders must be between 1 and 10,000,000, got {orders}")
    if protocol not in ("tcc", "saga"):
        _fail(f"--protocol must be tcc or saga, got {protocol!r}")
    if first < 0 or count < 0 or first >= orders:
        _fail(f"--first must be in [0, {orders}) and --count at least 0")
    workload = Workload(ShopConfig(orders=orders, seed=seed))
    chosen = workload.orders[first : first + count if count else orders]
    specs = [
        order_spec(
            o,
            Protocol(protocol),
            call_timeout_s=HTTP_CALL_TIMEOUT_S,
            base_url=services_url.rstrip("/"),
        )
        for o in chosen
    ]

    async def go() -> dict[str, Any]:
        async with ClusterClient(dsn, schema=schema) as client:
            started = time.perf_counter()
            await client.submit_many(specs)
            summary: dict[str, Any] = {"submitted": len(specs)}
            if wait:
                results = await asyncio.gather(*(client.result(s) for s in specs))
                for status in TxnStatus:
                    summary[status.value] = sum(1 for r in results if r.status is status)
                summary["duration_s"] = round(time.perf_counter() - started, 3)
            return summary

    try:
        summary = run(go())
    except (AccordError, OSError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        out.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items() if v != 0))


@cluster_app.command("status")
def status_command(
    store: StoreOption,
    lease_ttl: Annotated[
        float, typer.Option(help="A member is live if it heartbeat within this many seconds.")
    ] = DEFAULT_TTL_S,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Members, shards owned per node, open transactions per owner, the inbox."""
    dsn, schema = _pg(store)

    try:
        status = run(read_status(dsn, schema, lease_ttl))
    except (AccordError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(status) + "\n")
        return
    table = Table(title=f"cluster {schema}: {status['shards']} shards", title_justify="left")
    for col in ("node", "live", "heartbeat age s", "shards owned", "open transactions"):
        table.add_column(col)
    for m in status["members"]:
        table.add_row(
            m["node"],
            "yes" if m["live"] else "no",
            str(m["heartbeat_age_s"]),
            str(status["owned"].get(m["node"], 0)),
            str(status["open_transactions"].get(m["node"], 0)),
        )
    out.print(table)
    out.print(
        f"free shards {status['free_shards']}, inbox {status['inbox']}, operator requests"
        f" waiting {status['operator_requests_waiting']}, open in unowned shards"
        f" {status['open_transactions'].get('(unowned)', 0)}, acquisitions"
        f" {status['acquisitions']}"
    )


def _operator_command(action: str, summary: str) -> None:
    def command(
        txid: Annotated[str, typer.Argument(help="The transaction's id.")],
        store: StoreOption,
        reason: Annotated[str, typer.Option(help="Why (recorded in the log with the action).")],
        timeout: Annotated[
            float, typer.Option(help="Seconds to wait for the shard's owner to answer.")
        ] = 30.0,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ) -> None:
        dsn, schema = _pg(store)

        async def go() -> Answer | None:
            async with ClusterClient(dsn, schema=schema) as client:
                return await client.operate(txid, action, reason, timeout_s=timeout)

        try:
            answered = run(go())
        except (AccordError, OSError, ValueError) as exc:
            _fail(str(exc))
        if answered is None:
            err.print(
                f"[yellow]no node answered within {timeout:g} s:[/] the request stays queued"
                " and is acted on when the shard's owner picks it up"
            )
            raise typer.Exit(3)
        code, body = answered
        if as_json:
            sys.stdout.write(json.dumps({"code": code, **body}) + "\n")
        else:
            out.print(Text(f"{code} " + ", ".join(f"{k} {v}" for k, v in body.items())))
        if code >= 400:
            raise typer.Exit(1)

    command.__doc__ = summary
    cluster_app.command(action)(command)


_operator_command(
    "retry", "Retry a transaction's waiting calls now; resume one in needs_attention."
)
_operator_command("abort", "Abort a transaction that has no decision yet.")
_operator_command(
    "resolve", "Close a needs_attention transaction repaired by hand, as its decision says."
)


@cluster_app.command("verify")
def verify_command(
    store: StoreOption,
    services_url: Annotated[str, typer.Option(help="The shop's services (participants).")],
    secret_file: Annotated[str, typer.Option(help="Hex shared secret of the services.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check the scenario's invariants on the services' state and the whole log."""
    dsn, schema = _pg(store)
    url, secret = _shop(services_url, secret_file)
    try:
        summary = run(verify_cluster(dsn, schema, url, secret))
    except (AccordError, OSError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        for key, value in summary.items():
            out.print(f"[bold]{key.replace('_', ' ')}[/]: {value}")
    if not all(summary["invariants"].values()) or summary["stuck"] or summary["inbox"]:
        raise typer.Exit(1)


async def verify_cluster(dsn: str, schema: str, url: str, secret: bytes) -> dict[str, Any]:
    """The invariants of SCENARIO.md over a cluster's log and the HTTP shop."""
    shop = RemoteShop(url, secret)
    await shop.refresh()
    log = PostgresStore(dsn, schema=schema, pool_size=2)
    await log.open()
    try:
        snaps = await log.snapshots()
    finally:
        await log.close()
    status = await read_status(dsn, schema, DEFAULT_TTL_S, writers=True)
    report = invariants.check(shop.views(), {s.txid: s for s in snaps})
    counts = {status.value: 0 for status in TxnStatus}
    for s in snaps:
        counts[s.status.value] += 1
    return {
        "transactions": len(snaps),
        "committed": counts["committed"],
        "aborted": counts["aborted"],
        "needs_attention": counts["needs_attention"],
        "stuck": sum(1 for s in snaps if not s.status.terminal),
        "inbox": status["inbox"],
        "records_by_node": status["records_by_node"],
        "duplicates_delivered": shop.duplicates_delivered,
        "duplicates_applied": report.duplicates_applied,
        "invariants": report.passed(),
        "violations": {k: v[:10] for k, v in report.violations.items() if v},
    }
