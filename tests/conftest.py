"""Shared fixtures."""

import pytest


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (tiny models: threads only add contention)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
