"""Fixtures for the service tests: a data directory per test, the app with its supervisor, and
job programs (the protocol-following fake, or the real engine)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import fast_settings

from service.app import create_app


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
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
