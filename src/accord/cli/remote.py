"""``accord txn ... --url URL``: the same commands, against a running ``accord serve``.

The token comes from ``--token``, ``--token-file`` or ``$ACCORD_TOKEN``
(prefer the file or the variable: a command line is visible to every user
of the machine).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from accord.client import SyncClient
from accord.errors import AccordError

err = Console(stderr=True)
out = Console()

Url = Annotated[str, typer.Option(help="The accord server, e.g. http://127.0.0.1:8600.")]
Token = Annotated[
    str,
    typer.Option(envvar="ACCORD_TOKEN", help="API token (or $ACCORD_TOKEN).", show_default=False),
]
TokenFile = Annotated[
    Path | None, typer.Option(help="File holding the API token (its first line).")
]
Reason = Annotated[str, typer.Option(help="Why: recorded in the log with the action.")]
Wait = Annotated[bool, typer.Option("--wait", help="Wait until the transaction is terminal.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def connect(url: str, token: str, token_file: Path | None) -> SyncClient:
    if token_file is not None:
        try:
            lines = [ln.strip() for ln in token_file.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            fail(f"{token_file}: cannot read the token ({exc.strerror})", 2)
        if not lines:
            fail(f"{token_file}: holds no token", 2)
        token = lines[0]
    if not url.startswith(("http://", "https://")):
        fail(f"--url must be an http(s) URL, got {url!r}", 2)
    return SyncClient(url, token or None)


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def _time(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def cells(*values: object) -> list[Text]:
    """Table cells shown as they are: ids, reasons and participants' errors
    are data, never rich markup (``HTTP 500: [/x]`` would not even parse)."""
    return [Text(str(v)) for v in values]


def list_remote(
    url: str,
    token: str,
    token_file: Path | None,
    *,
    state: str,
    limit: int,
    after: str,
    since_ms: int | None,
    as_json: bool,
) -> None:
    """``accord txn list --url``: one page; ``--after`` takes a next_cursor."""
    with connect(url, token, token_file) as client:
        try:
            page = client.list(
                state=state or None, since_ms=since_ms, limit=limit, cursor=after or None
            )
        except AccordError as exc:
            fail(str(exc))
    if as_json:
        for row in page.items:
            _print_json(row)
        return
    table = Table(title=f"{len(page.items)} transactions")
    for col in ("id", "protocol", "status", "branches", "created", "reason"):
        table.add_column(col)
    for r in page.items:
        table.add_row(
            *cells(r.id, r.protocol, r.status, r.branches, _time(r.created_at_ms), r.reason[:60])
        )
    out.print(table)
    if page.next_cursor:
        out.print(f"more: --after {escape(page.next_cursor)}")


def show_remote(url: str, token: str, token_file: Path | None, txid: str, *, as_json: bool) -> None:
    """``accord txn show ID --url``: state, branches with their attempts, operator actions."""
    with connect(url, token, token_file) as client:
        try:
            txn = client.get(txid)
        except AccordError as exc:
            fail(str(exc))
    if as_json:
        _print_json(txn)
        return
    out.print(
        f"[bold]{escape(txn.id)}[/] {escape(txn.protocol)} [bold]{escape(txn.status)}[/]"
        f" decision={escape(str(txn.decision))} reason={escape(repr(txn.reason))}"
        + (" (running)" if txn.running else "")
    )
    table = Table(title="branches")
    for col in ("name", "participant", "status", "op", "attempts", "error"):
        table.add_column(col)
    for b in txn.branches:
        table.add_row(*cells(b.name, b.participant, b.status, b.op, b.attempts, b.error[:60]))
    out.print(table)
    calls = Table(title="calls")
    for col in ("branch", "op", "attempt", "outcome", "started", "latency ms", "error"):
        calls.add_column(col)
    for b in txn.branches:
        for t in b.timeline:
            latency = "" if t.latency_ms is None else f"{t.latency_ms:.1f}"
            calls.add_row(
                *cells(b.name, t.op, t.attempt, t.outcome, _time(t.started_at_ms), latency,
                       t.error[:50])
            )  # fmt: skip
    out.print(calls)
    for a in txn.operator_actions:
        out.print(f"operator {escape(a.action)} at {_time(a.at_ms)}: {escape(a.reason)}")


def register(txn_app: typer.Typer) -> None:
    """Add ``submit``, ``retry``, ``abort`` and ``resolve`` to ``accord txn``."""

    @txn_app.command("submit")
    def submit(
        url: Url,
        file: Annotated[
            str, typer.Option(help="The transaction as JSON (the API's body); '-' for stdin.")
        ] = "-",
        txid: Annotated[str, typer.Option("--id", help="Transaction id (idempotency key).")] = "",
        wait: Wait = False,
        wait_s: Annotated[float, typer.Option(help="With --wait: at most this long.")] = 30.0,
        token: Token = "",
        token_file: TokenFile = None,
        as_json: AsJson = False,
    ) -> None:
        """Submit a transaction to a running server."""
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
            body = json.loads(text)
        except (OSError, ValueError) as exc:
            fail(f"{file}: not a readable JSON transaction ({exc})", 2)
        if not isinstance(body, dict):
            fail(f"{file}: must hold a JSON object", 2)
        with connect(url, token, token_file) as client:
            try:
                sub = client.submit(body, txid=txid or None, wait=wait, wait_s=wait_s)
            except AccordError as exc:
                fail(str(exc))
        if as_json:
            _print_json(sub)
        else:
            out.print(f"{escape(sub.id)} {escape(sub.status)} {escape(sub.reason)}".rstrip())

    def action(name: str, help_: str) -> None:
        def command(
            txid: Annotated[str, typer.Argument(help="Transaction id.")],
            url: Url,
            reason: Reason,
            wait: Wait = False,
            token: Token = "",
            token_file: TokenFile = None,
            as_json: AsJson = False,
        ) -> None:
            with connect(url, token, token_file) as client:
                try:
                    if name == "resolve":
                        done = client.resolve(txid, reason)
                    else:
                        done = getattr(client, name)(txid, reason, wait=wait)
                except AccordError as exc:
                    fail(str(exc))
            if as_json:
                _print_json(done)
            else:
                out.print(f"{escape(done.id)}: {name} recorded; now {escape(done.status)}")

        command.__doc__ = help_
        txn_app.command(name)(command)

    action("retry", "Retry a transaction's waiting calls now; resume a needs_attention one.")
    action("abort", "Abort a transaction that has no decision yet.")
    action("resolve", "Close a needs_attention transaction repaired by hand (its decision holds).")
