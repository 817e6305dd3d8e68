import os

import pytest
import torch

# Hub look-ups hang for minutes on a machine without network; every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Test models are tiny: a second intra-op thread only adds hand-off latency, and on a machine
    shared with other jobs each multi-threaded op can wait a scheduler time slice for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
