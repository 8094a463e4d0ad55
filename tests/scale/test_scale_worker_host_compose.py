"""The compose file for a worker host: a worker only, on the shared queue and directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.worker-host.yaml"


def services() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return dict(data["services"])


def test_worker_host_runs_only_workers_on_the_shared_queue_and_directory() -> None:
    found = services()
    assert set(found) == {"worker", "worker-gpu"}
    for service in found.values():
        assert service["command"][:2] == ["gmnm", "worker"]
        assert "ports" not in service  # nothing is served from a worker host
        assert service["volumes"][0].endswith(":/data")
        assert "GMNM_SHARED_DIR:?" in service["volumes"][0]  # refused when left unset
        assert "GMNM_DATABASE_URL:?" in service["environment"]["GMNM_DATABASE_URL"]
        assert service["stop_grace_period"] and service["shm_size"]
    devices = found["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert found["worker-gpu"]["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert found["worker"]["profiles"] == ["cpu"] and found["worker-gpu"]["profiles"] == ["gpu"]
