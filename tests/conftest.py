import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# compile=auto means eager in tests (compilation costs tens of seconds per graph on 2 cores);
# tests/test_compiled.py asks for compile=on explicitly
os.environ.setdefault("TIDAR_BENCH_COMPILE", "off")

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
    torch.set_num_threads(2)
