import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on 2 shared cores: one thread avoids OpenMP spin contention (40x faster measured).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
