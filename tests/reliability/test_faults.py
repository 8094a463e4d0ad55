"""Faults with real processes and real signals: job processes and the whole server SIGKILLed, the
disk filling up under a checkpoint, the database locked by another writer.

Nothing listed may be incomplete afterwards: every checkpoint the API lists is downloaded and its
sha256 checked against its content, and the model file inside compared byte for byte with what
the job wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_helpers import (
    KEY_A,
    ServerProcess,
    auth,
    fake_commands,
    process_running,
    record,
    server_env,
    slow_commands,
    state_difference,
    stored_state,
    wait_job,
)
from slow_job import MODEL_FILE, expected_model_bytes

import surgery

pytestmark = pytest.mark.slow

TRAIN_LINES = [("good great fine", "pos"), ("bad awful poor", "neg")] * 16


def client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)


def job_pid(data_dir: Path, job_id: str) -> int | None:
    connection = sqlite3.connect(f"file:{data_dir / 'gmnm.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = connection.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        connection.close()
    return None if row is None else row[0]


def verified_checkpoints(http: httpx.Client, job_path: str) -> list[dict[str, Any]]:
    """Every checkpoint the API lists, each downloaded and checked against its sha256."""
    listed = http.get(f"{job_path}/checkpoints", params={"limit": 100}).json()["data"]
    for checkpoint in listed:
        described = http.get(f"/v1/checkpoints/{checkpoint['id']}").json()
        content = http.get(f"/v1/checkpoints/{checkpoint['id']}/content")
        assert content.status_code == 200, content.text
        digest = hashlib.sha256(content.content).hexdigest()
        assert digest == described["sha256"] == content.headers["x-checkpoint-sha256"]
        assert len(content.content) == described["size"]
        checkpoint["archive"] = content.content
    return list(listed)


def archive_member(archive: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"/{name}"))
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read()


# a job process killed mid-step


def test_a_job_process_killed_mid_step_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    commands = fake_commands("--step-seconds", "0.3", "--checkpoint-every", "2")
    env = server_env(GMNM_JOB_COMMANDS=json.dumps(commands), GMNM_MAX_ATTEMPTS="3")
    server = ServerProcess(tmp_path / "data", env).start()
    try:
        http = client(server)
        body = {"model": "org/model", "dataset": "digits", "hyperparameters": {"max_steps": 8}}
        job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        path = f"/v1/fine_tuning/jobs/{job_id}"
        wait_job(http, path, lambda job: (job["progress"]["step"] or 0) >= 3)
        pid = job_pid(server.data_dir, job_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        job = wait_job(http, path, timeout=60)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        messages = [e["message"] for e in http.get(f"{path}/events?limit=100").json()["data"]]
        assert any("SIGKILL" in message and "resume" in message for message in messages)
        # the second attempt started from a checkpoint the first one wrote, not from scratch
        starts = [re.search(r"training from step (\d+) to 8", message) for message in messages]
        assert [int(m.group(1)) for m in starts if m][1] in (2, 4, 6)
        steps = [c["step_number"] for c in verified_checkpoints(http, path)]
        assert steps == [8, 6, 4, 2]
    finally:
        server.stop()
    record("fault_job_sigkill", {"injected": 1, "outcome": job["status"]})


def test_a_job_killed_on_every_attempt_fails_with_a_clear_code_after_the_attempt_limit(
    tmp_path: Path,
) -> None:
    commands = fake_commands("--step-seconds", "0.3", "--checkpoint-every", "2")
    env = server_env(GMNM_JOB_COMMANDS=json.dumps(commands), GMNM_MAX_ATTEMPTS="2")
    server = ServerProcess(tmp_path / "data", env).start()
    kills = 0
    try:
        http = client(server)
        body = {"model": "org/model", "dataset": "digits", "hyperparameters": {"max_steps": 50}}
        job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        path = f"/v1/fine_tuning/jobs/{job_id}"
        for attempt in (1, 2):
            wait_job(
                http,
                path,
                lambda job, a=attempt: (
                    job["attempts"] == a
                    and job["status"] == "running"
                    and job_pid(server.data_dir, job_id) is not None
                ),
            )
            pid = job_pid(server.data_dir, job_id)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            kills += 1
        job = wait_job(http, path, timeout=60)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "process_killed"
        assert "SIGKILL" in job["error"]["message"] and "2 times" in job["error"]["message"]
    finally:
        server.stop()
    record(
        "fault_job_sigkill_every_attempt",
        {"injected": kills, "outcome": "failed with process_killed"},
    )


# the whole server killed while a checkpoint is being written


def test_server_killed_during_a_checkpoint_write_lists_only_complete_checkpoints(
    tmp_path: Path,
) -> None:
    env = server_env(GMNM_JOB_COMMANDS=json.dumps(slow_commands("--write-seconds", "2")))
    first = ServerProcess(tmp_path / "data", env).start()
    http = client(first)
    body = {"model": "org/model", "dataset": "digits", "hyperparameters": {"max_steps": 9}}
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    path = f"/v1/fine_tuning/jobs/{job_id}"
    wait_job(http, path, lambda job: (job["progress"]["step"] or 0) >= 4, timeout=90)
    checkpoints = first.data_dir / "jobs" / job_id / "checkpoints"

    # wait for the step-6 checkpoint to be half written, then kill the server and the job
    deadline = time.monotonic() + 60
    while not list(checkpoints.glob("step-6.tmp-*/" + MODEL_FILE)):
        assert time.monotonic() < deadline, "the step-6 checkpoint write never started"
        time.sleep(0.02)
    pid = job_pid(first.data_dir, job_id)
    assert pid is not None
    first.stop(signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.3)
    assert not process_running(pid)
    partial = list(checkpoints.glob("step-6.tmp-*"))
    assert partial and not (checkpoints / "step-6").exists(), "the kill missed the write"
    assert len((partial[0] / MODEL_FILE).read_bytes()) < len(expected_model_bytes(6))

    second = ServerProcess(tmp_path / "data", env)
    second.port, second.url = first.port, first.url
    second.start()
    try:
        listed_at_restart = verified_checkpoints(http, path)
        job = wait_job(http, path, timeout=90)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        listed = verified_checkpoints(http, path)
    finally:
        second.stop()
    assert [c["step_number"] for c in listed_at_restart if c["step_number"] <= 3] == [3]
    assert [c["step_number"] for c in listed] == [9, 6, 3]
    for checkpoint in listed:
        model = archive_member(checkpoint["archive"], MODEL_FILE)
        assert model == expected_model_bytes(checkpoint["step_number"])
    assert not list(checkpoints.glob("*.tmp-*")), "the partial checkpoint was left behind"
    record(
        "fault_server_sigkill_during_checkpoint",
        {"injected": 1, "checkpoints_listed": len(listed)},
    )


# the disk filling up during a checkpoint (a real fine-tune on a small tmpfs)


def _tiny_bert(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted(
        {w for t, _ in TRAIN_LINES for w in t.split()}
    )
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def small_jobs_volume(tmp_path: Path) -> Iterator[Path]:
    """DATA_DIR/jobs on a 900 KiB tmpfs: two checkpoints of the tiny model fit, a third does not."""
    jobs = tmp_path / "data" / "jobs"
    jobs.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(jobs)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield jobs
    finally:
        subprocess.run(["umount", "-l", str(jobs)], check=False)


def test_disk_full_during_a_checkpoint_fails_the_job_with_disk_full_and_keeps_earlier_ones(
    tmp_path: Path, small_jobs_volume: Path
) -> None:
    models = tmp_path / "models"
    bert = _tiny_bert(models / "tiny-bert")
    engine = {
        kind: [sys.executable, "-m", "training.cli", command]
        for kind, command in (
            ("fine_tune", "train"),
            ("evaluation", "eval"),
            ("conversion", "convert"),
        )
    }
    env = server_env(
        GMNM_JOB_COMMANDS=json.dumps(engine),
        GMNM_MODEL_DIRS=str(models),
        GMNM_CACHE_DIR=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
    )
    server = ServerProcess(tmp_path / "data", env).start()
    try:
        http = client(server)
        lines = "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in TRAIN_LINES)
        file_id = http.post("/v1/files", files={"file": ("train.jsonl", lines.encode())}).json()[
            "id"
        ]
        body = {
            "model": str(bert),
            "task": "text-classification",
            "training_file": file_id,
            "data": {"max_length": 8},
            "hyperparameters": {"max_steps": 40, "checkpoint_interval": 2, "batch_size": 4},
            "limits": {"max_eval_samples": 4},
            "seed": 0,
        }
        created = http.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 202, created.text
        path = created.headers["location"]
        job = wait_job(http, path, timeout=240)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "disk_full", job["error"]
        assert "intact" in job["error"]["message"]
        listed = verified_checkpoints(http, path)
        assert len(listed) >= 1
        for checkpoint in listed:
            weights = archive_member(checkpoint["archive"], "model.safetensors")
            assert len(weights) > 10_000
    finally:
        server.stop()
    job_dir = small_jobs_volume / job["id"] / "checkpoints"
    assert not list(job_dir.glob("*.tmp-*")), "a partial checkpoint was left on the full disk"
    for directory in sorted(job_dir.glob("step-*")):
        surgery.load(directory)
    record(
        "fault_disk_full",
        {
            "injected": 1,
            "outcome": job["error"]["code"],
            "checkpoints_kept": len(listed),
        },
    )


# the database locked by another writer


class HeldLock:
    """Another process's write lock on the SQLite database, held for `seconds`."""

    def __init__(self, database: Path, seconds: float) -> None:
        self.connection = sqlite3.connect(
            database, timeout=30, isolation_level=None, check_same_thread=False
        )
        self.connection.execute("BEGIN IMMEDIATE")
        self.released = threading.Event()
        self.guard = threading.Lock()
        self.timer = threading.Timer(seconds, self.release)
        self.timer.start()

    def release(self) -> None:
        with self.guard:
            if not self.released.is_set():
                self.connection.execute("ROLLBACK")
                self.connection.close()
                self.released.set()


def _requests(http: httpx.Client, file_id: str) -> dict[str, Any]:
    """One of each: a write that creates, a write that changes, an upload, and two reads."""
    content = b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    body = {"model": "org/model", "training_file": file_id, "hyperparameters": {"max_steps": 2}}
    return {
        "create job": lambda: http.post("/v1/fine_tuning/jobs", json=body),
        "upload": lambda: http.post("/v1/files", files={"file": ("t.jsonl", content)}),
        "conversion": lambda: http.post("/v1/conversions", json={"model": "org/model"}),
        "list jobs": lambda: http.get("/v1/fine_tuning/jobs"),
        "list files": lambda: http.get("/v1/files"),
    }


def _send_all(requests: dict[str, Any]) -> dict[str, tuple[httpx.Response, float]]:
    answers: dict[str, tuple[httpx.Response, float]] = {}

    def send(name: str) -> None:
        started = time.monotonic()
        response = requests[name]()
        answers[name] = (response, time.monotonic() - started)

    threads = [threading.Thread(target=send, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def test_requests_wait_for_a_database_locked_a_few_seconds_and_succeed(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", server_env()).start()
    try:
        http = client(server)
        file_id = http.post(
            "/v1/files", files={"file": ("t.jsonl", b'{"text": "a", "label": 1}\n')}
        ).json()["id"]
        lock = HeldLock(server.data_dir / "gmnm.db", seconds=3.0)
        answers = _send_all(_requests(http, file_id))
        lock.release()
        statuses = {name: response.status_code for name, (response, _) in answers.items()}
        assert set(statuses.values()) <= {200, 202}, {n: r.text for n, (r, _) in answers.items()}
        assert answers["create job"][1] > 1.5, "the write did not wait for the lock"
        # readers are not blocked, neither by the lock nor by the writers waiting for it
        assert answers["list jobs"][1] < 1.5 and answers["list files"][1] < 1.5, answers
        job = answers["create job"][0].json()
        assert wait_job(http, f"/v1/fine_tuning/jobs/{job['id']}")["status"] == "succeeded"
    finally:
        server.stop()
    record(
        "fault_database_locked_3s",
        {
            "injected": 1,
            "requests": len(answers),
            "failed": sum(1 for r, _ in answers.values() if r.status_code >= 400),
            "slowest_seconds": round(max(t for _, t in answers.values()), 2),
        },
    )


def test_a_database_locked_past_the_busy_timeout_answers_503_with_retry_after(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = server_env(GMNM_DATABASE_URL=f"sqlite:///{data / 'gmnm.db'}?timeout=0.5")
    server = ServerProcess(data, env).start()
    try:
        http = client(server)
        file_id = http.post(
            "/v1/files", files={"file": ("t.jsonl", b'{"text": "a", "label": 1}\n')}
        ).json()["id"]
        before = stored_state(data)
        lock = HeldLock(data / "gmnm.db", seconds=4.0)
        answers = _send_all({k: v for k, v in _requests(http, file_id).items() if k != "list jobs"})
        during = stored_state(data)
        lock.release()
        for name in ("create job", "upload", "conversion"):
            response = answers[name][0]
            assert response.status_code == 503, (name, response.text)
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"]["code"] == "database_unavailable"
        assert answers["list files"][0].status_code == 200  # readers are not blocked
        assert not state_difference(before, during), state_difference(before, during)
        # the same requests succeed once the lock is gone
        retried = _send_all(_requests(http, file_id))
        assert all(r.status_code in (200, 202) for r, _ in retried.values())
    finally:
        server.stop()
    record(
        "fault_database_locked_past_timeout",
        {
            "injected": 1,
            "requests": len(answers),
            "answered_503_with_retry_after": 3,
            "changed_state": 0,
        },
    )
