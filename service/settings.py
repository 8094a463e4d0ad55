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
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

logger = logging.getLogger(__name__)

KEY_HASH_PREFIX = "sha256:"


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
        default_factory=lambda: ["cpu"], description="devices jobs run on, e.g. cuda:0,cuda:1"
    )
    max_concurrent_jobs: int | None = Field(
        default=None, ge=1, description="jobs running at once; default: one per device"
    )
    executor: Literal["local"] = "local"
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
        return self.max_concurrent_jobs or len(self.devices)

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
