"""`accord txn ... --url`: the CLI against a running server, and the Python clients."""

from __future__ import annotations

import importlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner, Result

from accord import (
    ApiError,
    Call,
    Client,
    DuplicateTransaction,
    Reply,
    SQLiteStore,
    SyncClient,
    TransactionNotFound,
)
from accord.cli import app, remote
from accord.errors import InvalidTransaction

from .conftest import FakeParticipants, LiveServer, order_body, serve_in_thread, start_live_server

runner = CliRunner()


def invoke(live: LiveServer, *args: str, token: bool = True, stdin: str | None = None) -> Result:
    extra = ["--url", live.url] + (["--token", live.token] if token else [])
    return runner.invoke(app, ["txn", *args, *extra], input=stdin)


def lines(result: Result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_submit_show_and_list_through_the_cli(live_server: LiveServer, tmp_path: Path) -> None:
    """submit --wait from a file, then show and list it, all with --url."""
    spec = tmp_path / "order.json"
    spec.write_text(json.dumps(order_body()))
    r = invoke(live_server, "submit", "--file", str(spec), "--id", "cli-1", "--wait", "--json")
    assert r.exit_code == 0, r.output
    assert lines(r)[0]["status"] == "committed"
    r = invoke(live_server, "show", "cli-1", "--json")
    assert r.exit_code == 0, r.output
    shown = lines(r)[0]
    assert shown["id"] == "cli-1"
    assert [b["timeline"][0]["op"] for b in shown["branches"]] == ["try"] * 4
    r = invoke(live_server, "list", "--json", "--state", "committed")
    assert [row["id"] for row in lines(r)] == ["cli-1"]
    r = invoke(live_server, "show", "cli-1")  # the human form
    assert r.exit_code == 0 and "committed" in r.stdout


def test_list_pages_with_the_cursor(live_server: LiveServer) -> None:
    """--limit and --after (a next_cursor) walk the list in id order."""
    for i in range(3):
        r = invoke(
            live_server, "submit", "--id", f"p-{i}", "--wait", stdin=json.dumps(order_body())
        )
        assert r.exit_code == 0, r.output
    r = invoke(live_server, "list", "--limit", "2")
    assert r.exit_code == 0
    cursor = r.stdout.split("--after ")[1].split()[0]
    r = invoke(live_server, "list", "--limit", "2", "--after", cursor, "--json")
    assert [row["id"] for row in lines(r)] == ["p-2"]


def test_operator_actions_through_the_cli(live_server: LiveServer) -> None:
    """A parked transaction resolved with `accord txn resolve --reason`."""
    live_server.participants.mode["payment"] = "fail_phase2"
    r = invoke(live_server, "submit", "--id", "cli-2", "--wait", "--json",
               stdin=json.dumps(order_body()))  # fmt: skip
    assert lines(r)[0]["status"] == "needs_attention"
    r = invoke(live_server, "resolve", "cli-2", "--reason", "fixed by hand", "--json")
    assert r.exit_code == 0, r.output
    assert lines(r)[0]["status"] == "committed"
    r = invoke(live_server, "abort", "cli-2", "--reason", "too late")
    assert r.exit_code == 1
    assert "only a transaction without a decision" in r.output


def test_cli_errors_are_clear(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token: 401 reported; unknown id: named; bad JSON file: exit 2."""
    monkeypatch.delenv("ACCORD_TOKEN", raising=False)
    r = invoke(live_server, "list", token=False)
    assert r.exit_code == 1 and "401" in r.output
    r = invoke(live_server, "show", "nope")
    assert r.exit_code == 1 and "'nope'" in r.output
    r = invoke(live_server, "submit", stdin="{not json")
    assert r.exit_code == 2 and "not a readable JSON" in r.output
    monkeypatch.setenv("ACCORD_TOKEN", live_server.token)
    assert invoke(live_server, "list", token=False).exit_code == 0


MARKUP_ERROR = "HTTP 500: [/x] [bold]loud"
MARKUP_REASON = "[bold]fixed[/x] by [red]hand"


class _MarkupParticipants(FakeParticipants):
    """Fakes whose errors look like rich markup (a proxy's 500 page, say)."""

    def handler(self, name: str) -> Callable[[Call], Any]:
        handle = super().handler(name)

        def marked(call: Call) -> Any:
            reply = handle(call)
            if isinstance(reply, Reply) and reply.error:
                return reply._replace(error=MARKUP_ERROR)
            return reply

        return marked


def test_data_that_looks_like_markup_is_shown_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors, reasons and ids with [/x] or [bold] in them: printed literally by
    show and list (remote, and show of a log file), never parsed as markup."""
    wide = Console(width=400)
    monkeypatch.setattr(remote, "out", wide)
    monkeypatch.setattr(importlib.import_module("accord.cli.app"), "out", wide)
    participants = _MarkupParticipants()
    participants.mode["payment"] = "fail_phase2"
    db = tmp_path / "log.db"
    with start_live_server(store=SQLiteStore(db), participants=participants) as live:
        r = invoke(live, "submit", "--id", "mk-1", "--wait", stdin=json.dumps(order_body()))
        assert r.exit_code == 0, r.output
        r = invoke(live, "resolve", "mk-1", "--reason", MARKUP_REASON)
        assert r.exit_code == 0, r.output
        shown = invoke(live, "show", "mk-1")
        listed = invoke(live, "list")
    for result, texts in (
        (shown, (MARKUP_ERROR, MARKUP_REASON)),
        (listed, (f"resolved by operator: {MARKUP_REASON}",)),
    ):
        assert result.exit_code == 0, result.output
        for text in texts:
            assert text in result.stdout, result.stdout
    local = runner.invoke(app, ["txn", "show", "mk-1", "--store", f"sqlite:///{db}"])
    assert local.exit_code == 0, local.output
    assert MARKUP_ERROR in local.stdout and MARKUP_REASON in local.stdout, local.stdout
    local = runner.invoke(app, ["txn", "list", "--store", f"sqlite:///{db}"])
    assert local.exit_code == 0, local.output
    assert f"resolved by operator: {MARKUP_REASON}" in local.stdout, local.stdout


def test_token_file_is_read(live_server: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(live_server.token + "\n")
    r = runner.invoke(app, ["txn", "list", "--url", live_server.url, "--token-file", str(path)])
    assert r.exit_code == 0, r.output


def test_sync_client_maps_errors_to_accord_exceptions(live_server: LiveServer) -> None:
    """404, 409 and 422 become TransactionNotFound, DuplicateTransaction, InvalidTransaction."""
    with SyncClient(live_server.url, live_server.token) as client:
        done = client.submit(order_body("sc-1"), wait=True)
        assert done.status == "committed"
        assert client.submit(order_body("sc-1")).status == "committed"  # idempotent
        with pytest.raises(DuplicateTransaction):
            client.submit(order_body("sc-1", protocol="saga"))
        with pytest.raises(TransactionNotFound):
            client.get("missing")
        with pytest.raises(InvalidTransaction) as invalid:
            client.submit(order_body("sc-2", timeout_s=-1))
        assert invalid.value.field == "timeout_s"
        assert [row.id for row in client.iter(page=1)] == ["sc-1"]
        assert client.stats().committed == 1
    with (
        SyncClient(live_server.url, "wrong-token-0123456789") as client,
        pytest.raises(ApiError) as denied,
    ):
        client.stats()
    assert denied.value.status == 401


async def test_async_client_round_trip(live_server: LiveServer) -> None:
    """Client: submit (wait), get with attempts, list, actions, readiness."""
    async with Client(live_server.url, live_server.token) as client:
        assert await client.ready()
        done = await client.submit(order_body("ac-1"), wait=True)
        assert done.status == "committed"
        txn = await client.get("ac-1")
        assert txn.decision == "commit"
        assert all(b.timeline for b in txn.branches)
        page = await client.list(state="committed")
        assert [r.id for r in page.items] == ["ac-1"]
        with pytest.raises(ApiError) as conflict:
            await client.retry("ac-1", "nothing to retry")
        assert conflict.value.status == 409


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(0, True), (429, True), (502, True), (503, True), (504, True),
     (400, False), (404, False), (409, False), (500, False), (501, False)],
)  # fmt: skip
def test_api_error_is_retryable_where_another_try_may_succeed(status: int, retryable: bool) -> None:
    """Unreachable (0), 429, 502, 503, 504: retryable; a refusal or a server bug: not."""
    assert ApiError(status, "x").retryable is retryable


async def test_an_unreachable_server_is_a_retryable_api_error() -> None:
    """Connection refused, after the retries: ApiError status 0, retryable, from both clients."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens
    with SyncClient(url, max_retries=1) as sync, pytest.raises(ApiError) as refused:
        sync.stats()
    assert (refused.value.status, refused.value.retryable) == (0, True)
    async with Client(url, max_retries=1) as client:
        with pytest.raises(ApiError) as refused:
            await client.stats()
    assert (refused.value.status, refused.value.retryable) == (0, True)


def _flaky_proxy(answers: list[int], seen: list[str]) -> Starlette:
    """Answers ``answers`` in turn (then 200 with an empty page), like a proxy
    whose upstream is restarting."""

    async def handle(request: Request) -> Response:
        seen.append(request.url.path)
        if answers:
            return Response(b"<html>bad gateway</html>", answers.pop(0))
        return Response(b'{"items": [], "next_cursor": null}', media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])


async def test_both_clients_retry_what_is_retryable_and_only_what_is_safe() -> None:
    """A read through a proxy answering 502, 504, 429: both clients retry it to
    success; an operator action (not idempotent) is never sent twice."""
    seen: list[str] = []
    answers: list[int] = []
    with serve_in_thread(_flaky_proxy(answers, seen)) as (url, _, _):
        answers[:] = [502, 504, 429]
        with SyncClient(url, max_retries=3) as sync:
            assert sync.list().items == []
        assert len(seen) == 4
        answers[:] = [502, 504, 429]
        async with Client(url, max_retries=3) as client:
            assert (await client.list()).items == []
            assert len(seen) == 8
            answers[:] = [502]
            with pytest.raises(ApiError) as bad_gateway:
                await client.abort("t-1", "why")
        assert (bad_gateway.value.status, bad_gateway.value.retryable) == (502, True)
        assert seen[-1] == "/v1/transactions/t-1/abort" and len(seen) == 9
