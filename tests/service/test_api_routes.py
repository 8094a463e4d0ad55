"""Every route through the ASGI app, success and failure, with the protocol-following fake job."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from service_helpers import fake_commands, upload, wait_for

JSONL = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


def fine_tune(client: TestClient, file_id: str, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "prajjwal1/bert-tiny",
        "training_file": file_id,
        "task": "text-classification",
        "hyperparameters": {"max_steps": 6},
        **extra.pop("body", {}),
    }
    response = client.post("/v1/fine_tuning/jobs", json=body, headers=extra.get("headers", {}))
    assert response.status_code == 202, response.text
    return dict(response.json())


def finished(client: TestClient, path: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_for(
        lambda: client.get(path).json(),
        lambda job: job["status"] in ("succeeded", "failed", "cancelled", "paused"),
        timeout,
    )


def assert_envelope(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


# files


def test_upload_reports_format_rows_and_sha256(client: TestClient) -> None:
    response = client.post(
        "/v1/files", files={"file": ("train.jsonl", JSONL)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "file"
    assert (body["format"], body["rows"], body["bytes"]) == ("jsonl", 2, len(JSONL))
    assert body["sha256"] == hashlib.sha256(JSONL).hexdigest()
    assert client.get(f"/v1/files/{body['id']}/content").content == JSONL


def test_upload_of_unreadable_data_names_the_line(client: TestClient) -> None:
    response = client.post(
        "/v1/files", files={"file": ("train.jsonl", b'{"text": "a"}\nnot json\n')}
    )
    error = assert_envelope(response, 400, "file")
    assert "train.jsonl" in error["message"]
    assert client.get("/v1/files").json()["data"] == []


def test_upload_past_the_size_limit_is_refused_with_413(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=1000)
    response = client.post("/v1/files", files={"file": ("big.txt", b"x" * 200_000)})
    assert_envelope(response, 413)
    response = client.post("/v1/files", files={"file": ("medium.txt", b"word " * 300)})
    assert_envelope(response, 413, "file")


def test_files_page_newest_first_and_delete(client: TestClient) -> None:
    ids = [upload(client, JSONL, filename=f"f{index}.jsonl") for index in range(3)]
    first = client.get("/v1/files?limit=2").json()
    assert [item["id"] for item in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    second = client.get(f"/v1/files?limit=2&after={first['last_id']}").json()
    assert [item["id"] for item in second["data"]] == [ids[0]]
    assert second["has_more"] is False
    assert client.delete(f"/v1/files/{ids[0]}").json() == {
        "id": ids[0],
        "object": "file",
        "deleted": True,
    }
    assert_envelope(client.get(f"/v1/files/{ids[0]}"), 404)


def test_unknown_purpose_is_refused_naming_the_field(client: TestClient) -> None:
    response = client.post(
        "/v1/files", files={"file": ("a.jsonl", JSONL)}, data={"purpose": "batch"}
    )
    assert_envelope(response, 400, "purpose")


# errors


def test_routing_and_validation_errors_use_the_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing"), 404)
    assert_envelope(client.delete("/healthz"), 405)
    error = assert_envelope(
        client.post("/v1/fine_tuning/jobs", json={"model": "x", "task": "dance"}), 400, "task"
    )
    assert "task" in error["message"]
    error = assert_envelope(
        client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "x", "dataset": "digits", "hyperparameters": {"batch_size": 0}},
        ),
        400,
    )
    assert "batch_size" in error["message"]


def test_job_with_missing_file_and_url_model_lists_both_problems(client: TestClient) -> None:
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "https://example.com/model.bin", "training_file": "file-nope"},
    )
    error = assert_envelope(response, 400, "model")
    assert "URL" in error["message"] and "file-nope" in error["message"]


def test_local_model_paths_must_lie_inside_the_allowed_directories(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    allowed = tmp_path / "models"
    (allowed / "tiny").mkdir(parents=True)
    client = make_client(model_dirs=[allowed], run_supervisor=False)
    error = assert_envelope(client.post("/v1/conversions", json={"model": "/etc"}), 400, "model")
    assert "GMNM_MODEL_DIRS" in error["message"]
    escape = f"{allowed}/../../etc"
    error = assert_envelope(client.post("/v1/conversions", json={"model": escape}), 400, "model")
    assert "'..'" in error["message"]
    inside = client.post("/v1/conversions", json={"model": str(allowed / "tiny")})
    assert inside.status_code == 202, inside.text


def test_engine_spec_problems_are_reported_under_the_request_field(client: TestClient) -> None:
    file_id = upload(client, JSONL)
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "prajjwal1/bert-tiny",
            "training_file": file_id,
            "task": "image-classification",
        },
    )
    error = assert_envelope(response, 400, "training_file")
    assert "image-classification" in error["message"]


# fine-tuning jobs


def test_fine_tune_runs_to_success_with_events_checkpoints_and_results(
    client: TestClient,
) -> None:
    file_id = upload(client, JSONL)
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "prajjwal1/bert-tiny",
            "training_file": file_id,
            "hyperparameters": {"max_steps": 6, "n_epochs": 2, "learning_rate_multiplier": 2},
            "seed": 7,
            "metadata": {"team": "vision"},
        },
    )
    assert created.status_code == 202
    job = created.json()
    assert created.headers["location"] == f"/v1/fine_tuning/jobs/{job['id']}"
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["hyperparameters"]["n_epochs"] == 2
    assert job["hyperparameters"]["learning_rate_multiplier"] == 2
    assert job["seed"] == 7 and job["metadata"] == {"team": "vision"}

    done = finished(client, f"/v1/fine_tuning/jobs/{job['id']}")
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 6, "total_steps": 6, "epoch": 1.0, "percent": 100.0}
    assert done["trained_tokens"] == 6 * 32
    assert done["metrics"]["accuracy"] == 0.9
    assert isinstance(done["finished_at"], int) and done["finished_at"] >= done["created_at"]

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [item["step_number"] for item in checkpoints] == [6, 4, 2]
    assert done["fine_tuned_model"] == checkpoints[0]["id"]
    assert checkpoints[0]["metrics"]["train_loss"] == 1 / 6

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    metric_steps = [event["step"] for event in events if event["type"] == "metrics"]
    assert metric_steps == [1, 2, 3, 4, 5, 6]
    assert events[-1]["message"] == "The job has successfully completed."

    results = client.get(f"/v1/files/{done['result_files'][0]}/content").text.splitlines()
    assert results[0].startswith("step,loss") and len(results) == 7


def test_events_page_forward_from_a_cursor(client: TestClient) -> None:
    job = fine_tune(client, upload(client, JSONL))
    finished(client, f"/v1/fine_tuning/jobs/{job['id']}")
    path = f"/v1/fine_tuning/jobs/{job['id']}/events"
    everything = client.get(f"{path}?limit=100").json()["data"]
    first = client.get(f"{path}?limit=3").json()
    rest = client.get(f"{path}?limit=100&after={first['last_id']}").json()
    assert first["has_more"] and not rest["has_more"]
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in everything]


def test_event_stream_sends_each_event_then_ends(client: TestClient) -> None:
    job = fine_tune(client, upload(client, JSONL))
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    blocks = [block for block in text.split("\n\n") if block.strip()]
    assert blocks[-1].startswith("event: end")
    payloads = [json.loads(block.split("data: ", 1)[1]) for block in blocks[:-1]]
    assert [p["step"] for p in payloads if p["type"] == "metrics"] == [1, 2, 3, 4, 5, 6]
    assert len({p["id"] for p in payloads}) == len(payloads)


def test_jobs_page_newest_first_and_filter_by_status(client: TestClient) -> None:
    file_id = upload(client, JSONL)
    ids = [fine_tune(client, file_id)["id"] for _ in range(3)]
    client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel")
    first = client.get("/v1/fine_tuning/jobs?limit=2").json()
    second = client.get(f"/v1/fine_tuning/jobs?limit=2&after={first['last_id']}").json()
    assert [j["id"] for j in first["data"] + second["data"]] == ids[::-1]
    for job_id in ids:
        finished(client, f"/v1/fine_tuning/jobs/{job_id}")
    cancelled = client.get("/v1/fine_tuning/jobs?status=cancelled").json()["data"]
    assert [job["id"] for job in cancelled] == [ids[1]]
    assert_envelope(client.get("/v1/fine_tuning/jobs?status=sleeping"), 400, "status")
    assert_envelope(client.get("/v1/fine_tuning/jobs?limit=1000"), 400, "limit")


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(
    client: TestClient,
) -> None:
    file_id = upload(client, JSONL)
    headers = {"Idempotency-Key": "abc-1"}
    first = fine_tune(client, file_id, headers=headers)
    again = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "prajjwal1/bert-tiny",
            "training_file": file_id,
            "task": "text-classification",
            "hyperparameters": {"max_steps": 6},
        },
        headers=headers,
    )
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    other = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "prajjwal1/bert-tiny", "training_file": file_id},
        headers=headers,
    )
    assert_envelope(other, 409, "Idempotency-Key")
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1


def test_too_many_active_jobs_answer_429(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_active_jobs_per_key=2, run_supervisor=False)
    file_id = upload(client, JSONL)
    fine_tune(client, file_id)
    fine_tune(client, file_id)
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "prajjwal1/bert-tiny", "training_file": file_id}
    )
    assert_envelope(response, 429)


def test_steps_above_the_server_limit_are_refused(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_steps=100, run_supervisor=False)
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "m/x", "dataset": "digits", "hyperparameters": {"max_steps": 101}},
    )
    assert_envelope(response, 400, "hyperparameters.max_steps")


def test_cancel_of_a_queued_job_is_immediate_and_a_finished_one_conflicts(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(run_supervisor=False)
    job = fine_tune(client, upload(client, JSONL))
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert_envelope(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 409)
    assert_envelope(client.post("/v1/fine_tuning/jobs/ftjob-missing/cancel"), 404)


def test_pause_then_resume_continues_from_the_checkpoint(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(job_commands=fake_commands("--step-seconds", "0.3"))
    job = fine_tune(client, upload(client, JSONL), body={"hyperparameters": {"max_steps": 30}})
    path = f"/v1/fine_tuning/jobs/{job['id']}"
    wait_for(lambda: client.get(path).json(), lambda j: (j["progress"]["step"] or 0) >= 2)
    assert client.post(f"{path}/pause").json()["status"] in ("cancelling", "paused")
    paused = finished(client, path)
    assert paused["status"] == "paused"
    stopped_at = paused["progress"]["step"]
    assert client.get(f"{path}/checkpoints").json()["data"][0]["step_number"] == stopped_at

    assert client.post(f"{path}/resume").json()["status"] == "queued"
    wait_for(lambda: client.get(path).json(), lambda j: j["progress"]["step"] > stopped_at + 1)
    client.post(f"{path}/cancel")
    assert finished(client, path)["status"] == "cancelled"
    events = client.get(f"{path}/events?limit=100").json()["data"]
    steps = [event["step"] for event in events if event["type"] == "metrics"]
    # The second attempt starts right after the paused step: nothing is trained twice.
    assert steps == list(range(1, len(steps) + 1))


def test_failed_job_reports_the_engine_error_code(make_client: Callable[..., TestClient]) -> None:
    client = make_client(job_commands=fake_commands("--fail-with", "out_of_memory"))
    job = fine_tune(client, upload(client, JSONL))
    done = finished(client, f"/v1/fine_tuning/jobs/{job['id']}")
    assert done["status"] == "failed"
    assert done["error"]["code"] == "out_of_memory"
    assert "out_of_memory" in done["error"]["message"]


# checkpoints


def test_checkpoint_archive_is_reproducible_with_etag_and_ranges(client: TestClient) -> None:
    job = fine_tune(client, upload(client, JSONL))
    done = finished(client, f"/v1/fine_tuning/jobs/{job['id']}")
    checkpoint_id = done["fine_tuned_model"]
    described = client.get(f"/v1/checkpoints/{checkpoint_id}").json()
    content = client.get(f"/v1/checkpoints/{checkpoint_id}/content")
    assert content.status_code == 200
    assert content.headers["etag"] == f'"{described["sha256"]}"'
    assert int(content.headers["content-length"]) == described["size"] == len(content.content)
    assert hashlib.sha256(content.content).hexdigest() == described["sha256"]
    with tarfile.open(fileobj=io.BytesIO(content.content)) as tar:
        names = tar.getnames()
        assert all(member.mtime == 0 and member.uid == 0 for member in tar.getmembers())
    assert f"{checkpoint_id}/model.safetensors" in names
    assert f"{checkpoint_id}/training_state.pt" not in names
    assert names == sorted(names)
    full = client.get(f"/v1/checkpoints/{checkpoint_id}/content?training_state=true")
    with tarfile.open(fileobj=io.BytesIO(full.content)) as tar:
        assert f"{checkpoint_id}/training_state.pt" in tar.getnames()
    assert full.headers["etag"] == f'"{hashlib.sha256(full.content).hexdigest()}"'
    assert full.headers["etag"] != content.headers["etag"]

    partial = client.get(
        f"/v1/checkpoints/{checkpoint_id}/content", headers={"Range": "bytes=100-199"}
    )
    assert partial.status_code == 206 and partial.content == content.content[100:200]
    unchanged = client.get(
        f"/v1/checkpoints/{checkpoint_id}/content",
        headers={"If-None-Match": content.headers["etag"]},
    )
    assert unchanged.status_code == 304
    curves = client.get(f"/v1/checkpoints/{checkpoint_id}/curves.png")
    assert curves.headers["content-type"] == "image/png"
    assert curves.content.startswith(b"\x89PNG")
    assert_envelope(client.get("/v1/checkpoints/ftckpt-nothing"), 404)


def test_a_checkpoint_id_is_accepted_as_the_model_of_a_new_job(client: TestClient) -> None:
    file_id = upload(client, JSONL)
    first = finished(client, f"/v1/fine_tuning/jobs/{fine_tune(client, file_id)['id']}")
    second = fine_tune(client, file_id, body={"model": first["fine_tuned_model"]})
    assert second["model"] == first["fine_tuned_model"]
    assert finished(client, f"/v1/fine_tuning/jobs/{second['id']}")["status"] == "succeeded"


# conversions and evaluations


def test_conversion_holds_plan_report_and_checkpoint(client: TestClient) -> None:
    created = client.post(
        "/v1/conversions",
        json={"model": "prajjwal1/bert-tiny", "gmnm": {"num_components": 4}},
    )
    assert created.status_code == 202
    assert created.headers["location"].startswith("/v1/conversions/conv-")
    done = finished(client, created.headers["location"])
    assert done["object"] == "conversion" and done["status"] == "succeeded"
    assert done["plan"]["sites"] and done["report"]["sites_replaced"] == 1
    assert done["checkpoint_id"].startswith("ftckpt-")
    listed = client.get("/v1/conversions").json()["data"]
    assert [item["id"] for item in listed] == [done["id"]]


def test_evaluation_holds_both_metric_sets(client: TestClient) -> None:
    file_id = upload(client, JSONL)
    created = client.post(
        "/v1/evaluations",
        json={
            "model": "prajjwal1/bert-tiny",
            "compare_to": "google-bert/bert-base-uncased",
            "file": file_id,
            "task": "text-classification",
        },
    )
    assert created.status_code == 202, created.text
    done = finished(client, created.headers["location"])
    assert done["object"] == "evaluation" and done["status"] == "succeeded"
    assert set(done["result"]) == {"model", "compare_to"}


# auth


def test_api_keys_guard_every_route_but_healthz_and_scope_objects(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_keys=["key-alice", "key-bob"], run_supervisor=False)
    alice = {"Authorization": "Bearer key-alice"}
    bob = {"Authorization": "Bearer key-bob"}
    assert client.get("/healthz").status_code == 200
    assert_envelope(client.get("/v1/files"), 401)
    assert_envelope(client.get("/metrics"), 401)
    assert_envelope(client.get("/v1/files", headers={"Authorization": "Bearer nope"}), 401)

    file_id = upload(client, JSONL, headers=alice)
    job = fine_tune(client, file_id, headers=alice)
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=alice).status_code == 200
    assert_envelope(client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bob), 404)
    assert_envelope(client.get(f"/v1/files/{file_id}", headers=bob), 404)
    assert client.get("/v1/fine_tuning/jobs", headers=bob).json()["data"] == []
    # Bob cannot train on Alice's file either.
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "m/x", "training_file": file_id},
        headers=bob,
    )
    assert_envelope(response, 400, "training_file")


def test_keys_file_may_hold_digests_instead_of_keys(
    make_client: Callable[..., TestClient], tmp_path: Any
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsha256:" + hashlib.sha256(b"secret").hexdigest() + "\n")
    client = make_client(api_keys_file=keys, run_supervisor=False)
    assert client.get("/v1/files", headers={"Authorization": "Bearer secret"}).status_code == 200
    assert_envelope(client.get("/v1/files", headers={"Authorization": "Bearer sha256"}), 401)


# health and metrics


def test_readyz_reports_database_supervisor_and_devices(client: TestClient) -> None:
    body = wait_for(lambda: client.get("/readyz").json(), lambda b: b["status"] == "ready")
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["supervisor"] == "ok"
    assert body["checks"]["devices"] == {"cpu": "ok"}


def test_readyz_is_not_ready_when_a_configured_gpu_is_missing(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(devices=["cuda:7"], run_supervisor=False)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["devices"] == {"cuda:7": "missing"}


def test_metrics_count_jobs_by_status_and_request_latency(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(run_supervisor=False)
    fine_tune(client, upload(client, JSONL))
    text = client.get("/metrics").text
    assert 'gmnm_jobs{status="queued"} 1.0' in text
    assert "gmnm_queue_depth 1.0" in text
    assert 'route="/v1/fine_tuning/jobs"' in text
    assert "gmnm_request_duration_seconds_bucket" in text


def test_openapi_documents_the_routes_with_handler_docstrings(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    create = schema["paths"]["/v1/fine_tuning/jobs"]["post"]
    assert "Fine-tune a model" in create["description"]
    assert "FineTuningJobCreate" in schema["components"]["schemas"]
    assert "/v1/checkpoints/{checkpoint_id}/content" in schema["paths"]
