"""Compilation a user can see and afford (tidar_bench/compiled.py): every compile prints one line,
and the CPU size rules pick eager / C++ wrapper and the attention window by model
size (the rules are tested on meta-device models: nothing big is allocated)."""

import json
from pathlib import Path

import logging

import pytest
import torch

import tidar_bench
from tidar_bench import compiled, setup_logging
from tidar_bench.cache import KVCache
from tidar_bench.compiled import Steps, cpu_inductor_options, cpu_rule, kv_bucket, n_params, resolve, unavailable_reason
from tidar_bench.model import ModelConfig, Transformer
from tidar_bench.profiling import shipped_config


def _meta_model(cfg: dict) -> Transformer:
    c = ModelConfig.from_dict(cfg)
    with torch.device("meta"):
        m = Transformer(c)
    if c.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "max_position_embeddings": 8192, "tie_word_embeddings": True}


def test_cpu_size_rules_by_model():
    big = _meta_model(shipped_config("qwen2.5-1.5b"))
    smol = _meta_model(SMOLLM2_135M)
    base = _meta_model(json.loads((Path(tidar_bench.__file__).parent / "embedded" / "base" / "config.json").read_text()))
    assert n_params(big) > 1.5e9 and 1.3e8 < n_params(smol) < 1.4e8 and n_params(base) < 5e6
    assert cpu_rule(n_params(big)) == "eager"
    assert cpu_rule(n_params(smol)) == cpu_rule(n_params(base)) == "cpp-wrapper"
    # the C++ wrapper where auto compiles; the Python wrapper for a big model compiled because asked
    assert cpu_inductor_options(n_params(smol))["cpp_wrapper"]
    assert not cpu_inductor_options(n_params(big))["cpp_wrapper"]
    # attention windows: 512 slots for SmolLM2 (fp32: 538 MB of weights, 46 KB of KV per slot), 128 for the suite
    # and narrower windows at batch > 1, where every row's padding is read
    for m, batch, want in ((smol, 1, 512), (smol, 4, 128), (base, 1, 128)):
        c = m.config
        cache = KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 1024, batch=batch, device="meta")
        assert kv_bucket(4 * n_params(m), cache) == want


def test_auto_is_eager_on_cpu_above_the_size_rule(monkeypatch, caplog):
    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))
    monkeypatch.delenv("TIDAR_BENCH_COMPILE", raising=False)
    compiled.note.cache_clear()
    with caplog.at_level(logging.INFO, logger="tidar_bench.compiled"):
        assert resolve("auto", "cpu", params=2_000_000_000) is False
    assert "compile auto: eager on CPU, the model has 2.00B parameters" in caplog.text
    assert resolve("on", "cpu", params=2_000_000_000) is True  # asked for: compiled anyway
    assert resolve("auto", "cpu", params=1_000_000) is True
    monkeypatch.setenv("TIDAR_BENCH_COMPILE", "off")
    assert resolve("auto", "cpu", params=1_000_000) is False


def test_every_compile_prints_one_line(monkeypatch, capfd):
    """Through the CLI's handler (tidar_bench.setup_logging): one stderr line per compiled shape."""
    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))
    monkeypatch.delenv("TIDAR_BENCH_COMPILE_LOG", raising=False)
    log = logging.getLogger("tidar_bench")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    monkeypatch.setattr(logging.getLogger("tidar_bench.compiled"), "level", logging.NOTSET)
    setup_logging()
    cfg = dict(SMOLLM2_135M, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_dict(cfg)).eval()
    monkeypatch.setenv("TIDAR_BENCH_CPP_WRAPPER", "off")  # the faster build (seconds less on 2 busy cores)
    steps = Steps(m, "cpu", compiled=True, name="tiny step", params=100_000_000)  # counted as 100M: the widest window
    cache = m.new_cache(16)
    with torch.inference_mode():
        m(torch.tensor([[1, 2, 3]]), cache=cache)
        capfd.readouterr()
        for t in range(2):  # the second call of the same shape compiles nothing and prints nothing
            steps(torch.tensor([[4]]), torch.tensor([cache.length]), cache=cache)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compiled tiny step [1x1, kv 256] in ")  # 100M "parameters": the widest window, the whole cache and err[0].endswith(" s")
    assert float(err[0].split(" in ")[1][:-2]) == pytest.approx(steps.compile_s, abs=0.06)
    logging.getLogger("tidar_bench.compiled").setLevel(logging.WARNING)  # a user silences it with logging
    compiled.note.cache_clear()
    steps._seen.clear()
    with torch.inference_mode():
        steps(torch.tensor([[4]]), torch.tensor([cache.length]), cache=cache)
    assert capfd.readouterr().err == ""


def test_compile_line_names_the_decoder_and_step():
    from tidar_bench.baselines.ar import ARDecoder

    cfg = dict(SMOLLM2_135M, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    d = ARDecoder(Transformer(ModelConfig.from_dict(cfg)), compile="off")
    assert (d.steps.name, d.greedy_steps.name) == ("ar step", "ar greedy step")
