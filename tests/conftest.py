import importlib.util
import os
import threading
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from conditioning import CLIPBPETokenizer
from ldm.schedule import NoiseSchedule, make_betas

# Hub look-ups hang for minutes on a machine without network; every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# tqdm guards its bars with one multiprocessing lock shared by every process forked from this one.
# The mutation runner (make mutation) forks each mutant's tests from one pytest process and kills
# those that overrun, sometimes while they hold that lock; every later mutant then hangs at its first
# progress bar. A thread lock is copied, unlocked, into each fork.
tqdm.set_lock(threading.RLock())


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Test models are tiny: a second intra-op thread only adds hand-off latency, and on a machine
    shared with other jobs each multi-threaded op can wait a scheduler time slice for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def schedule():
    """SD's / LDM's 1000-step scaled-linear schedule (0.00085 .. 0.012)."""
    return NoiseSchedule(make_betas("ldm-linear"))


@pytest.fixture(scope="module")
def tokenizer() -> CLIPBPETokenizer:
    """The CLIP BPE tokenizer on its bundled vocabulary."""
    return CLIPBPETokenizer()


def float64_tables(betas):
    """betas, alpha-bars and previous alpha-bars in float64, the closed forms tests compare against."""
    betas = betas.double()
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return betas, ab, ab_prev


def load_script(relative_path: str):
    """Import a script of the repository that is not in a package (bench/*.py) as a module."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
