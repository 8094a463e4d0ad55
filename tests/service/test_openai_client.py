"""The official `openai` client drives a running server unchanged (jobs run the fake program)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from service_helpers import ServerProcess, fake_commands, stopped_cleanly

KEY = "sk-test-service"
JSONL = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("openai")
    env = {
        "GMNM_API_KEYS": KEY,
        "GMNM_JOB_COMMANDS": json.dumps(fake_commands("--step-seconds", "0.1")),
        "GMNM_POLL_SECONDS": "0.05",
    }
    server = ServerProcess(root / "data", env).start()
    yield server
    assert stopped_cleanly(server)


@pytest.fixture
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=20)


def wait_status(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.status}")


def test_fine_tune_flow_through_the_openai_client(client: OpenAI) -> None:
    training = client.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", JSONL), purpose="fine-tune")
    assert training.object == "file" and training.bytes == len(JSONL)

    job = client.fine_tuning.jobs.create(
        model="prajjwal1/bert-tiny",
        training_file=training.id,
        validation_file=validation.id,
        hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 2.0},
        seed=11,
        extra_body={
            "task": "text-classification",
            "conversion": {"targets": ["activation"], "gmnm": {"num_components": 4}},
        },
    )
    assert job.object == "fine_tuning.job" and job.status == "queued" and job.seed == 11
    # the service's own fields travel beside OpenAI's and come back on the job
    assert job.task == "text-classification"  # type: ignore[attr-defined]
    assert job.conversion["targets"] == ["activation"]  # type: ignore[attr-defined]
    assert job.conversion["gmnm"]["num_components"] == 4  # type: ignore[attr-defined]
    assert job.hyperparameters.batch_size == 2

    done = client.fine_tuning.jobs.retrieve(job.id)
    done = wait_status(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done  # type: ignore[attr-defined]
    assert done.fine_tuned_model and done.trained_tokens == 6 * 32  # type: ignore[attr-defined]
    assert isinstance(done.finished_at, int)  # type: ignore[attr-defined]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    assert [e.step for e in events if e.type == "metrics"] == [1, 2, 3, 4, 5, 6]  # type: ignore[attr-defined]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model  # type: ignore[attr-defined]
    assert checkpoints[0].step_number == 6

    results = client.files.content(done.result_files[0]).text  # type: ignore[attr-defined]
    assert results.splitlines()[0].startswith("step,")


def test_auto_pagination_walks_every_job(client: OpenAI) -> None:
    training = client.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    created = [
        client.fine_tuning.jobs.create(
            model="prajjwal1/bert-tiny",
            training_file=training.id,
            extra_body={"task": "text-classification"},
        ).id
        for _ in range(3)
    ]
    listed = [job.id for job in client.fine_tuning.jobs.list(limit=1)]
    assert listed[:3] == created[::-1]
    for job_id in created:
        wait_status(client, job_id, {"succeeded"})


def test_cancel_pause_and_resume_through_the_client(client: OpenAI) -> None:
    training = client.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="prajjwal1/bert-tiny",
        training_file=training.id,
        extra_body={"task": "text-classification", "hyperparameters": {"max_steps": 400}},
    )
    wait_status(client, job.id, {"running"})
    client.fine_tuning.jobs.pause(job.id)
    assert wait_status(client, job.id, {"paused"}).status == "paused"  # type: ignore[attr-defined]
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_status(client, job.id, {"running"})
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_status(client, job.id, {"cancelled"}).status == "cancelled"  # type: ignore[attr-defined]


def test_errors_arrive_as_the_clients_own_exceptions(client: OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-nothing")
    assert missing.value.body["code"] == "not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as invalid:
        client.fine_tuning.jobs.create(model="prajjwal1/bert-tiny", training_file="file-nope")
    assert invalid.value.body["param"] == "training_file"  # type: ignore[index]
    stranger = OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.files.list()


def test_server_log_says_when_no_keys_are_configured(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", {"GMNM_API_KEYS": ""}).start()
    assert stopped_cleanly(server)
    assert "no API keys configured" in server.log.read_text()
