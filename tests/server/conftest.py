"""A real accord server for tests: uvicorn on a free 127.0.0.1 port, in a thread.

``live_server`` (a fixture) yields a :class:`LiveServer` with ``.url``,
``.token``, ``.coordinator`` (a MemoryStore coordinator whose participants
are the in-process fakes of ``.participants``) and ``.run(coro)`` to call
the coordinator from the test thread (it lives on the server's loop).
``live_server_factory`` starts others, with a store, limits, an allow-list
or participants of your choice::

    def test_x(live_server):
        r = httpx.post(f"{live_server.url}/v1/transactions", json=order_body(),
                       headers=live_server.headers)

Tests outside tests/server can re-export the fixtures from their conftest::

    from server.conftest import live_server, live_server_factory  # noqa: F401
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvicorn
from starlette.applications import Starlette

from accord import Call, Coordinator, InProcessTransport, MemoryStore, Outcome, Reply, Store
from accord.server import AllowList, Limits, ServerConfig, create_app

T = TypeVar("T")
SERVICES = ("order", "inventory", "payment", "shipping")
START_TIMEOUT_S = 20.0


class FakeParticipants:
    """In-process participants by name, idempotent per (txid, branch, op).

    ``mode[name]`` picks how one answers: ``ok``, ``refuse`` (business
    refusal), ``fail`` (transient error, every time), ``fail_prepare``
    (tries and actions fail, the rest succeeds), ``fail_phase2`` (tries
    succeed, confirms and cancels fail), ``hang`` (never answers;
    its reply is resolved by :meth:`release`)."""

    def __init__(self, names: tuple[str, ...] = SERVICES) -> None:
        self.mode: dict[str, str] = dict.fromkeys(names, "ok")
        self.calls: list[Call] = []
        self.applied: set[tuple[str, str, str]] = set()
        self._hanging: list[tuple[asyncio.Future[Reply], Call]] = []

    def handler(self, name: str) -> Callable[[Call], Any]:
        def handle(call: Call) -> Any:
            self.calls.append(call)
            mode = self.mode.get(name, "ok")
            if mode == "refuse" and call.op in ("try", "action"):
                return Reply(Outcome.REFUSED, error=f"{name} refuses")
            prepare = call.op in ("try", "action")
            if (
                mode == "fail"
                or (mode == "fail_phase2" and not prepare)
                or (mode == "fail_prepare" and prepare)
            ):
                return Reply(Outcome.TRANSIENT, error=f"{name} is down")
            if mode == "hang":
                fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
                self._hanging.append((fut, call))
                return fut
            self.applied.add((call.txid, call.branch, call.op.value))
            return Reply(Outcome.OK, result={"by": name})

        return handle

    def transport(self) -> InProcessTransport:
        return InProcessTransport({name: self.handler(name) for name in self.mode})

    def release(self) -> None:
        """Answer every hanging call with ok, and stop hanging (call on the server's loop)."""
        for name, mode in self.mode.items():
            if mode == "hang":
                self.mode[name] = "ok"
        hanging, self._hanging = self._hanging, []
        for fut, call in hanging:
            if not fut.done():
                self.applied.add((call.txid, call.branch, call.op.value))
                fut.set_result(Reply(Outcome.OK))


@dataclass
class LiveServer:
    url: str
    token: str
    coordinator: Coordinator
    app: Starlette
    participants: FakeParticipants
    loop: asyncio.AbstractEventLoop
    server: uvicorn.Server = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def store(self) -> Store:
        return self.coordinator.store

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the server's loop (where the coordinator lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Call ``fn()`` on the server's loop thread."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout_s)


def order_body(
    txid: str | None = None, *, protocol: str = "tcc", prefix: str = "", **extra: Any
) -> dict[str, Any]:
    """A four-branch transaction against the fake participants (by name,
    after ``prefix``)."""
    body: dict[str, Any] = {
        "protocol": protocol,
        "branches": [
            {
                "name": name,
                "participant": prefix + name,
                "payload": {"n": i},
                "retry": {
                    "initial_interval_s": 0.01,
                    "maximum_interval_s": 0.05,
                    "maximum_attempts": 3,
                },
            }
            for i, name in enumerate(SERVICES)
        ],
        **extra,
    }
    if txid is not None:
        body["id"] = txid
    return body


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


@contextlib.contextmanager
def start_live_server(
    *,
    store: Store | None = None,
    participants: FakeParticipants | None = None,
    limits: Limits | None = None,
    allow: AllowList | None = None,
    max_in_flight: int = 100,
    drain_timeout_s: float = 2.0,
    coordinator: Coordinator | None = None,
) -> Iterator[LiveServer]:
    """Start an accord server in a thread; stop it (gracefully) on exit."""
    participants = participants or FakeParticipants()
    if coordinator is None:
        coordinator = Coordinator(
            store or MemoryStore(), participants.transport(), max_in_flight=max_in_flight
        )
    token = secrets.token_hex(16)
    config = ServerConfig(
        tokens=(token,),
        allow=allow,
        limits=limits or Limits(),
        drain_timeout_s=drain_timeout_s,
    )
    app = create_app(coordinator, config)
    with serve_in_thread(app) as (url, loop, server):
        yield LiveServer(url, token, coordinator, app, participants, loop, server)


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
) -> Iterator[tuple[str, asyncio.AbstractEventLoop, uvicorn.Server]]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port, in a thread;
    yields (url, the server's loop, the server); stops it (gracefully) on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    loops: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            failure.append(exc)

    thread = threading.Thread(target=main, name="accord-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if failure or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the server did not start: {failure!r}")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", loops[0], server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        if failure:
            raise failure[0]


@pytest.fixture
def live_server() -> Iterator[LiveServer]:
    """A running server over a MemoryStore coordinator and fake participants."""
    with start_live_server() as live:
        yield live


@pytest.fixture
def live_server_factory() -> Iterator[Callable[..., LiveServer]]:
    """Start servers with :func:`start_live_server`'s options; all stopped at the end."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(start_live_server(**kwargs))
