"""Edge cases of the API: racing idempotent creates, range requests, bodies that are not JSON, and
what a job process inherits from the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

import service.routes.jobs as job_routes

CONVERSION = {"model": "prajjwal1/bert-tiny", "gmnm": {"num_components": 4}}


def assert_envelope(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return dict(error)


# idempotency


def test_racing_creates_with_one_idempotency_key_all_answer_the_same_job(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(run_supervisor=False)

    # Hold every request between its idempotency-key lookup and its insert, so that on
    # PostgreSQL all of them find no job for the key and all try to insert one.
    build = job_routes.conversion_spec

    def slow_spec(*args: Any) -> dict[str, Any]:
        time.sleep(0.3)
        return build(*args)

    monkeypatch.setattr(job_routes, "conversion_spec", slow_spec)
    headers = {"Idempotency-Key": "race-1"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda _: client.post("/v1/conversions", json=CONVERSION, headers=headers),
                range(8),
            )
        )

    assert [answer.status_code for answer in answers].count(202) == 1, [a.text for a in answers]
    assert all(answer.status_code in (200, 202) for answer in answers)
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert len(client.get("/v1/conversions").json()["data"]) == 1

    other = client.post("/v1/conversions", json={**CONVERSION, "dry_run": True}, headers=headers)
    assert_envelope(other, 409, "Idempotency-Key")
