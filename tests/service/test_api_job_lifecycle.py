"""A job's life through the ASGI app with the fake job: its estimated finish, stopping and
resuming conversions, evaluations and fine-tunes, their events and checkpoints, and checkpoints
whose files are gone."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import fake_commands, upload, wait_for

JSONL = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'
CONVERSIONS, EVALUATIONS = "/v1/conversions", "/v1/evaluations"


def fine_tune(client: TestClient, max_steps: int = 6) -> str:
    """Start a fine-tune; returns its path."""
    body = {
        "model": "prajjwal1/bert-tiny",
        "training_file": upload(client, JSONL),
        "task": "text-classification",
        "hyperparameters": {"max_steps": max_steps},
    }
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.headers["location"])


def create(client: TestClient, route: str, **extra: Any) -> str:
    """Start a conversion or an evaluation; returns its path."""
    body: dict[str, Any] = {"model": "prajjwal1/bert-tiny", **extra}
    if route == EVALUATIONS:
        body.update(file=upload(client, JSONL), task="text-classification")
    response = client.post(route, json=body)
    assert response.status_code == 202, response.text
    return str(response.headers["location"])


def job(client: TestClient, path: str) -> dict[str, Any]:
    return dict(client.get(path).json())


def finished(client: TestClient, path: str) -> dict[str, Any]:
    terminal = ("succeeded", "failed", "cancelled", "paused")
    return wait_for(lambda: job(client, path), lambda j: j["status"] in terminal)


def events(client: TestClient, path: str) -> list[dict[str, Any]]:
    return list(client.get(f"{path}/events?limit=100").json()["data"])


def checkpoint_steps(client: TestClient, path: str) -> list[int]:
    return [c["step_number"] for c in client.get(f"{path}/checkpoints").json()["data"]]


def assert_envelope(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


# estimated finish


def test_running_fine_tune_estimates_a_near_future_finish_and_none_once_it_succeeds(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(job_commands=fake_commands("--step-seconds", "0.1"))
    path = fine_tune(client, max_steps=40)
    running = wait_for(lambda: job(client, path), lambda j: j["estimated_finish"] is not None)
    assert running["status"] == "running"
    # 40 steps of 0.1 s: the estimate lies ahead, and well within a minute.
    assert time.time() < running["estimated_finish"] < time.time() + 60
    assert finished(client, path)["estimated_finish"] is None


def test_cancelled_fine_tune_has_no_estimated_finish(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(job_commands=fake_commands("--step-seconds", "0.1"))
    path = fine_tune(client, max_steps=200)
    wait_for(lambda: job(client, path), lambda j: j["estimated_finish"] is not None)
    client.post(f"{path}/cancel")
    cancelled = finished(client, path)
    assert cancelled["status"] == "cancelled"
    assert cancelled["estimated_finish"] is None


def test_resumed_fine_tune_estimates_nothing_until_its_new_attempt_has_a_rate(
    make_client: Callable[..., TestClient],
) -> None:
    knobs = ("--step-seconds", "0.1", "--start-seconds", "1.5")
    client = make_client(job_commands=fake_commands(*knobs))
    path = fine_tune(client, max_steps=200)
    wait_for(lambda: job(client, path), lambda j: j["estimated_finish"] is not None)
    client.post(f"{path}/pause")
    assert finished(client, path)["status"] == "paused"

    client.post(f"{path}/resume")
    restarted = wait_for(lambda: job(client, path), lambda j: j["status"] == "running")
    # The new process is still starting: the paused attempt's rate says nothing about it.
    assert restarted["estimated_finish"] is None
    again = wait_for(lambda: job(client, path), lambda j: j["estimated_finish"] is not None)
    assert again["estimated_finish"] > time.time()
    client.post(f"{path}/cancel")
    assert finished(client, path)["status"] == "cancelled"


# conversions and evaluations: cancel, events, checkpoints


@pytest.mark.parametrize("route", [CONVERSIONS, EVALUATIONS])
def test_cancel_queued_conversion_or_evaluation_is_immediate_and_a_second_conflicts(
    make_client: Callable[..., TestClient], route: str
) -> None:
    client = make_client(run_supervisor=False)
    path = create(client, route)
    cancelled = client.post(f"{path}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert events(client, path)[-1]["message"] == "Job cancelled before it started."
    assert_envelope(client.post(f"{path}/cancel"), 409, "job_not_active")


@pytest.mark.parametrize("route", [CONVERSIONS, EVALUATIONS])
def test_cancel_running_conversion_or_evaluation_ends_cancelled(
    make_client: Callable[..., TestClient], route: str
) -> None:
    client = make_client(job_commands=fake_commands("--start-seconds", "60"))
    path = create(client, route)
    wait_for(lambda: job(client, path), lambda j: j["status"] == "running")
    assert client.post(f"{path}/cancel").json()["status"] in ("cancelling", "cancelled")
    done = finished(client, path)
    assert done["status"] == "cancelled"
    assert done.get("checkpoint_id") is None and done.get("result") is None
    assert checkpoint_steps(client, path) == []


@pytest.mark.parametrize("route", [CONVERSIONS, EVALUATIONS])
def test_conversion_and_evaluation_events_page_forward_from_a_cursor(
    client: TestClient, route: str
) -> None:
    path = create(client, route)
    assert finished(client, path)["status"] == "succeeded"
    everything = events(client, path)
    first = client.get(f"{path}/events?limit=2").json()
    rest = client.get(f"{path}/events?limit=100&after={first['last_id']}").json()
    assert first["has_more"] and not rest["has_more"]
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in everything]
    assert everything[-1]["message"] == "The job has successfully completed."


def test_conversion_lists_its_checkpoint_and_an_evaluation_lists_none(client: TestClient) -> None:
    conversion = finished(client, create(client, CONVERSIONS))
    listed = client.get(f"{CONVERSIONS}/{conversion['id']}/checkpoints").json()["data"]
    assert [c["id"] for c in listed] == [conversion["checkpoint_id"]]
    assert listed[0]["fine_tuning_job_id"] == conversion["id"]
    assert listed[0]["step_number"] == 0
    described = client.get(f"/v1/checkpoints/{conversion['checkpoint_id']}")
    assert described.status_code == 200 and described.json()["size"] > 0

    evaluation = finished(client, create(client, EVALUATIONS))
    assert evaluation["status"] == "succeeded"
    assert checkpoint_steps(client, f"{EVALUATIONS}/{evaluation['id']}") == []


def test_dry_run_conversion_holds_the_plan_and_no_checkpoint(client: TestClient) -> None:
    path = create(client, CONVERSIONS, dry_run=True)
    done = finished(client, path)
    assert done["status"] == "succeeded" and done["dry_run"] is True
    assert done["plan"]["sites"]
    assert done["checkpoint_id"] is None
    assert checkpoint_steps(client, path) == []


# resuming


def test_resume_of_a_failed_fine_tune_continues_from_its_last_checkpoint(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(job_commands=fake_commands("--fail-at-step", "5"))
    path = fine_tune(client, max_steps=8)
    failed = finished(client, path)
    assert failed["status"] == "failed" and failed["error"]["code"] == "failed_at_step"
    assert checkpoint_steps(client, path) == [4, 2]

    resumed = client.post(f"{path}/resume")
    assert resumed.status_code == 200
    assert resumed.json()["status"] == "queued" and resumed.json()["error"] is None
    done = finished(client, path)
    assert done["status"] == "succeeded" and done["error"] is None
    assert checkpoint_steps(client, path) == [8, 6, 4, 2]
    messages = [e["message"] for e in events(client, path)]
    assert "training from step 4 to 8" in messages
    # Steps 1-4 ran before the failure and 5-8 after it: none was trained twice.
    steps = [e["step"] for e in events(client, path) if e["type"] == "metrics"]
    assert steps == list(range(1, 9))


def test_resume_of_a_succeeded_fine_tune_is_refused_with_409(client: TestClient) -> None:
    path = fine_tune(client)
    assert finished(client, path)["status"] == "succeeded"
    error = assert_envelope(client.post(f"{path}/resume"), 409, "job_not_resumable")
    assert "succeeded" in error["message"] and "failed" in error["message"]
    assert job(client, path)["status"] == "succeeded"


# checkpoints without their files


def test_checkpoint_whose_directory_is_gone_answers_410_saying_what_to_do(
    client: TestClient, tmp_path: Path
) -> None:
    done = finished(client, fine_tune(client))
    shutil.rmtree(tmp_path / "data" / "jobs" / done["id"] / "checkpoints")
    checkpoint_id = done["fine_tuned_model"]
    for route in ("", "/content", "/content?training_state=true"):
        response = client.get(f"/v1/checkpoints/{checkpoint_id}{route}")
        error = assert_envelope(response, 410, "checkpoint_missing")
        assert checkpoint_id in error["message"]
        assert "restore" in error["message"] and done["id"] in error["message"]


def test_checkpoint_without_curves_answers_404_curves_not_found(client: TestClient) -> None:
    conversion = finished(client, create(client, CONVERSIONS))
    response = client.get(f"/v1/checkpoints/{conversion['checkpoint_id']}/curves.png")
    error = assert_envelope(response, 404, "curves_not_found")
    assert conversion["checkpoint_id"] in error["message"]
    assert "fine-tune" in error["message"]


# event stream


def streamed_ids(client: TestClient, url: str, headers: dict[str, str] | None = None) -> list[str]:
    """The ids of the server-sent events a stream carries until it ends."""
    with client.stream("GET", url, headers=headers or {}) as stream:
        text = "".join(stream.iter_text())
    assert text.rstrip().endswith("event: end\ndata: {}")
    return [line.removeprefix("id: ") for line in text.splitlines() if line.startswith("id: ")]


def test_event_stream_resumes_after_last_event_id_or_after(client: TestClient) -> None:
    path = fine_tune(client)
    finished(client, path)
    everything = [e["id"] for e in events(client, path)]
    seen, later = everything[2], everything[3:]
    stream = f"{path}/events?stream=true"
    assert streamed_ids(client, stream, {"Last-Event-ID": seen}) == later
    assert streamed_ids(client, f"{stream}&after={seen}") == later
    # A reconnecting browser repeats the first URL: its Last-Event-ID wins over that `after`.
    reconnect = f"{stream}&after={everything[0]}"
    assert streamed_ids(client, reconnect, {"Last-Event-ID": seen}) == later
    assert_envelope(client.get(stream, headers={"Last-Event-ID": "yesterday"}), 400)
