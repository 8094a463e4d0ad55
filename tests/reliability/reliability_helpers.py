"""Helpers for the reliability tests: servers with keys, stored-state snapshots, the report.

The server process class and the protocol-following fake job come from the service tests
(`tests/service`), so that both suites start the service the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

# the service tests' helpers, importable through the path above
from service_helpers import (
    FAKE_JOB,
    ServerProcess,
    fake_commands,
    free_port,
    process_running,
    stopped_cleanly,
)

__all__ = [
    "FAKE_JOB",
    "KEY_A",
    "KEY_B",
    "ServerProcess",
    "fake_commands",
    "free_port",
    "process_running",
    "stopped_cleanly",
]

SLOW_JOB = Path(__file__).with_name("slow_job.py")

# Two tenants. The keys are long random-looking strings so that finding them in a log or in the
# database cannot be a coincidence.
KEY_A = "gmnm-test-key-a-5f1c9e0b7a2d48c3b6e1f0a9d8c7b6a5"
KEY_B = "gmnm-test-key-b-0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"
WRONG_KEY = "gmnm-test-key-x-1234567890abcdef1234567890abcdef"


def auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def slow_commands(*knobs: str) -> dict[str, list[str]]:
    """Every job kind runs `slow_job.py` (the engine's checkpoint writer with a slow model)."""
    return {
        kind: [sys.executable, str(SLOW_JOB), "--kind", kind, *knobs]
        for kind in ("fine_tune", "conversion", "evaluation")
    }


def server_env(**overrides: str) -> dict[str, str]:
    env = {
        "GMNM_API_KEYS": f"{KEY_A},{KEY_B}",
        "GMNM_JOB_COMMANDS": json.dumps(fake_commands()),
        "GMNM_POLL_SECONDS": "0.1",
        "GMNM_HEARTBEAT_SECONDS": "0.5",
        "GMNM_CANCEL_GRACE_SECONDS": "10",
        "GMNM_JOB_NICENESS": "10",
    }
    env.update(overrides)
    return env


def wait_job(
    http: httpx.Client,
    path: str,
    done: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Poll a job until `done` (by default: a terminal status); fail with the last answer."""
    finished = ("succeeded", "failed", "cancelled", "paused")
    done = done or (lambda job: job["status"] in finished)
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(path).json()
        if done(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{path} did not get there in {timeout} s; last answer: {job}")


# stored state


_VOLATILE_COLUMNS = {"jobs": {"heartbeat_at"}}
_TABLES = ("files", "jobs", "events", "checkpoints")


def stored_state(data_dir: Path) -> dict[str, Any]:
    """Every row a request could change, and every file under the data directory with its hash.

    The workers table (heartbeats) and the database files themselves are left out: they change
    every second whatever the requests do.
    """
    rows: dict[str, list[tuple[Any, ...]]] = {}
    connection = sqlite3.connect(f"file:{data_dir / 'gmnm.db'}?mode=ro", uri=True, timeout=30)
    try:
        for table in _TABLES:
            cursor = connection.execute(f"SELECT * FROM {table}")
            names = [column[0] for column in cursor.description]
            keep = [
                i for i, name in enumerate(names) if name not in _VOLATILE_COLUMNS.get(table, ())
            ]
            rows[table] = sorted(tuple(row[i] for i in keep) for row in cursor.fetchall())
    finally:
        connection.close()
    files = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("gmnm.db"):
            files[str(path.relative_to(data_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"rows": rows, "files": files}


def state_difference(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A short description of what changed between two snapshots ('' when nothing did)."""
    changes = []
    for table in _TABLES:
        old, new = set(before["rows"][table]), set(after["rows"][table])
        if old != new:
            changes.append(f"{table}: +{sorted(new - old)[:2]} -{sorted(old - new)[:2]}")
    old_files, new_files = before["files"], after["files"]
    for name in sorted(set(old_files) | set(new_files)):
        if old_files.get(name) != new_files.get(name):
            changes.append(f"file {name}: {old_files.get(name)} -> {new_files.get(name)}")
    return "; ".join(changes)


# the report


REPORT_ENV = "GMNM_RELIABILITY_REPORT"


def record(section: str, data: dict[str, Any]) -> None:
    """Write one section of the reliability report when a report directory is set.

    `benchmarks/reliability.py` sets GMNM_RELIABILITY_REPORT to a directory, runs these tests,
    and assembles the sections into `benchmarks/results/reliability.json`; a plain test run
    writes nothing.
    """
    directory = os.environ.get(REPORT_ENV)
    if not directory:
        return
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{section}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
