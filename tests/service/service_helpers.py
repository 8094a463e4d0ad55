"""Helpers shared by the service tests: settings for fast jobs, polling, uploading."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.settings import Settings

FAKE_JOB = Path(__file__).with_name("fake_job.py")


def fake_commands(*knobs: str) -> dict[str, list[str]]:
    return {
        kind: [sys.executable, str(FAKE_JOB), "--kind", kind, *knobs]
        for kind in ("fine_tune", "conversion", "evaluation")
    }


def fast_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "job_commands": fake_commands(),
        "poll_seconds": 0.05,
        "heartbeat_seconds": 0.2,
        "worker_timeout_seconds": 5.0,
        "cancel_grace_seconds": 3.0,
        "api_keys": [],
    }
    values.update(overrides)
    return Settings(**values)


def wait_for(
    fetch: Callable[[], dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Poll `fetch` until `done` holds; fail with the last answer if it never does."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"condition not reached within {timeout} s; last answer: {last}")


def upload(client: TestClient, content: bytes = b'{"text": "a", "label": 0}\n', **kw: Any) -> str:
    response = client.post(
        "/v1/files",
        files={"file": (kw.get("filename", "train.jsonl"), content)},
        data={"purpose": kw.get("purpose", "fine-tune")},
        headers=kw.get("headers", {}),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process; a zombie (dead, waiting for a reaper) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
