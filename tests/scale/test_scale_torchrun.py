"""Several processes per job on one host: a fine-tune with `num_processes: 2` runs through the
service under torchrun (two gloo ranks on CPU), holding two device slots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scale_helpers import engine_commands, fine_tune_body, reviews, wait_for

from service.app import create_app
from service.db import Job
from service.executors import job_processes
from service.settings import Settings

pytestmark = pytest.mark.slow

FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def client(tmp_path: Path, tiny_bert: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        devices=["cpu", "cpu"],
        # conversions run the fast fake job: a one-device job to queue behind a two-device one
        job_commands=engine_commands(fake_kinds=("conversion",)),
        model_dirs=[tiny_bert.parent],
        poll_seconds=0.1,
        heartbeat_seconds=0.5,
        cancel_grace_seconds=60,
        api_keys=[],
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(client: TestClient) -> str:
    response = client.post(
        "/v1/files", files={"file": ("reviews.jsonl", reviews())}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def start(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def get(client: TestClient, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/fine_tuning/jobs/{job_id}").json())


def events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job, oldest first."""
    listed: list[dict[str, Any]] = []
    after = None
    while True:
        query = f"?limit=100&after={after}" if after else "?limit=100"
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events{query}").json()
        listed += page["data"]
        if not page["has_more"]:
            return listed
        after = page["last_id"]


def train_steps(listed: list[dict[str, Any]]) -> list[int]:
    """The steps of the training metrics events (one per logging interval)."""
    return [
        event["step"]
        for event in listed
        if event["type"] == "metrics" and "train_loss" in (event["data"] or {}).get("values", {})
    ]


def record(client: TestClient, job_id: str) -> Job:
    with client.app.state.context.db.read() as session:  # type: ignore[attr-defined]
        found = session.get(Job, job_id)
        assert found is not None
        return found


def test_two_process_fine_tune_runs_under_torchrun_and_holds_both_devices(
    client: TestClient, tiny_bert: Path
) -> None:
    file_id = upload(client)
    job_id = start(
        client,
        fine_tune_body(tiny_bert, file_id, num_processes=2, max_steps=4, checkpoint_interval=2),
    )
    conversion = client.post("/v1/conversions", json={"model": str(tiny_bert)})
    assert conversion.status_code == 202, conversion.text

    done = wait_for(lambda: get(client, job_id), lambda job: job["status"] in FINAL, 300, "finish")
    assert done["status"] == "succeeded", done["error"]
    assert done["device"] == "cpu*2"
    converted = wait_for(
        lambda: client.get(f"/v1/conversions/{conversion.json()['id']}").json(),
        lambda job: job["status"] in FINAL,
        60,
        "the conversion to finish",
    )
    assert converted["status"] == "succeeded"
    # the one-device job could only start once the two-process job had released both devices
    assert record(client, converted["id"]).started_at >= record(client, job_id).finished_at  # type: ignore[operator]

    # the same events, checkpoints and metrics as one process: rank 0 alone writes them
    listed = events(client, job_id)
    assert train_steps(listed) == [1, 2, 3, 4]
    assert any("2 processes" in event["message"] for event in listed)
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted(c["step_number"] for c in checkpoints) == [2, 4]
    assert "valid_loss" in done["metrics"] and done["progress"]["step"] == 4


def test_cancelling_a_torchrun_job_stops_every_rank_after_a_checkpoint_and_it_resumes(
    client: TestClient, tiny_bert: Path
) -> None:
    file_id = upload(client)
    body = fine_tune_body(
        tiny_bert, file_id, num_processes=2, max_steps=300, checkpoint_interval=100
    )
    job_id = start(client, body)
    wait_for(
        lambda: get(client, job_id),
        lambda job: job["status"] == "running" and (job["progress"]["step"] or 0) >= 2,
        300,
        "training to start",
    )
    processes = job_processes(job_id)
    assert len(processes) >= 3, processes  # torchrun and its two ranks
    # torchrun started the ranks (gmnm-train alone would start them itself, without it)
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in processes]
    assert sum(b"torch.distributed.run" in command for command in commands) == 1, commands
    ranks = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in processes]
    elastic = [e for e in ranks if any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in e)]
    assert len(elastic) >= 2, "no two processes carry torchrun's rendezvous environment"

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    stopped = wait_for(lambda: get(client, job_id), lambda job: job["status"] in FINAL, 90, "stop")
    assert stopped["status"] == "cancelled"
    assert events(client, job_id)[-1]["message"] == "Job cancelled (after a checkpoint)."
    step = stopped["progress"]["step"]
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints[0]["step_number"] == step < 300
    assert job_processes(job_id) == []

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 200
    done = wait_for(lambda: get(client, job_id), lambda job: job["status"] in FINAL, 300, "resume")
    assert done["status"] == "succeeded", done["error"]
    listed = events(client, job_id)
    resumed_at = next(i for i, event in enumerate(listed) if event["message"].startswith("Resumed"))
    resumed = train_steps(listed[resumed_at:])
    assert resumed == list(range(step + 1, 301))
    assert job_processes(job_id) == []
