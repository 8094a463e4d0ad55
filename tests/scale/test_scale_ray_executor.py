"""How the Ray executor maps Ray's job states onto the service's, against a stand-in for the Jobs
API client (the real cluster is exercised in test_scale_ray.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import service.executors_ray
from service.db import CANCELLING, QUEUED, RUNNING, Database, EventRecord, Job, upgrade
from service.executors import ExecutorUnavailableError, Launch
from service.executors_ray import RayExecutor, RayJobHandle
from service.settings import Settings
from service.supervisor import Supervisor
from training import protocol


class Status(str):
    def is_terminal(self) -> bool:
        return self in ("STOPPED", "SUCCEEDED", "FAILED")


@dataclass
class Info:
    status: Status
    driver_exit_code: int | None = None
    message: str | None = None


class JobsApi:
    """Answers like `JobSubmissionClient` for the jobs it was told about."""

    def __init__(self, jobs: dict[str, Info] | None = None, down: bool = False) -> None:
        self.jobs = jobs or {}
        self.down = down
        self.calls: list[tuple[str, str]] = []

    def _find(self, job_id: str) -> Info:
        if self.down:
            raise ConnectionError("Connection refused")
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return self.jobs[job_id]

    def get_job_info(self, job_id: str) -> Info:
        return self._find(job_id)

    def get_job_status(self, job_id: str) -> Status:
        return self._find(job_id).status

    def get_job_logs(self, job_id: str) -> str:
        return "the driver's output\n"

    def stop_job(self, job_id: str) -> bool:
        self.calls.append(("stop", job_id))
        return True

    def delete_job(self, job_id: str) -> bool:
        self.calls.append(("delete", job_id))
        del self.jobs[job_id]
        return True

    def submit_job(self, **submission: Any) -> str:
        if self.down:
            raise ConnectionError("Connection refused")
        self.calls.append(("submit", submission["submission_id"]))
        self.jobs[submission["submission_id"]] = Info(Status("PENDING"))
        return str(submission["submission_id"])


def handle(out: Path, info: Info | None) -> tuple[RayJobHandle, JobsApi]:
    api = JobsApi({} if info is None else {"ftjob-1": info})
    return RayJobHandle(api, "ftjob-1", out), api


def error_of(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / protocol.ERROR_FILE).read_text()))


def checkpoint(out: Path, step: int) -> None:
    directory = out / protocol.CHECKPOINTS_DIR / f"{protocol.CHECKPOINT_PREFIX}{step}"
    directory.mkdir(parents=True)
    (directory / protocol.CHECKPOINT_INFO_FILE).write_text(json.dumps({"step": step}))


def metrics_event(out: Path, step: int) -> None:
    with (out / protocol.EVENTS_FILE).open("a") as events:
        events.write(json.dumps({"type": "metrics", "step": step, "values": {}}) + "\n")


def test_running_and_succeeded_jobs_map_to_running_and_exit_ok_with_the_log_kept(
    tmp_path: Path,
) -> None:
    job, api = handle(tmp_path, Info(Status("RUNNING")))
    assert job.poll() is None
    api.jobs["ftjob-1"] = Info(Status("SUCCEEDED"), 0)
    job._asked_at = 0.0
    assert job.poll() == protocol.EXIT_OK
    assert (tmp_path / "job.log").read_text() == "the driver's output\n"


def test_a_pending_ray_job_is_waiting_until_the_cluster_starts_it(tmp_path: Path) -> None:
    job, api = handle(tmp_path, Info(Status("PENDING")))
    assert job.poll() is None and job.waiting
    api.jobs["ftjob-1"] = Info(Status("RUNNING"))
    job._asked_at = 0.0
    assert job.poll() is None and not job.waiting


def test_a_failed_ray_job_keeps_the_engines_error_or_records_rays_message(tmp_path: Path) -> None:
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / protocol.ERROR_FILE).write_text('{"code": "invalid_data", "message": "x"}')
    job, _ = handle(tmp_path / "own", Info(Status("FAILED"), 2, "exit code 2"))
    assert job.poll() == 2
    assert error_of(tmp_path / "own")["code"] == "invalid_data"

    (tmp_path / "none").mkdir()
    job, _ = handle(tmp_path / "none", Info(Status("FAILED"), None, "gmnm-train: not found"))
    assert job.poll() == protocol.EXIT_FAILED
    assert "gmnm-train: not found" in error_of(tmp_path / "none")["message"]


def test_a_stop_through_the_service_is_a_cancel_after_a_checkpoint_or_a_forced_one(
    tmp_path: Path,
) -> None:
    for name, checkpointed_step in (("clean", 5), ("forced", 4)):
        out = tmp_path / name
        out.mkdir()
        metrics_event(out, 5)
        checkpoint(out, checkpointed_step)
        job, api = handle(out, Info(Status("RUNNING")))
        job.terminate()
        assert api.calls == [("stop", "ftjob-1")]
        api.jobs["ftjob-1"] = Info(Status("STOPPED"))
        expected = protocol.EXIT_CANCELLED if name == "clean" else -9
        assert job.poll() == expected, name


def test_a_stop_on_the_cluster_itself_fails_the_job_saying_so(tmp_path: Path) -> None:
    job, _ = handle(tmp_path, Info(Status("STOPPED")))
    assert job.poll() == protocol.EXIT_FAILED
    assert "stopped on the cluster" in error_of(tmp_path)["message"]


def test_a_job_the_cluster_forgot_fails_as_worker_lost(tmp_path: Path) -> None:
    job, _ = handle(tmp_path, None)
    assert job.poll() == protocol.EXIT_FAILED
    assert error_of(tmp_path)["code"] == "worker_lost"


def test_an_unreachable_cluster_leaves_a_running_job_running(tmp_path: Path) -> None:
    job, api = handle(tmp_path, Info(Status("RUNNING")))
    api.down = True
    assert job.poll() is None
    assert not (tmp_path / protocol.ERROR_FILE).exists()


def launch(tmp_path: Path) -> Launch:
    return Launch(
        job_id="ftjob-1",
        kind="fine_tune",
        program=["gmnm-train"],
        arguments=["--spec", "s.json", "--out", str(tmp_path)],
        out_dir=tmp_path,
        devices=["cpu"],
    )


def executor(api: JobsApi) -> RayExecutor:
    ray = RayExecutor("http://head:8265")
    ray._client = api
    return ray


def test_a_job_still_running_on_the_cluster_is_watched_again_not_submitted_twice(
    tmp_path: Path,
) -> None:
    api = JobsApi({"ftjob-1": Info(Status("RUNNING"))})
    executor(api).launch(launch(tmp_path))
    assert api.calls == []

    api.jobs["ftjob-1"] = Info(Status("FAILED"), 1)
    executor(api).launch(launch(tmp_path))
    assert api.calls == [("delete", "ftjob-1"), ("submit", "ftjob-1")]


def test_an_unreachable_cluster_keeps_the_job_queued(tmp_path: Path) -> None:
    with pytest.raises(ExecutorUnavailableError, match="http://head:8265"):
        executor(JobsApi(down=True)).launch(launch(tmp_path))


def test_a_job_waiting_for_cluster_resources_says_so_and_its_time_limit_starts_when_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.executors_ray, "STATUS_INTERVAL_SECONDS", 0.0)
    limit_seconds = 0.5
    settings = Settings(
        data_dir=tmp_path / "data",
        executor="ray",
        ray_address="http://head:8265",
        max_job_minutes=limit_seconds / 60,
        api_keys=[],
    )
    settings.data_dir.mkdir()
    database = Database(settings.resolved_database_url)
    upgrade(database)
    with database.write() as session:
        session.add(
            Job(
                id="ftjob-1",
                kind="fine_tune",
                owner="local",
                status=QUEUED,
                request={},
                spec={},
                created_at=time.time(),
                attempts=0,
                resume=False,
                events_offset=0,
                result_files=[],
            )
        )
    api = JobsApi()
    supervisor = Supervisor(settings, database, executor=executor(api))
    supervisor._register()

    def status_and_messages() -> tuple[str, list[str]]:
        with database.read() as session:
            job = session.get(Job, "ftjob-1")
            assert job is not None
            events = session.scalars(
                select(EventRecord.message)
                .where(EventRecord.job_id == job.id)
                .order_by(EventRecord.seq)
            )
            return job.status, list(events)

    # submitted, and Ray holds it PENDING for longer than the time limit
    supervisor.tick()
    assert api.calls == [("submit", "ftjob-1")]
    time.sleep(1.5 * limit_seconds)
    supervisor.tick()
    status, messages = status_and_messages()
    assert status == RUNNING and ("stop", "ftjob-1") not in api.calls
    assert "waiting on the Ray cluster" in messages[-1]

    # the cluster starts it: the time limit counts from here
    api.jobs["ftjob-1"] = Info(Status("RUNNING"))
    supervisor.tick()
    status, messages = status_and_messages()
    assert status == RUNNING and ("stop", "ftjob-1") not in api.calls
    assert "running on the Ray cluster" in messages[-1]
    time.sleep(1.5 * limit_seconds)
    supervisor.tick()
    assert status_and_messages()[0] == CANCELLING and ("stop", "ftjob-1") in api.calls
    database.dispose()
