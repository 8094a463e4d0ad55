"""Training tests share one cache of generated data sets, kept out of the user's home."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("gmnm-cache")
    previous = os.environ.get("GMNM_CACHE_DIR")
    os.environ["GMNM_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("GMNM_CACHE_DIR", None)
    else:
        os.environ["GMNM_CACHE_DIR"] = previous
