"""Where the service keeps things under its data directory, and how objects are named.

DATA_DIR/gmnm.db               the SQLite database (unless GMNM_DATABASE_URL says otherwise)
DATA_DIR/files/FILE_ID         uploaded data files and result files, as uploaded
DATA_DIR/jobs/JOB_ID/          a job's output directory (see training.protocol)
DATA_DIR/archives/CKPT_ID.tar  checkpoint archives, built on first download
"""

from __future__ import annotations

import secrets
from pathlib import Path

JOB_PREFIXES = {"fine_tune": "ftjob", "conversion": "conv", "evaluation": "eval"}
FILE_PREFIX = "file"
CHECKPOINT_PREFIX = "ftckpt"
EVENT_PREFIX = "ftevent"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Layout:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.resolve()
        self.files = self.root / "files"
        self.jobs = self.root / "jobs"
        self.archives = self.root / "archives"

    def create(self) -> None:
        for directory in (self.root, self.files, self.jobs, self.archives):
            directory.mkdir(parents=True, exist_ok=True)

    def file_path(self, file_id: str) -> Path:
        return self.files / file_id

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def archive_path(self, checkpoint_id: str) -> Path:
        return self.archives / f"{checkpoint_id}.tar"
