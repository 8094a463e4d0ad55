"""Fixtures for the service tests: a data directory per test, the app with its supervisor, and
job programs (the protocol-following fake, or the real engine)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from postgres_helpers import SKIP_REASON, postgres_available, postgres_schema
from service_helpers import DATABASE, fast_settings

from service.app import create_app


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on SQLite, and again on PostgreSQL where a server answers."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    if not postgres_available():
        pytest.skip(SKIP_REASON)
    with postgres_schema() as url:
        DATABASE["url"] = url
        try:
            yield "postgresql"
        finally:
            DATABASE["url"] = None


@pytest.fixture
def make_client(tmp_path: Path, backend: str) -> Iterator[Callable[..., TestClient]]:
    """Build a TestClient on a fresh data directory; the app (and supervisor) stop afterwards."""
    clients: list[TestClient] = []

    def build(**overrides: Any) -> TestClient:
        settings = fast_settings(tmp_path / "data", **overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        if client.portal is not None:  # a test may have stopped it already
            client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()
