"""Surgery tests run single-threaded: on the shared two-core machines, two intra-op threads that
compete with other processes make small convolutions tens of times slower."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
