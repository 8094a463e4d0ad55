"""Jobs on a Ray cluster: a local Ray head on loopback (CPU only, token authentication on), the
service submitting through the Ray Jobs API with `GMNM_EXECUTOR=ray`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scale_helpers import RayHead, engine_commands, fine_tune_body, reviews, wait_for

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.slow

FINAL = ("succeeded", "failed", "cancelled")


def test_the_clusters_jobs_api_refuses_callers_without_its_token(ray_head: RayHead) -> None:
    from ray.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        ray_head.client(token=None).list_jobs()
    with pytest.raises(AuthenticationError):
        ray_head.client(token="not-the-token").list_jobs()
    assert isinstance(ray_head.client().list_jobs(), list)


def get(client: TestClient, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/fine_tuning/jobs/{job_id}").json())


def events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"])


def start(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_ray_executor_runs_fine_tunes_under_ray_train_and_cancels_another_job(
    ray_head: RayHead, tmp_path: Path, tiny_bert: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        executor="ray",
        ray_address=ray_head.address,
        ray_auth_token=ray_head.token,
        job_commands=engine_commands(),
        model_dirs=[tiny_bert.parent],
        poll_seconds=0.2,
        heartbeat_seconds=0.5,
        cancel_grace_seconds=90,
        api_keys=[],
    )
    cluster = ray_head.client()
    with TestClient(create_app(settings)) as client:
        upload = client.post(
            "/v1/files", files={"file": ("r.jsonl", reviews())}, data={"purpose": "fine-tune"}
        )
        file_id = upload.json()["id"]
        parallel = start(
            client,
            fine_tune_body(tiny_bert, file_id, num_processes=2, max_steps=4, checkpoint_interval=2),
        )
        long = start(
            client, fine_tune_body(tiny_bert, file_id, max_steps=5000, checkpoint_interval=2500)
        )
        broken = fine_tune_body(tiny_bert, file_id, num_processes=2, max_steps=4)
        broken["data"]["text_column"] = "review"  # the file has "text"
        failing = start(client, broken)

        # cancel: the service's stop becomes Ray's stop_job; the engine checkpoints on SIGTERM
        wait_for(
            lambda: get(client, long),
            lambda job: job["status"] == "running" and (job["progress"]["step"] or 0) >= 2,
            300,
            "the single-process Ray job to train",
        )
        assert client.post(f"/v1/fine_tuning/jobs/{long}/cancel").status_code == 200
        stopped = wait_for(lambda: get(client, long), lambda j: j["status"] in FINAL, 120, "stop")
        assert stopped["status"] == "cancelled"
        assert events(client, long)[-1]["message"] == "Job cancelled (after a checkpoint)."
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{long}/checkpoints").json()["data"]
        assert checkpoints[0]["step_number"] == stopped["progress"]["step"] < 5000
        assert str(cluster.get_job_status(long)) == "STOPPED"

        # the data-parallel job: Ray Train workers run the engine's own loop as two ranks
        done = wait_for(lambda: get(client, parallel), lambda j: j["status"] in FINAL, 480, "ddp")
        assert done["status"] == "succeeded", done["error"]
        listed = events(client, parallel)
        train_steps = [
            event["step"]
            for event in listed
            if event["type"] == "metrics" and "train_loss" in event["data"]["values"]
        ]
        assert train_steps == [1, 2, 3, 4]
        assert any("2 processes" in event["message"] for event in listed)
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{parallel}/checkpoints").json()["data"]
        assert sorted(c["step_number"] for c in checkpoints) == [2, 4]
        assert "valid_loss" in done["metrics"]

        # a rank's own error reaches the job through Ray Train and the driver
        failed = wait_for(lambda: get(client, failing), lambda j: j["status"] in FINAL, 300, "fail")
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "invalid_data" and "review" in failed["error"]["message"]

    info = cluster.get_job_info(parallel)  # the service's job id is the submission id
    assert str(info.status) == "SUCCEEDED"
    assert info.entrypoint.startswith("python -m service.ray_train --num-workers 2")
    assert (
        "training worker group of size 2"
        in (tmp_path / "data" / "jobs" / parallel / "job.log").read_text()
    )
