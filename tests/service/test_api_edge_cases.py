"""Edge cases of the API: racing idempotent creates, range requests, bodies that are not JSON, and
what a job process inherits from the server."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import upload, wait_for

import service.routes.jobs as job_routes
from service.executors import Launch, LocalExecutor

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


# range requests

JSONL = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


def assert_range_refusals(client: TestClient, path: str, size: int) -> None:
    """A malformed Range answers 400 and one past the end 416, both in the envelope."""
    malformed = client.get(path, headers={"Range": "bytes=abc"})
    error = assert_envelope(malformed, 400, "Range")
    assert error["code"] == "invalid_range"
    assert "bytes=abc" in error["message"] and f"{size} bytes" in error["message"]

    backwards = client.get(path, headers={"Range": "bytes=20-10"})
    assert "ends before it starts" in assert_envelope(backwards, 400, "Range")["message"]

    past_the_end = client.get(path, headers={"Range": f"bytes={size}-"})
    error = assert_envelope(past_the_end, 416, "Range")
    assert error["code"] == "range_not_satisfiable"
    assert past_the_end.headers["content-range"] == f"bytes */{size}"
    assert f"bytes=0-{size - 1}" in error["message"]

    # what the refusals leave alone: a satisfiable range, and a range under a stale If-Range
    partial = client.get(path, headers={"Range": "bytes=2-5"})
    assert partial.status_code == 206 and len(partial.content) == 4
    stale = client.get(path, headers={"Range": "bytes=abc", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and len(stale.content) == size


def test_file_content_refuses_bad_ranges_in_the_envelope(client: TestClient) -> None:
    file_id = upload(client, JSONL)
    assert_range_refusals(client, f"/v1/files/{file_id}/content", len(JSONL))


def test_checkpoint_content_refuses_bad_ranges_in_the_envelope(client: TestClient) -> None:
    body = {
        "model": "prajjwal1/bert-tiny",
        "training_file": upload(client, JSONL),
        "task": "text-classification",
        "hyperparameters": {"max_steps": 2},
    }
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 202, created.text
    job = wait_for(
        lambda: client.get(created.headers["location"]).json(),
        lambda job: job["status"] in ("succeeded", "failed"),
    )
    assert job["status"] == "succeeded", job
    checkpoint = client.get(f"/v1/checkpoints/{job['fine_tuned_model']}").json()
    assert_range_refusals(client, checkpoint["content_url"], checkpoint["size"])


def test_openapi_documents_416_on_the_content_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/files/{file_id}/content", "/v1/checkpoints/{checkpoint_id}/content"):
        refused = paths[path]["get"]["responses"]["416"]
        assert refused["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert "Content-Range" in refused["headers"]


# request bodies


def test_a_body_that_is_not_json_is_named_with_the_position_of_the_mistake(
    client: TestClient,
) -> None:
    response = client.post(
        "/v1/conversions",
        content=b'{"model": "prajjwal1/bert-tiny",\n "dry_run": tru}',
        headers={"Content-Type": "application/json"},
    )
    error = assert_envelope(response, 400, "body")
    assert error["code"] == "invalid_json"
    message = error["message"]
    assert "not valid JSON" in message and "line 2, column 13" in message
    assert "1:" not in message


# job processes

# What the server's own environment may hold that a job process has no use for.
SERVER_SECRETS = {
    "GMNM_API_KEYS": "key-alice,key-bob",
    "GMNM_API_KEYS_FILE": "/etc/gmnm/keys",
    "GMNM_DATABASE_URL": "postgresql+psycopg://gmnm:hunter2@db/gmnm",
    "GMNM_RAY_AUTH_TOKEN": "ray-token",
    "GMNM_RAY_AUTH_TOKEN_FILE": "/etc/gmnm/ray-token",
    "RAY_AUTH_TOKEN": "ray-token",
    "RAY_AUTH_TOKEN_PATH": "/etc/gmnm/ray-token",
    "PGPASSWORD": "hunter2",
    # settings are read whatever the case of the variable's name
    "gmnm_api_keys": "key-carol",
}
DUMP_ENVIRONMENT = "import json, os; json.dump(dict(os.environ), open('environment.json', 'w'))"


def test_job_processes_do_not_inherit_the_servers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_TOKEN", "hf-token")
    monkeypatch.setenv("GMNM_CACHE_DIR", str(tmp_path / "cache"))
    out_dir = tmp_path / "ftjob-env"
    launch = Launch(
        job_id="ftjob-env",
        kind="fine_tune",
        program=[sys.executable, "-c", DUMP_ENVIRONMENT],
        arguments=["--spec", str(out_dir / "spec.json"), "--out", str(out_dir)],
        out_dir=out_dir,
        devices=["cpu"],
        env={"GMNM_JOB_ID": "ftjob-env"},
    )

    handle = LocalExecutor().launch(launch)
    deadline = time.monotonic() + 30
    while handle.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.poll() == 0, (out_dir / "job.log").read_text()
    environment = json.loads((out_dir / "environment.json").read_text())

    assert sorted(set(SERVER_SECRETS) & set(environment)) == []
    # what a job does need still reaches it
    assert environment["GMNM_JOB_ID"] == "ftjob-env"
    assert environment["GMNM_DEVICE"] == "cpu"
    assert environment["HF_TOKEN"] == "hf-token"
    assert environment["GMNM_CACHE_DIR"] == str(tmp_path / "cache")
    assert environment["PATH"]
