"""Helpers shared by the service tests: settings for fast jobs, polling, uploading."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from service.settings import Settings

FAKE_JOB = Path(__file__).with_name("fake_job.py")


def fake_commands(*knobs: str) -> dict[str, list[str]]:
    return {
        kind: [sys.executable, str(FAKE_JOB), "--kind", kind, *knobs]
        for kind in ("fine_tune", "conversion", "evaluation")
    }


# The database the fixtures point the service at (None: SQLite in the data directory); the
# `backend` fixture sets it for the tests it parametrizes.
DATABASE: dict[str, str | None] = {"url": None}


def fast_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": DATABASE["url"],
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """`gmnm serve` as a real process on a free loopback port."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(
            f"server did not answer in {timeout} s: {self.log.read_text()[-3000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait; uvicorn re-raises SIGTERM after a clean shutdown."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def stopped_cleanly(server: ServerProcess) -> bool:
    code = server.stop()
    return code in (0, -signal.SIGTERM) and "stopped" in server.log.read_text()
