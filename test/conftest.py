"""Fixtures shared by the model tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def fast_cpu():
    """One intra-op thread: on the shared 2-core test machine OpenMP threads spin against
    other processes and tiny forward passes take seconds instead of milliseconds. Flush
    denormals: untrained backbones with fresh batch-norm statistics produce denormal
    floats, ~30x slower on CPU (trained weights do not). Both are restored afterwards
    (hypothesis refuses to run with denormals flushed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)
