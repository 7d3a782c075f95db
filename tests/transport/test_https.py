"""HttpTransport over HTTPS against a real participant (uvicorn with TLS on
127.0.0.1): a private CA given as ``ca_pem``, mutual TLS with
``identity_pem``, and what happens without them."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn

from accord import wire
from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.participant import Participant, SQLiteBarrier
from accord.server.run import ServeOptions, build
from accord.transport.base import Call
from accord.transport.http import HttpTransport, read_tls

KEY_ID = "k1"
SECRET = b"a secret of a sufficient length!"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@asynccontextmanager
async def https_participant(
    tmp_path: Path, ca: trustme.CA, *, client_ca: trustme.CA | None = None
) -> AsyncIterator[str]:
    """A participant answering ``try`` with ``{"tried": qty}``, served over TLS
    with a certificate of ``ca`` for 127.0.0.1; with ``client_ca``, it asks
    for a client certificate issued by that CA. Yields its base URL."""
    barrier = SQLiteBarrier(tmp_path / "b.db", max_workers=0)
    await barrier.migrate()
    participant: Participant[Any] = Participant(
        barrier,
        wire.Verifier({KEY_ID: SECRET}),
        handlers={"try": lambda conn, call: {"tried": call.payload["qty"]}},
    )
    server_cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file = tmp_path / "server.key", tmp_path / "server.pem"
    server_cert.private_key_pem.write_to_path(str(key_file))
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    options: dict[str, Any] = {}
    if client_ca is not None:
        client_ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
        options = {
            "ssl_ca_certs": str(tmp_path / "clients.pem"),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
        }
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            participant, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
            ssl_keyfile=str(key_file), ssl_certfile=str(cert_file), **options,
        )
    )  # fmt: skip
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving
        await barrier.close()


async def _try(transport: HttpTransport, url: str, txid: str = "t1") -> Any:
    call = Call(txid, "b", Op.TRY, url, {"qty": 3}, 1, 5.0)
    try:
        return await transport.call(call)
    finally:
        await transport.close()


def _identity(ca: trustme.CA) -> bytes:
    cert = ca.issue_cert("accord-coordinator")
    return cert.private_key_pem.bytes() + b"".join(c.bytes() for c in cert.cert_chain_pems)


async def test_a_private_ca_given_as_ca_pem_is_trusted(tmp_path: Path, ca: trustme.CA) -> None:
    """The participant's certificate comes from a private CA: with it in
    ``ca_pem`` the signed call goes through and the result comes back."""
    async with https_participant(tmp_path, ca) as url:
        transport = HttpTransport({url: (KEY_ID, SECRET)}, ca_pem=ca.cert_pem.bytes())
        reply = await _try(transport, url)
    assert (reply.outcome, reply.result) == (Outcome.OK, {"tried": 3})


async def test_a_certificate_that_does_not_verify_is_a_transient_failure(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """Without the private CA (or with another one) the handshake fails: the
    call is transient, nothing reaches the handler, the reason names TLS."""
    async with https_participant(tmp_path, ca) as url:
        for transport in (
            HttpTransport({url: (KEY_ID, SECRET)}),
            HttpTransport({url: (KEY_ID, SECRET)}, ca_pem=trustme.CA().cert_pem.bytes()),
        ):
            reply = await _try(transport, url)
            assert reply.outcome is Outcome.TRANSIENT
            assert "certificate" in reply.error.lower() or "tls" in reply.error.lower(), reply
        trusting = HttpTransport({url: (KEY_ID, SECRET)}, ca_pem=ca.cert_pem.bytes())
        assert (await _try(trusting, url)).result == {"tried": 3}  # the first time it ran


async def test_mutual_tls_presents_identity_pem(tmp_path: Path, ca: trustme.CA) -> None:
    """A participant that requires a client certificate accepts the call made
    with ``identity_pem`` and refuses the handshake without it (transient)."""
    clients = trustme.CA()
    async with https_participant(tmp_path, ca, client_ca=clients) as url:
        roots = ca.cert_pem.bytes()
        anonymous = await _try(HttpTransport({url: (KEY_ID, SECRET)}, ca_pem=roots), url, "t1")
        assert anonymous.outcome is Outcome.TRANSIENT
        known = HttpTransport(
            {url: (KEY_ID, SECRET)}, ca_pem=roots, identity_pem=_identity(clients)
        )
        assert (await _try(known, url, "t2")).outcome is Outcome.OK


async def test_accord_serve_calls_participants_with_its_tls_files(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """`accord serve --ca-file --client-cert` (read_tls, ServeOptions.tls): the
    coordinator's transport trusts that CA and presents that identity."""
    clients = trustme.CA()
    ca_file, identity_file = tmp_path / "ca.pem", tmp_path / "me.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    identity_file.write_bytes(_identity(clients))
    async with https_participant(tmp_path, ca, client_ca=clients) as url:
        options = ServeOptions(
            store_url="memory",
            keys={url: (KEY_ID, SECRET)},
            require_auth=False,
            tls=read_tls(str(ca_file), str(identity_file)),
        )
        _, coordinator = build(options)
        assert isinstance(coordinator.transport, HttpTransport)
        reply = await _try(coordinator.transport, url)
    assert (reply.outcome, reply.result) == (Outcome.OK, {"tried": 3})


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("ca_pem", b"not a certificate", "no PEM certificate"),
        (
            "ca_pem",
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----",
            "does not parse",
        ),
        ("ca_pem", "text, not bytes", "must be bytes"),
        ("identity_pem", b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----", "key"),
        (
            "identity_pem",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "not a usable key",
        ),
    ],
)
def test_bad_tls_material_is_refused_by_name(option: str, value: Any, message: str) -> None:
    """PEM that would not work is refused when the transport is made, naming
    the option, instead of being skipped (reqwest ignores a bad root)."""
    make: Callable[..., HttpTransport] = HttpTransport
    with pytest.raises(ValueError, match=option) as info:
        make({"https://p.example": (KEY_ID, SECRET)}, **{option: value})
    assert message in str(info.value)
