"""Fixtures for the scaling-out tests: a tiny model for the real engine, a PostgreSQL schema per
test, and a Ray head on loopback per module that needs one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_helpers import SKIP_REASON, postgres_available, postgres_schema
from scale_helpers import RayHead, build_tiny_bert


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_job_process() -> Iterator[None]:
    # Inherited by the job processes: on a shared two-core machine a second thread per rank
    # mostly waits for the other rank.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database URL whose tables live in a schema made for this test alone."""
    if not postgres_available():
        pytest.skip(SKIP_REASON)
    with postgres_schema() as url:
        yield url


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # Ray comes with the dev extra, so an import that fails is a broken install to fix, not an
    # environment to skip.
    import ray  # noqa: F401

    head = RayHead()
    try:
        yield head.start()
    finally:
        head.stop()
