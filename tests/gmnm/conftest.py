"""Settings for the GMNM tests."""

from collections.abc import Iterator

import pytest
import torch

import gmnm


@pytest.fixture(autouse=True)
def one_thread_and_automatic_backend() -> Iterator[None]:
    """One intra-op thread (the machine is shared, and waiting for a busy core's thread makes
    small ops hundreds of times slower), and the automatic backend, for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gmnm.set_backend("auto")
    yield
    gmnm.set_backend("auto")
    torch.set_num_threads(threads)
