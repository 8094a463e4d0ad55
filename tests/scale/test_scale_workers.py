"""Several hosts sharing one queue: `gmnm worker` processes against one PostgreSQL database and
one data directory, each recording its own host name as separate hosts would."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scale_helpers import WorkerProcess, fake_commands, wait_for

from service.app import create_app
from service.db import Database, Job
from service.settings import Settings

pytestmark = pytest.mark.slow

JSONL = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


def worker_env(database_url: str, *knobs: str) -> dict[str, str]:
    return {
        "GMNM_DATABASE_URL": database_url,
        "GMNM_JOB_COMMANDS": json.dumps(fake_commands(*knobs)),
        "GMNM_POLL_SECONDS": "0.05",
        "GMNM_HEARTBEAT_SECONDS": "0.2",
        "GMNM_WORKER_TIMEOUT_SECONDS": "3",
        "GMNM_CANCEL_GRACE_SECONDS": "5",
    }


@pytest.fixture
def api(tmp_path: Path, postgres_url: str) -> Iterator[TestClient]:
    """The API alone (no supervisor of its own) on the shared database and data directory."""
    settings = Settings(
        data_dir=tmp_path / "shared",
        database_url=postgres_url,
        run_supervisor=False,
        max_active_jobs_per_key=100,
        api_keys=[],
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def create_jobs(api: TestClient, count: int, max_steps: int) -> list[str]:
    upload = api.post(
        "/v1/files", files={"file": ("t.jsonl", JSONL)}, data={"purpose": "fine-tune"}
    )
    body = {
        "model": "prajjwal1/bert-tiny",
        "training_file": upload.json()["id"],
        "hyperparameters": {"max_steps": max_steps},
    }
    ids = []
    for _ in range(count):
        response = api.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 202, response.text
        ids.append(str(response.json()["id"]))
    return ids


def jobs(database_url: str, ids: list[str]) -> dict[str, Job]:
    database = Database(database_url)
    with database.read() as session:
        found = {job_id: session.get(Job, job_id) for job_id in ids}
    database.dispose()
    assert all(job is not None for job in found.values())
    return found  # type: ignore[return-value]


def attempts_log(data_dir: Path, job_id: str) -> list[str]:
    return (data_dir / "jobs" / job_id / "attempts.log").read_text().splitlines()


def test_three_workers_drain_thirty_jobs_and_run_each_exactly_once(
    api: TestClient, workers: list[WorkerProcess], postgres_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    ids = create_jobs(api, 30, max_steps=3)
    env = worker_env(postgres_url, "--step-seconds", "0.02")
    workers += [WorkerProcess(data_dir, env, name) for name in ("a", "b", "c")]

    finished = wait_for(
        lambda: jobs(postgres_url, ids),
        lambda found: all(job.status == "succeeded" for job in found.values()),
        180,
        "all 30 jobs succeeding",
    )
    for job_id, job in finished.items():
        assert job.attempts == 1, job_id
        assert len(attempts_log(data_dir, job_id)) == 1, job_id  # one start of the program
    hosts = {job.worker_id.partition(":")[0] for job in finished.values() if job.worker_id}
    assert len(hosts) >= 2, hosts  # the queue really was shared


def test_killing_a_worker_mid_job_gets_its_job_finished_by_another(
    api: TestClient, workers: list[WorkerProcess], postgres_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    (job_id,) = create_jobs(api, 1, max_steps=24)
    env = worker_env(postgres_url, "--step-seconds", "0.25", "--checkpoint-every", "2")
    workers += [WorkerProcess(data_dir, env, name) for name in ("a", "b")]

    def progress() -> dict[str, Any]:
        job = jobs(postgres_url, [job_id])[job_id]
        return {"status": job.status, "step": (job.progress or {}).get("step") or 0, "job": job}

    running = wait_for(progress, lambda p: p["status"] == "running" and p["step"] >= 4, 60, "run")
    held_by = running["job"].worker_id
    victim = next(w for w in workers if held_by.startswith(f"host-{w.name}:{w.pid}:"))

    # a dead host: the worker and its job's processes vanish at once, without a word
    os.kill(victim.pid, signal.SIGKILL)
    os.killpg(running["job"].pid, signal.SIGKILL)
    victim.process.wait()

    done = wait_for(progress, lambda p: p["status"] == "succeeded", 90, "the job to finish")
    job = done["job"]
    survivor = next(w for w in workers if w is not victim)
    assert job.worker_id.startswith(f"host-{survivor.name}:")
    assert job.attempts == 2
    starts = attempts_log(data_dir, job_id)
    assert len(starts) == 2 and starts[1].endswith("resume=True")
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    requeued = [
        i for i, e in enumerate(events) if "worker running this job stopped" in e["message"]
    ]
    assert len(requeued) == 1
    before, after = (
        [e["step"] for e in part if e["type"] == "metrics"]
        for part in (events[: requeued[0]], events[requeued[0] :])
    )
    # the second attempt continued from a checkpoint (every 2 steps) of the first, losing at most
    # the steps since it
    resumed_from = after[0] - 1
    assert resumed_from % 2 == 0 and max(before) - 2 <= resumed_from <= max(before)
    assert after == list(range(after[0], 25))
