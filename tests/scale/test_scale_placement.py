"""Placing jobs on device slots, handing jobs between workers, and what the Ray executor submits,
checked against the supervisor with a recording executor (no job processes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from scale_helpers import fake_commands

from service.app import create_app
from service.db import QUEUED, RUNNING, SUCCEEDED, Database, EventRecord, Job, upgrade
from service.executors import (
    ExecutorUnavailableError,
    Launch,
    device_environment,
    torchrun_command,
)
from service.executors_ray import RayExecutor
from service.ray_train import placement_strategy
from service.settings import Settings
from service.supervisor import Supervisor, requested_nodes


class RecordedHandle:
    pid = 99_999_999  # no such process: nothing real is ever signalled
    waiting = False

    def __init__(self) -> None:
        self.status: int | None = None
        self.killed = False

    def poll(self) -> int | None:
        return self.status

    def terminate(self) -> None:
        self.status = 3

    def kill(self) -> None:
        self.killed = True


class RecordingExecutor:
    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.handles: dict[str, RecordedHandle] = {}

    def launch(self, launch: Launch) -> RecordedHandle:
        self.launches.append(launch)
        self.handles[launch.job_id] = RecordedHandle()
        return self.handles[launch.job_id]

    def stop_lost(self, job_id: str) -> None:
        pass


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "job_commands": fake_commands(),
        "poll_seconds": 0.05,
        "heartbeat_seconds": 0.05,
        "api_keys": [],
        "run_supervisor": False,
        **overrides,
    }
    return Settings(**values)


def database(config: Settings) -> Database:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(config.resolved_database_url)
    upgrade(db)
    return db


def queue(db: Database, name: str, processes: int, kind: str = "fine_tune") -> str:
    job_id = f"ftjob-{name}"
    with db.write() as session:
        session.add(
            Job(
                id=job_id,
                kind=kind,
                owner="local",
                status=QUEUED,
                request={},
                spec={"device": "auto", "hyperparameters": {"num_processes": processes}},
                created_at=time.time(),
                attempts=0,
                resume=False,
                events_offset=0,
                result_files=[],
            )
        )
    time.sleep(0.01)  # distinct creation times keep the queue's order
    return job_id


def job(db: Database, job_id: str) -> Job:
    with db.read() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def launched(executor: RecordingExecutor) -> list[str]:
    return [launch.job_id for launch in executor.launches]


def test_a_job_needing_two_devices_waits_until_two_are_free_and_younger_jobs_wait_behind_it(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path, devices=["cpu", "cpu"])
    db = database(config)
    executor = RecordingExecutor()
    supervisor = Supervisor(config, db, executor=executor)
    one = queue(db, "one", 1)
    two = queue(db, "two", 2)
    last = queue(db, "last", 1)

    supervisor.tick()
    assert launched(executor) == [one]
    assert job(db, two).status == QUEUED and job(db, last).status == QUEUED

    executor.handles[one].status = 0
    supervisor.tick()
    assert job(db, one).status == SUCCEEDED
    assert launched(executor) == [one, two]
    both = executor.launches[-1]
    assert (both.devices, both.num_processes) == (["cpu", "cpu"], 2)
    assert job(db, two).device == "cpu*2"
    assert job(db, last).status == QUEUED

    executor.handles[two].status = 0
    supervisor.tick()
    assert launched(executor) == [one, two, last]


def test_a_job_needing_more_devices_than_the_worker_has_is_left_to_others_with_an_event(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path, devices=["cpu"])
    db = database(config)
    executor = RecordingExecutor()
    supervisor = Supervisor(config, db, executor=executor)
    big = queue(db, "big", 2)
    small = queue(db, "small", 1)

    supervisor.tick()
    supervisor.tick()
    assert launched(executor) == [small]
    assert job(db, big).status == QUEUED
    with db.read() as session:
        warnings = [
            event.message
            for event in session.query(EventRecord).filter_by(job_id=big, level="warn")
        ]
    assert len(warnings) == 1 and "2 devices" in warnings[0] and "GMNM_DEVICES=cpu" in warnings[0]


def test_gpu_slots_of_a_two_process_job_become_its_visible_devices(tmp_path: Path) -> None:
    config = settings(tmp_path, devices=["cuda:0", "cpu", "cuda:1"])
    db = database(config)
    executor = RecordingExecutor()
    supervisor = Supervisor(config, db, executor=executor)
    first = queue(db, "first", 2)
    second = queue(db, "second", 2)

    supervisor.tick()
    assert launched(executor) == [first]
    launch = executor.launches[0]
    assert launch.devices == ["cuda:0", "cuda:1"]
    assert device_environment(launch.devices) == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "GMNM_DEVICE": "cuda",
    }
    spec = json.loads((launch.out_dir / "spec.json").read_text())
    assert spec["device"] == "cuda"
    assert job(db, first).device == "cuda:0,1"
    # one CPU slot is free, but a job's processes never mix CPU and GPU slots
    assert job(db, second).status == QUEUED


def test_a_worker_whose_job_was_taken_over_stops_its_attempt_and_leaves_the_job_alone(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path)
    db = database(config)
    executor = RecordingExecutor()
    supervisor = Supervisor(config, db, executor=executor)
    job_id = queue(db, "taken", 1)
    supervisor.tick()
    assert launched(executor) == [job_id]

    # while this worker was silent, another requeued the job and runs it now
    with db.write() as session:
        record = session.get(Job, job_id)
        assert record is not None
        record.worker_id = "elsewhere:1:w"
        record.attempts = 2
    supervisor._last_heartbeat = 0.0  # the next tick heartbeats
    supervisor.tick()

    assert executor.handles[job_id].killed
    assert job_id not in supervisor.running
    after = job(db, job_id)
    assert (after.status, after.worker_id, after.attempts) == (RUNNING, "elsewhere:1:w", 2)


class UnavailableExecutor(RecordingExecutor):
    def launch(self, launch: Launch) -> RecordedHandle:
        raise ExecutorUnavailableError("the Ray cluster at http://head:8265 did not answer")


def test_a_job_the_executor_cannot_take_now_goes_back_to_the_queue_unspent(tmp_path: Path) -> None:
    config = settings(tmp_path)
    db = database(config)
    supervisor = Supervisor(config, db, executor=UnavailableExecutor())
    job_id = queue(db, "later", 1)
    supervisor.tick()
    after = job(db, job_id)
    assert (after.status, after.attempts, after.worker_id) == (QUEUED, 0, None)
    with db.read() as session:
        messages = [event.message for event in session.query(EventRecord).filter_by(job_id=job_id)]
    assert any("did not answer" in message for message in messages)
    supervisor.tick()  # backing off: no second try at once
    assert job(db, job_id).status == QUEUED


def test_torchrun_command_runs_the_job_program_as_every_rank() -> None:
    command = torchrun_command(["/venv/bin/gmnm-train", "--spec", "s.json"], 4)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[-3:] == ["/venv/bin/gmnm-train", "--spec", "s.json"]
    assert "--standalone" in command and "--no-python" in command


def api(tmp_path: Path, **overrides: Any) -> TestClient:
    client = TestClient(create_app(settings(tmp_path, **overrides)))
    client.__enter__()
    return client


def create(client: TestClient, **hyperparameters: Any) -> Any:
    upload = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", b'{"text": "a", "label": 0}\n')},
        data={"purpose": "fine-tune"},
    )
    body = {
        "model": "prajjwal1/bert-tiny",
        "training_file": upload.json()["id"],
        "hyperparameters": {"batch_size": 8, **hyperparameters},
    }
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_num_nodes_is_refused_on_one_host_and_when_processes_do_not_divide(
    tmp_path: Path,
) -> None:
    local = api(tmp_path / "local")
    refused = create(local, num_processes=2, num_nodes=2)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "hyperparameters.num_nodes" and "GMNM_EXECUTOR=ray" in error["message"]
    local.__exit__(None, None, None)

    ray = api(tmp_path / "ray", executor="ray", ray_address="http://127.0.0.1:1")
    uneven = create(ray, num_processes=3, num_nodes=2, batch_size=6)
    assert uneven.status_code == 400 and "multiple of 2" in uneven.json()["error"]["message"]
    accepted = create(ray, num_processes=4, num_nodes=2)
    assert accepted.status_code == 202, accepted.text
    with ray.app.state.context.db.read() as session:  # type: ignore[attr-defined]
        record = session.get(Job, accepted.json()["id"])
        assert record is not None
        assert "num_nodes" not in record.spec["hyperparameters"]  # the engine never sees it
        assert requested_nodes(record.request) == 2
    ray.__exit__(None, None, None)


def test_ray_settings_need_an_address() -> None:
    with pytest.raises(ValidationError, match="GMNM_RAY_ADDRESS"):
        Settings(executor="ray")
    assert Settings(executor="ray", ray_address="http://head:8265").concurrency == 16


def launch_of(kind: str, processes: int, nodes: int, devices: list[str]) -> Launch:
    return Launch(
        job_id="ftjob-abc",
        kind=kind,
        program=["gmnm-train"],
        arguments=["--spec", "/data/jobs/ftjob-abc/spec.json", "--out", "/data/jobs/ftjob-abc"],
        out_dir=Path("/data/jobs/ftjob-abc"),
        devices=devices,
        num_processes=processes,
        num_nodes=nodes,
        env={"GMNM_JOB_ID": "ftjob-abc"},
    )


def test_ray_submission_runs_the_same_entry_point_under_the_job_id_with_its_gpu() -> None:
    executor = RayExecutor("http://head:8265", gpus_per_process=1)
    single = executor.submission(launch_of("fine_tune", 1, 1, ["cuda"]))
    assert single["submission_id"] == "ftjob-abc"
    assert single["entrypoint"] == (
        "gmnm-train --spec /data/jobs/ftjob-abc/spec.json --out /data/jobs/ftjob-abc"
    )
    assert (single["entrypoint_num_cpus"], single["entrypoint_num_gpus"]) == (1, 1)
    assert single["runtime_env"]["env_vars"]["GMNM_JOB_ID"] == "ftjob-abc"

    on_cpu = executor.submission(launch_of("fine_tune", 1, 1, ["cpu"]))
    assert "entrypoint_num_gpus" not in on_cpu

    spread = executor.submission(launch_of("fine_tune", 4, 2, ["cuda"]))
    assert spread["entrypoint"].startswith(
        "python -m service.ray_train --num-workers 4 --num-nodes 2 --gpus-per-worker 1 --spec"
    )
    assert spread["entrypoint_num_cpus"] == 0
    assert placement_strategy(4, 2) == "SPREAD"
    assert placement_strategy(2, 2) == "STRICT_SPREAD"
    assert placement_strategy(2, 1) == "PACK"
