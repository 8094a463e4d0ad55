"""The `gmnm` service commands, settings from the environment, and the migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from postgres_helpers import SKIP_REASON, postgres_available, postgres_schema
from sqlalchemy import create_engine, inspect

from service.cli import main
from service.db import Base, Database, upgrade
from service.settings import Settings


def test_serving_on_a_public_address_without_keys_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("GMNM_API_KEYS", raising=False)
    monkeypatch.delenv("GMNM_ALLOW_NO_AUTH", raising=False)
    code = main(["serve", "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "GMNM_API_KEYS" in caplog.text and "GMNM_ALLOW_NO_AUTH" in caplog.text


def test_settings_read_comma_separated_lists_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GMNM_DEVICES", "cuda:0,cuda:1")
    monkeypatch.setenv("GMNM_API_KEYS", "a,b")
    monkeypatch.setenv("GMNM_JOB_COMMANDS", '{"fine_tune": ["python", "-m", "x"]}')
    settings = Settings()
    assert settings.devices == ["cuda:0", "cuda:1"]
    assert settings.concurrency == 2
    assert len(settings.key_digests()) == 2
    assert settings.job_commands == {"fine_tune": ["python", "-m", "x"]}


def test_db_upgrade_creates_the_schema_the_models_describe(tmp_path: Path) -> None:
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    engine = create_engine(f"sqlite:///{tmp_path / 'gmnm.db'}")
    assert {"jobs", "events", "files", "checkpoints", "workers"} <= set(
        inspect(engine).get_table_names()
    )
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_sqlite_database_runs_in_wal_mode(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(database)
    with database.read() as session:
        assert session.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_worker_command_runs_jobs_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "GMNM_DATA_DIR": str(tmp_path), "GMNM_POLL_SECONDS": "0.05"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        database = Database(f"sqlite:///{tmp_path / 'gmnm.db'}")
        while time.monotonic() < deadline:
            if (tmp_path / "gmnm.db").exists():
                with database.read() as session:
                    tables = inspect(session.connection()).get_table_names()
                    if (
                        "workers" in tables
                        and session.connection()
                        .exec_driver_sql("SELECT count(*) FROM workers")
                        .scalar()
                    ):
                        break
            time.sleep(0.1)
        else:
            pytest.fail("the worker never registered")
        worker.terminate()
        output = worker.communicate(timeout=30)[0].decode()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, output
    assert "supervisor" in output and "stopped" in output
    with database.read() as session:
        left = session.connection().exec_driver_sql("SELECT count(*) FROM workers").scalar()
    assert left == 0


@pytest.mark.skipif(not postgres_available(), reason=SKIP_REASON)
def test_postgres_migrations_and_claims_with_skip_locked(tmp_path: Path) -> None:
    with postgres_schema() as url:  # migrated from empty
        _claim_twenty_jobs_with_three_supervisors(tmp_path, url)


def _claim_twenty_jobs_with_three_supervisors(tmp_path: Path, url: str) -> None:
    from service.db import QUEUED, Job
    from service.supervisor import Supervisor

    database = Database(url)
    upgrade(database)  # a second upgrade finds nothing to do
    with database.write() as session:
        for index in range(20):
            session.add(
                Job(
                    id=f"ftjob-pg{index:03d}",
                    kind="fine_tune",
                    owner="local",
                    status=QUEUED,
                    request={},
                    spec={},
                    created_at=time.time() + index,
                    attempts=0,
                    resume=False,
                    events_offset=0,
                    result_files=[],
                )
            )
    settings = Settings(data_dir=tmp_path, database_url=url)
    claimed: list[str] = []
    lock = threading.Lock()

    def drain(worker: int) -> None:
        supervisor = Supervisor(settings, database, worker_id=f"host:{worker}:x")
        while (job := supervisor.claim("cpu")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=drain, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == [f"ftjob-pg{index:03d}" for index in range(20)]
    database.dispose()
