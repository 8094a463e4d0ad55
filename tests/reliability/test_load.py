"""Load: 200 concurrent clients create, list and poll jobs for 60 seconds while two real fine-tunes
train on the same machine.

The two training jobs are real tiny fine-tunes (a 2-layer, 32-wide BERT built from a config) run
by the training engine, at the service's default lower CPU priority. The jobs the clients create
queue behind them. Clients are paced: each waits a random 1-3 s between requests (about 100
requests per second in all), which is what a two-core machine shared with the training jobs can
answer; the figures (rate, p50, p99) go to the report. Every request must succeed, and every job
a client created must appear exactly once in its key's list afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_helpers import KEY_A, KEY_B, ServerProcess, auth, record, server_env, wait_job
from test_faults import TRAIN_LINES, _tiny_bert

pytestmark = pytest.mark.slow

CLIENTS = 200
SECONDS = 60.0
PAUSE = (1.0, 3.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("load")
    bert = _tiny_bert(root / "models" / "tiny-bert")
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
        GMNM_MODEL_DIRS=str(root / "models"),
        GMNM_MAX_CONCURRENT_JOBS="2",
        GMNM_MAX_ACTIVE_JOBS_PER_KEY="100000",
        GMNM_POLL_SECONDS="0.5",
        GMNM_CANCEL_GRACE_SECONDS="30",
        GMNM_CACHE_DIR=str(root / "cache"),
        OMP_NUM_THREADS="1",
    )
    server = ServerProcess(root / "data", env).start()
    yield server, bert
    server.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Client:
    """One paced client: creates jobs, lists its key's jobs, polls the jobs it created."""

    def __init__(self, number: int, http: httpx.AsyncClient, bodies: dict[str, Any]) -> None:
        self.key = KEY_A if number % 2 == 0 else KEY_B
        self.http = http
        self.body = bodies[self.key]
        self.random = random.Random(number)
        self.created: list[str] = []
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []

    async def request(self, action: str, method: str, path: str, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await self.http.request(method, path, **kw)
        except httpx.HTTPError as error:
            self.errors.append(f"{action}: {type(error).__name__}: {error}")
            return None
        self.latencies[action].append(time.perf_counter() - started)
        if response.status_code >= 400:
            self.errors.append(f"{action}: {response.status_code} {response.text[:200]}")
            return None
        return response.json()

    async def run(self, until: float) -> None:
        await asyncio.sleep(self.random.uniform(0, PAUSE[1]))  # spread the starts
        while time.monotonic() < until:
            roll = self.random.random()
            if roll < 0.2 or not self.created:
                key = str(uuid.UUID(int=self.random.getrandbits(128)))
                headers = {**auth(self.key), "Idempotency-Key": key}
                job = await self.request(
                    "create", "POST", "/v1/fine_tuning/jobs", json=self.body, headers=headers
                )
                if job is not None:
                    self.created.append(job["id"])
            elif roll < 0.5:
                params = {"limit": 20}
                await self.request(
                    "list", "GET", "/v1/fine_tuning/jobs", params=params, headers=auth(self.key)
                )
            else:
                path = f"/v1/fine_tuning/jobs/{self.random.choice(self.created)}"
                await self.request("poll", "GET", path, headers=auth(self.key))
            await asyncio.sleep(self.random.uniform(*PAUSE))


async def drive(url: str, bodies: dict[str, Any]) -> list[Client]:
    """Every client has its own connection, kept alive between its requests."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    connections = [
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) for _ in range(CLIENTS)
    ]
    clients = [Client(number, connections[number], bodies) for number in range(CLIENTS)]
    until = time.monotonic() + SECONDS
    try:
        await asyncio.gather(*(client.run(until) for client in clients))
    finally:
        for connection in connections:
            await connection.aclose()
    return clients


def listed_ids(http: httpx.Client, key: str) -> list[str]:
    ids: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = http.get("/v1/fine_tuning/jobs", params=params, headers=auth(key)).json()
        ids += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            return ids
        after = page["last_id"]


def step(http: httpx.Client, job_id: str) -> int:
    return int(http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["step"] or 0)


def test_200_clients_for_60_seconds_while_two_jobs_train_lose_and_duplicate_nothing(
    server: tuple[ServerProcess, Path],
) -> None:
    process, bert = server
    http = httpx.Client(base_url=process.url, timeout=60, headers=auth(KEY_A))
    lines = "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in TRAIN_LINES)
    bodies = {}
    for key in (KEY_A, KEY_B):
        upload = {"file": ("train.jsonl", lines.encode())}
        file_id = http.post("/v1/files", files=upload, headers=auth(key)).json()["id"]
        bodies[key] = {
            "model": str(bert),
            "task": "text-classification",
            "training_file": file_id,
            "data": {"max_length": 8},
            "hyperparameters": {"max_steps": 10, "batch_size": 4},
        }

    # two real fine-tunes, training before the clients start and still training after
    long_run = {**bodies[KEY_A], "hyperparameters": {"max_steps": 1_000_000, "batch_size": 4}}
    long_run["hyperparameters"]["checkpoint_interval"] = 100_000
    trainers = [http.post("/v1/fine_tuning/jobs", json=long_run).json()["id"] for _ in range(2)]
    for job_id in trainers:
        path = f"/v1/fine_tuning/jobs/{job_id}"
        wait_job(http, path, lambda job: (job["progress"]["step"] or 0) > 0, timeout=180)
    steps_before = [step(http, job_id) for job_id in trainers]

    load_before = os.getloadavg()[0]
    began = time.monotonic()
    clients = asyncio.run(drive(process.url, bodies))
    elapsed = time.monotonic() - began
    load_after = os.getloadavg()[0]
    steps_after = [step(http, job_id) for job_id in trainers]
    statuses = [http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] for job_id in trainers]

    # every job a client created is listed exactly once under its key, and nowhere else
    lost = duplicated = 0
    listed = {key: listed_ids(http, key) for key in (KEY_A, KEY_B)}
    for key in (KEY_A, KEY_B):
        created = [job for c in clients if c.key == key for job in c.created]
        expected = set(created) | (set(trainers) if key == KEY_A else set())
        duplicated += len(listed[key]) - len(set(listed[key])) + len(created) - len(set(created))
        lost += len(expected - set(listed[key]))
        assert set(listed[key]) == expected
    for job_id in trainers:
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

    errors = [error for client in clients for error in client.errors]
    latencies: dict[str, list[float]] = defaultdict(list)
    for client in clients:
        for action, values in client.latencies.items():
            latencies[action] += values
    everything = [value for values in latencies.values() for value in values]
    summary = {
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "machine": f"{os.cpu_count()} cores, load average {load_before:.1f} before, "
        f"{load_after:.1f} after (other engineers' work shares the machine)",
        "pacing_seconds_between_requests": list(PAUSE),
        "training_jobs": "2 real tiny fine-tunes (2-layer 32-wide BERT, gmnm-train, nice 10)",
        "training_steps_during_load": [
            a - b for a, b in zip(steps_after, steps_before, strict=True)
        ],
        "requests": len(everything) + len(errors),
        "requests_per_second": round((len(everything) + len(errors)) / elapsed, 1),
        "failed": len(errors),
        "errors": errors[:10],
        "jobs_created": sum(len(c.created) for c in clients),
        "jobs_lost": lost,
        "jobs_duplicated": duplicated,
        "latency_ms": {
            action: {
                "count": len(values),
                "p50": round(1000 * statistics.median(values), 1),
                "p99": round(1000 * percentile(values, 0.99), 1),
                "max": round(1000 * max(values), 1),
            }
            for action, values in sorted({**latencies, "all": everything}.items())
        },
    }
    record("load", summary)
    print(json.dumps(summary, indent=2))
    assert not errors, errors[:10]
    assert lost == 0 and duplicated == 0
    assert all(status == "running" for status in statuses), statuses
    assert all(a > b for a, b in zip(steps_after, steps_before, strict=True)), (
        steps_before,
        steps_after,
    )
