"""Model core against transformers (the reference), and the KV cache contracts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tidar_bench import masks
from tidar_bench.errors import UserError
from tidar_bench.model import load_model


def _hf(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def test_logits_match_transformers(hf_checkpoint):
    family, d = hf_checkpoint
    ours, ref = load_model(d, "float32", "cpu"), _hf(d)
    ids = torch.randint(0, ours.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = ours(ids).logits
    assert want.std() > 0.1  # logits far from uniform, so a match means something
    assert (got - want).abs().max().item() < 1e-4, family


def test_llama3_rope_scaling_used(tmp_path):
    """Positions beyond original_max_position_embeddings exercise the llama3 frequency ramp."""
    from tidar_bench.testing import make_hf_model

    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg.get("rope_parameters") or cfg.get("rope_scaling"))["rope_type"] == "llama3"
    ours, ref = load_model(tmp_path, "float32", "cpu"), _hf(tmp_path)
    ids = torch.randint(0, 90, (1, 200))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() < 1e-4


def test_incremental_decoding_equals_full_forward(hf_checkpoint):
    _, d = hf_checkpoint
    m = load_model(d, "float32", "cpu")
    ids = torch.randint(0, m.config.vocab_size, (1, 24))
    full = m(ids).logits
    cache = m.new_cache(64)
    parts = [m(ids[:, :10], cache=cache).logits]
    for i in range(10, 24, 3):  # chunks of 3, then 1-token steps via the q == 1 path
        parts.append(m(ids[:, i : i + 3], cache=cache).logits)
    assert cache.length == 24
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    one = m(torch.tensor([[5]]), cache=cache).logits
    ref = m(torch.cat([ids, torch.tensor([[5]])], 1)).logits[:, -1:]
    assert torch.allclose(one, ref, atol=1e-5)


def test_crop_then_refeed_equals_fresh_prefill(hf_checkpoint):
    _, d = hf_checkpoint
    m = load_model(d, "float32", "cpu")
    ids = torch.randint(0, m.config.vocab_size, (1, 20))
    cache = m.new_cache(64)
    m(ids, cache=cache)
    m(torch.randint(0, m.config.vocab_size, (1, 7)), cache=cache)  # speculative junk
    cache.crop(12)
    out = m(ids[:, 12:], cache=cache).logits
    fresh = m.new_cache(64)
    ref = m(ids, cache=fresh).logits[:, 12:]
    assert torch.allclose(out, ref, atol=1e-5)
    k, v = cache.snapshot()
    k2, v2 = fresh.snapshot()
    assert torch.allclose(k, k2, atol=1e-6) and torch.allclose(v, v2, atol=1e-6)


def test_arbitrary_mask_two_branches_equal_separate_runs(hf_checkpoint):
    """Two causal branches sharing a cached prefix, fed in one forward with a tree mask and
    explicit positions, give the same logits as running each branch on its own."""
    _, d = hf_checkpoint
    m = load_model(d, "float32", "cpu")
    V = m.config.vocab_size
    prefix, a, b = (torch.randint(0, V, (1, n)) for n in (9, 4, 3))
    cache = m.new_cache(64)
    m(prefix, cache=cache)
    parents = [-1, 0, 1, 2, -1, 4, 5]
    mask = masks.tree(parents, cached=9)
    pos = torch.tensor([9, 10, 11, 12, 9, 10, 11])
    joint = m(torch.cat([a, b], 1), pos, mask, cache).logits
    sep_a = m(torch.cat([prefix, a], 1)).logits[:, 9:]
    sep_b = m(torch.cat([prefix, b], 1)).logits[:, 9:]
    assert torch.allclose(joint[:, :4], sep_a, atol=1e-5)
    assert torch.allclose(joint[:, 4:], sep_b, atol=1e-5)


def test_keep_compacts_selected_path(tiny_llama):
    m = load_model(tiny_llama, "float32", "cpu")
    V = m.config.vocab_size
    prefix = torch.randint(0, V, (1, 6))
    nodes = torch.randint(0, V, (1, 5))
    parents = [-1, 0, 0, 2, 1]  # path 0 -> 2 -> 3
    cache = m.new_cache(32)
    m(prefix, cache=cache)
    m(nodes, torch.tensor([6, 7, 7, 8, 8]), masks.tree(parents, 6), cache)
    cache.keep([6, 8, 9])
    assert cache.length == 9
    path = torch.cat([prefix, nodes[:, [0, 2, 3]]], 1)
    fresh = m.new_cache(32)
    m(path, cache=fresh)
    assert torch.allclose(cache.snapshot()[0], fresh.snapshot()[0], atol=1e-5)
    assert torch.allclose(cache.snapshot()[1], fresh.snapshot()[1], atol=1e-5)
    with pytest.raises(ValueError):
        cache.keep([8, 7])


def test_hidden_states_and_logits_index(tiny_llama):
    m = load_model(tiny_llama, "float32", "cpu")
    ref = _hf(tiny_llama)
    ids = torch.randint(0, 90, (1, 11))
    out = m(ids, hidden_layers=(0, 2), logits_index=slice(-2, None))
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states  # [emb, after layer 0, 1, 2 (normed)]
    assert out.logits.shape == (1, 2, m.config.vocab_size)
    assert torch.allclose(out.hidden_states[0], hs[1], atol=1e-5)
    assert set(out.hidden_states) == {0, 2}


def test_sharded_bf16_and_bin_checkpoints(tmp_path, tiny_llama):
    sd = load_file(str(tiny_llama / "model.safetensors"))
    names = sorted(sd)
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((tiny_llama / "config.json").read_text())
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(shard / fn))
        wm.update({k: fn for k in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    a = load_model(tiny_llama, "float32", "cpu")
    b = load_model(shard, "float32", "cpu")
    ids = torch.randint(0, 90, (1, 8))
    assert torch.equal(a(ids).logits, b(ids).logits)
    c = load_model(shard, "bfloat16", "cpu")
    assert c.dtype == torch.bfloat16 and (c(ids).logits - a(ids).logits).abs().max() < 0.5
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save(sd, binary / "pytorch_model.bin")
    assert torch.equal(load_model(binary, "float32", "cpu")(ids).logits, a(ids).logits)


def test_load_errors(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="supported: llama, qwen2, qwen3"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no weights"):
        load_model(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="cannot read"):
        load_model(bad)
    with pytest.raises(UserError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        load_model(tiny_llama, device="cuda")
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(tiny_llama, dtype="float8")


def test_flex_attention_matches_sdpa(tiny_llama):
    from tidar_bench import attention

    if not attention.flex_available():
        pytest.skip("no FlexAttention in this torch")
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 9, 16)
    v = torch.randn(1, 2, 9, 16)
    mask = masks.tree([-1, 0, 0, 2, -1], cached=4)[None, None]
    try:
        got = attention.flex(q, k, v, mask)
    except Exception as e:  # noqa: BLE001 - eager flex may be unsupported on this CPU build
        pytest.skip(f"FlexAttention not runnable here: {e}")
    assert torch.allclose(got, attention.sdpa(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("qn", [1, 5])
def test_math_attention_matches_sdpa(qn):
    """The compiled CPU steps' attention (`attention.math`, with its own 1-token form) against SDPA:
    grouped heads, two rows with their own masks, a row-shared mask, no mask."""
    from tidar_bench import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((6, qn), (2, 11), (2, 11)))
    rows = torch.rand(2, 1, qn, 11, generator=g) < 0.6
    rows[..., 0] = True  # every query sees a key
    for mask in (rows, rows[:1], None):
        want = attention.sdpa(q, k, v, mask)
        assert (attention.math(q, k, v, mask) - want).abs().max().item() < 1e-5
