"""The service's configuration: every setting comes from a `GMNM_` environment variable.

Defaults give the embedded set-up (SQLite and artifacts under `./data`, one job at a time on the
CPU, no API keys, loopback only). List settings accept a comma-separated string
(`GMNM_DEVICES=cuda:0,cuda:1`) as well as JSON.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

logger = logging.getLogger(__name__)

KEY_HASH_PREFIX = "sha256:"
# Jobs one worker keeps submitted to a Ray cluster when GMNM_MAX_CONCURRENT_JOBS is not set.
RAY_DEFAULT_CONCURRENCY = 16


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Where the service keeps its state, what it may run, and who may call it."""

    model_config = SettingsConfigDict(env_prefix="GMNM_", extra="ignore")

    data_dir: Path = Field(default=Path("./data"), description="database, files and checkpoints")
    database_url: str | None = Field(
        default=None,
        description="any SQLAlchemy URL; default: SQLite in WAL mode at DATA_DIR/gmnm.db",
    )
    host: str = "127.0.0.1"
    port: int = 8000

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="bearer keys (or `sha256:<hex>` digests of them), comma-separated",
    )
    api_keys_file: Path | None = Field(default=None, description="one key or digest per line")
    allow_no_auth: bool = Field(
        default=False, description="allow a non-loopback bind without API keys"
    )

    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cpu"],
        description="devices jobs run on, e.g. cuda:0,cuda:1; a job with num_processes N takes N "
        "of them (list cpu several times to run several CPU processes)",
    )
    max_concurrent_jobs: int | None = Field(
        default=None, ge=1, description="jobs running at once; default: one per device"
    )
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="`local`: process groups on this host (torchrun for several devices); "
        "`ray`: Ray Jobs on the cluster at GMNM_RAY_ADDRESS",
    )
    worker_hostname: str = Field(
        default_factory=socket.gethostname,
        description="the host name this worker records; workers that cannot see each other's "
        "processes (separate PID namespaces) must not share one",
    )
    ray_address: str | None = Field(
        default=None, description="the Ray dashboard (Jobs API) address, e.g. http://head:8265"
    )
    ray_auth_token: SecretStr | None = Field(
        default=None, description="the cluster's token when Ray runs with RAY_AUTH_MODE=token"
    )
    ray_auth_token_file: Path | None = Field(
        default=None, description="a file holding that token (e.g. ~/.ray/auth_token)"
    )
    ray_gpus_per_process: float = Field(
        default=0.0, ge=0, description="GPUs each job process asks Ray for (0: CPU-only jobs)"
    )
    job_niceness: int = Field(
        default=10, ge=0, le=19, description="CPU priority of job processes below the API's"
    )
    job_commands: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "fine_tune": ["gmnm-train"],
            "evaluation": ["gmnm-eval"],
            "conversion": ["gmnm-convert"],
        },
        description="the program each job kind runs (`--spec`, `--out` and `--resume` follow)",
    )
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="local directories model references may point into"
    )

    max_upload_bytes: int = Field(default=1 << 30, ge=1)
    max_active_jobs_per_key: int = Field(default=16, ge=1)
    max_steps: int = Field(default=1_000_000, ge=1)
    max_job_minutes: float = Field(default=24 * 60, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="starts of one job before worker_lost")
    cancel_grace_seconds: float = Field(default=30.0, ge=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    heartbeat_seconds: float = Field(default=2.0, gt=0)
    worker_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a worker silent this long has its jobs requeued"
    )
    run_supervisor: bool = Field(default=True, description="run the supervisor inside `serve`")

    @field_validator("api_keys", "devices", "model_dirs", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("job_commands", mode="before")
    @classmethod
    def _json_commands(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ray_needs_an_address(self) -> Settings:
        if self.executor == "ray" and not self.ray_address:
            raise ValueError(
                "GMNM_EXECUTOR=ray needs GMNM_RAY_ADDRESS, the address of the Ray cluster's "
                "Jobs API (its dashboard, e.g. http://ray-head:8265)"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gmnm.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def concurrency(self) -> int:
        if self.executor == "ray":
            # Ray queues what its cluster cannot place yet; this only bounds the jobs one worker
            # submits and watches at once.
            return self.max_concurrent_jobs or RAY_DEFAULT_CONCURRENCY
        return self.max_concurrent_jobs or len(self.devices)

    def ray_token(self) -> str | None:
        """The Ray cluster's authentication token, from the setting or its file."""
        if self.ray_auth_token is not None:
            return self.ray_auth_token.get_secret_value()
        if self.ray_auth_token_file is not None:
            return self.ray_auth_token_file.expanduser().read_text().strip()
        return None

    def key_digests(self) -> list[str]:
        """The sha256 hex digests of every configured key; plaintext keys are hashed here."""
        entries = list(self.api_keys)
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            entries += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return [digest_key_entry(entry) for entry in entries]


def digest_key_entry(entry: str) -> str:
    if entry.startswith(KEY_HASH_PREFIX):
        return entry.removeprefix(KEY_HASH_PREFIX).lower()
    return hashlib.sha256(entry.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
