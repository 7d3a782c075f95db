"""Schemathesis against /openapi.json, in process (ASGI): every operation, with
valid and invalid input; no 5xx, every response as the document says
(status code, content type, headers, body schema), invalid input refused."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

from accord import Coordinator, MemoryStore
from accord.server import Limits, ServerConfig, create_app
from accord.server.schema import openapi_document

from .conftest import FakeParticipants

TOKEN = secrets.token_hex(16)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


LIMITS = Limits(max_wait_s=0.5, max_list_limit=50)  # short waits: generated submits may wait
# The document the app serves at /openapi.json (pinned by the first test):
# loaded eagerly so that pytest can parametrize from it, while the app and
# its coordinator start only when the tests run.
schema = schemathesis.openapi.from_dict(openapi_document(LIMITS))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=60
)


@pytest.fixture
def asgi_app() -> Iterator[Starlette]:
    """A fresh app per operation: Schemathesis ends an app's lifespan after each test."""
    participants = FakeParticipants()
    coordinator = Coordinator(MemoryStore(), participants.transport(), max_in_flight=50)
    app = create_app(coordinator, ServerConfig(tokens=(TOKEN,), limits=LIMITS))
    yield app
    shutdown_lifespans()  # the app's lifespan closes the coordinator


async def test_the_served_document_is_the_one_tested(asgi_app: Starlette) -> None:
    """GET /openapi.json (no token needed) is the document the cases come from."""
    transport = httpx.ASGITransport(app=asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/openapi.json")
    assert r.status_code == 200
    assert r.json() == openapi_document(LIMITS)
    assert r.json()["openapi"].startswith("3.1")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=60)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, asgi_app: Starlette) -> None:
    """Generated requests (valid and invalid) get documented, non-5xx answers."""
    case.call_and_validate(
        app=asgi_app, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS
    )
