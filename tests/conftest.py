import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# compile=auto means eager in tests (compilation costs tens of seconds per graph on 2 cores);
# tests/test_compiled.py asks for compile=on explicitly
os.environ.setdefault("TIDAR_BENCH_COMPILE", "off")

# README's test command runs two pytest-xdist workers (addopts "-n 2"): one torch thread each, and one
# for the CLI subprocesses some tests start, so two workers share two cores instead of oversubscribing
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from tidar_bench.testing import FAMILIES, make_hf_model


@pytest.fixture(scope="session", params=FAMILIES)
def hf_checkpoint(request, tmp_path_factory):
    """(family, directory) of a random tiny HF model saved with save_pretrained."""
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    make_hf_model(request.param, d)
    return request.param, d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_hf_model("llama", d)
    return d


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1 if XDIST else 2)
