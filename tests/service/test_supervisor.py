"""The supervisor against real processes: cancel with signals, the grace period, lost workers,
atomic claims, and a clean shutdown that requeues."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from postgres_helpers import SKIP_REASON, postgres_available, postgres_schema
from service_helpers import fake_commands, fast_settings, process_running, upload, wait_for
from sqlalchemy import select
from sqlalchemy.engine import make_url

import service.supervisor
from service.db import QUEUED, RUNNING, Database, Job, upgrade
from service.executors import Launch
from service.supervisor import Supervisor

JSONL = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


def start_job(client: TestClient, max_steps: int = 200) -> str:
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "prajjwal1/bert-tiny",
            "training_file": upload(client, JSONL),
            "hyperparameters": {"max_steps": max_steps},
        },
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job_dir(client: TestClient, job_id: str) -> Path:
    return Path(client.app.state.context.layout.job_dir(job_id))  # type: ignore[attr-defined]


def get(client: TestClient, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/fine_tuning/jobs/{job_id}").json())


def running_with_steps(client: TestClient, job_id: str, steps: int = 1) -> dict[str, Any]:
    return wait_for(
        lambda: get(client, job_id),
        lambda job: job["status"] == "running" and (job["progress"]["step"] or 0) >= steps,
    )


def test_cancel_running_job_ends_cancelled_with_a_checkpoint_and_no_process_left(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(job_commands=fake_commands("--step-seconds", "0.2", "--spawn-child"))
    job_id = start_job(client)
    running_with_steps(client, job_id)
    child = int((job_dir(client, job_id) / "child.pid").read_text())
    parent = client.app.state.context.db  # type: ignore[attr-defined]
    with parent.read() as session:
        pid = session.get(Job, job_id).pid

    # Jobs run below the API's CPU priority, their children too.
    assert os.getpriority(os.PRIO_PROCESS, child) == os.getpriority(os.PRIO_PROCESS, 0) + 10

    started = time.monotonic()
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    done = wait_for(lambda: get(client, job_id), lambda job: job["status"] == "cancelled")
    assert time.monotonic() - started < 10
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints[0]["step_number"] == done["progress"]["step"]
    assert not process_running(pid) and not process_running(child)


def test_job_that_ignores_sigterm_is_killed_after_the_grace_period(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(
        job_commands=fake_commands("--step-seconds", "0.2", "--ignore-sigterm", "--spawn-child"),
        cancel_grace_seconds=1.0,
    )
    job_id = start_job(client)
    running_with_steps(client, job_id)
    child = int((job_dir(client, job_id) / "child.pid").read_text())
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    wait_for(lambda: get(client, job_id), lambda job: job["status"] == "cancelled", timeout=15)
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    assert events[-1]["message"] == "Job cancelled (forcibly)."
    assert not process_running(child)


def test_time_limit_fails_the_job_with_a_code(make_client: Callable[..., TestClient]) -> None:
    client = make_client(
        job_commands=fake_commands("--step-seconds", "0.2"), max_job_minutes=1.5 / 60
    )
    job_id = start_job(client)
    done = wait_for(lambda: get(client, job_id), lambda job: job["status"] == "failed", 20)
    assert done["error"]["code"] == "time_limit_exceeded"


def _database(tmp_path: Path) -> Database:
    settings = fast_settings(tmp_path / "data")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.resolved_database_url)
    if database.is_sqlite:
        upgrade(database)
    return database


def _orphan(database: Database, job_id: str, attempts: int) -> None:
    """Make a job look as if a worker that has since died was running it."""
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    with database.write() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = RUNNING
        job.worker_id = f"{os.uname().nodename}:{dead}:gone"
        job.heartbeat_at = time.time()
        job.attempts = attempts


def test_job_of_a_dead_worker_resumes_from_its_checkpoint(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    database = _database(tmp_path)
    client = make_client(run_supervisor=False)
    job_id = start_job(client, max_steps=6)
    # The dead worker's attempt had reached a checkpoint at step 4.
    out = job_dir(client, job_id)
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "step-4" / "checkpoint.json").write_text('{"step": 4}')
    _orphan(database, job_id, attempts=1)

    settings = fast_settings(tmp_path / "data")
    supervisor = Supervisor(settings, database)
    supervisor.start()
    try:
        done = wait_for(lambda: get(client, job_id), lambda job: job["status"] == "succeeded")
    finally:
        supervisor.stop()
    assert done["attempts"] == 2
    assert (out / "attempts.log").read_text().splitlines()[-1].endswith("resume=True")
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    assert [e["step"] for e in events if e["type"] == "metrics"] == [5, 6]
    assert any("worker running this job stopped" in e["message"] for e in events)


def test_job_whose_attempts_are_spent_fails_with_worker_lost(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    database = _database(tmp_path)
    client = make_client(run_supervisor=False)
    job_id = start_job(client)
    _orphan(database, job_id, attempts=3)
    supervisor = Supervisor(fast_settings(tmp_path / "data", max_attempts=3), database)
    assert supervisor.recover_lost_jobs() == [job_id]
    job = get(client, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"


def _queue(database: Database, count: int) -> list[str]:
    """Queue `count` bare fine-tunes, oldest first; returns their ids in that order."""
    ids = [f"ftjob-{index:03d}" for index in range(count)]
    with database.write() as session:
        for index, job_id in enumerate(ids):
            session.add(
                Job(
                    id=job_id,
                    kind="fine_tune",
                    owner="local",
                    status=QUEUED,
                    request={},
                    spec={},
                    created_at=time.time() + index,
                    attempts=0,
                    resume=False,
                    events_offset=0,
                    result_files=[],
                )
            )
    return ids


def test_concurrent_claims_never_hand_out_a_job_twice(tmp_path: Path) -> None:
    database = _database(tmp_path)
    _queue(database, 40)
    settings = fast_settings(tmp_path / "data")
    claimed: list[str] = []
    lock = threading.Lock()

    def drain(worker: int) -> None:
        supervisor = Supervisor(settings, database, worker_id=f"host:{worker}:x")
        while (job := supervisor.claim("cpu")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=drain, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == [f"ftjob-{index:03d}" for index in range(40)]


def test_stopping_the_server_checkpoints_and_requeues_running_jobs(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(job_commands=fake_commands("--step-seconds", "0.2"))
    job_id = start_job(client)
    running_with_steps(client, job_id, 2)
    client.__exit__(None, None, None)  # lifespan shutdown, as on SIGTERM

    database = _database(tmp_path)
    with database.read() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.resume, job.attempts) == (QUEUED, True, 0)
    steps = sorted(
        int(path.name.removeprefix("step-"))
        for path in (tmp_path / "data" / "jobs" / job_id / "checkpoints").iterdir()
    )
    assert steps and steps[-1] >= 2


def test_unknown_job_program_fails_the_job_with_a_message(
    make_client: Callable[..., TestClient],
) -> None:
    commands = {
        kind: ["gmnm-no-such-program"] for kind in ("fine_tune", "conversion", "evaluation")
    }
    client = make_client(job_commands=commands)
    job_id = start_job(client)
    done = wait_for(lambda: get(client, job_id), lambda job: job["status"] == "failed")
    assert "gmnm-no-such-program" in done["error"]["message"]


class _Endless:
    """An executor whose jobs run until told otherwise, with nothing on this host."""

    pid = 0
    waiting = False

    def launch(self, launch: Launch) -> _Endless:
        return self

    def poll(self) -> int | None:
        return None

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def stop_lost(self, job_id: str) -> None:
        pass


@contextmanager
def _clock_off_by(offset: float) -> Iterator[None]:
    """The supervisor's wall clock, as on a host whose clock is `offset` seconds off."""
    clock = SimpleNamespace(
        time=lambda: time.time() + offset, monotonic=time.monotonic, sleep=time.sleep
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service.supervisor, "time", clock)
        yield


@pytest.mark.parametrize(
    ("worker_offset", "judge_offset"),
    [(-3600.0, 0.0), (0.0, 3600.0)],
    ids=["worker-clock-behind", "judge-clock-ahead"],
)
def test_a_heartbeating_worker_keeps_its_job_however_far_the_hosts_clocks_differ(
    tmp_path: Path,
    backend: str,
    worker_offset: float,
    judge_offset: float,
) -> None:
    database = _database(tmp_path)
    (job_id,) = _queue(database, 1)
    settings = {"worker_timeout_seconds": 1.0, "heartbeat_seconds": 0.1}
    worker = Supervisor(
        fast_settings(tmp_path / "data", worker_hostname="host-a", **settings),
        database,
        executor=_Endless(),
    )
    judge = Supervisor(
        fast_settings(tmp_path / "data", worker_hostname="host-b", **settings),
        database,
        executor=_Endless(),
    )
    with _clock_off_by(worker_offset):
        worker._register()
        worker.tick()
    assert job_id in worker.running

    # for twice the timeout the worker heartbeats and the other host finds nothing lost
    deadline = time.monotonic() + 2 * settings["worker_timeout_seconds"]
    while time.monotonic() < deadline:
        with _clock_off_by(worker_offset):
            worker.tick()
        with _clock_off_by(judge_offset):
            assert judge.recover_lost_jobs() == []
        time.sleep(0.05)

    # once it falls silent for longer than the timeout, its job is requeued
    time.sleep(1.5 * settings["worker_timeout_seconds"])
    with _clock_off_by(judge_offset):
        assert judge.recover_lost_jobs() == [job_id]
    with database.read() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.worker_id) == (QUEUED, None)
    database.dispose()


@contextmanager
def _postgres_with_lock_timeout(seconds: float) -> Iterator[Database]:
    """A PostgreSQL schema of its own, whose lock waits give up after `seconds`: a claim that
    waits for a row lock instead of skipping the row fails the test rather than hanging it."""
    with postgres_schema() as url:
        parsed = make_url(url)
        options = f"{parsed.query['options']} -c lock_timeout={int(seconds * 1000)}"
        database = Database(parsed.update_query_dict({"options": options}).render_as_string(False))
        try:
            yield database
        finally:
            database.dispose()


@contextmanager
def _row_locked_elsewhere(database: Database, job_id: str) -> Iterator[None]:
    """Another worker's transaction, in the middle of taking or settling the job."""
    with database.write() as session:
        session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
        yield


@pytest.mark.skipif(not postgres_available(), reason=SKIP_REASON)
def test_a_claim_skips_a_job_locked_by_another_worker_instead_of_waiting(tmp_path: Path) -> None:
    with _postgres_with_lock_timeout(5.0) as database:
        oldest, younger = _queue(database, 2)
        supervisor = Supervisor(fast_settings(tmp_path / "data"), database)
        with _row_locked_elsewhere(database, oldest):
            started = time.monotonic()
            claimed = supervisor.claim()
            waited = time.monotonic() - started
        assert claimed is not None and claimed.id == younger
        assert waited < 1.0


@pytest.mark.skipif(not postgres_available(), reason=SKIP_REASON)
def test_recovery_skips_a_lost_job_another_worker_is_settling(tmp_path: Path) -> None:
    with _postgres_with_lock_timeout(5.0) as database:
        (job_id,) = _queue(database, 1)
        with database.write() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.worker_id, job.attempts = RUNNING, "host-gone:1:x", 1
            job.heartbeat_at = database.clock(session) - 3600
        supervisor = Supervisor(fast_settings(tmp_path / "data"), database)
        with _row_locked_elsewhere(database, job_id):
            started = time.monotonic()
            assert supervisor.recover_lost_jobs() == []
            waited = time.monotonic() - started
        assert waited < 1.0
        assert supervisor.recover_lost_jobs() == [job_id]
