"""Compiled mode (tidar_bench/compiled.py): the static-shape step equals the eager forward, and every
decoder emits the same greedy tokens compiled and eager (fp32), which for lossless decoders are AR's.

The torch.compile tests share one tiny model so the graphs compile once per shape (tens of seconds
each on 2 cores)."""

import copy

import pytest
import torch

from tidar_bench import masks
from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.block_diffusion import BlockDiffusionDecoder
from tidar_bench.baselines.eagle import EagleDecoder
from tidar_bench.baselines.eagle_head import EagleHead
from tidar_bench.compiled import Steps, normalize, resolve, unavailable_reason
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.errors import UserError
from tidar_bench.model import load_model
from tidar_bench.testing import make_hf_model
from tidar_bench.tidar import TidarDecoder

VOCAB = 96
MASK = VOCAB - 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("compiled_llama")
    make_hf_model("llama", d, vocab_size=VOCAB)
    return load_model(d, "float32", "cpu")


def _prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (int(L),), generator=g).tolist() for L in torch.randint(5, 30, (n,), generator=g)]


# ----------------------------------------------------------------------------- no compilation needed


def test_static_step_mask_is_prefix_plus_local_window():
    T, q = 20, 3
    local = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    got = masks.static_step(torch.tensor(7), local, q, T)[0, 0]
    want = torch.zeros(q, T, dtype=torch.bool)
    want[:, :7] = True
    want[:, 7:10] = local
    assert torch.equal(got, want)
    # a key window starting before the fed slots (EAGLE's tree window), per-row starts
    wl = torch.zeros(q, 5, dtype=torch.bool)
    wl[:, [0, 3]] = True
    got = masks.static_step(torch.tensor([7, 9]), wl, q, T, window=torch.tensor([4, 6]))[:, 0]
    for b, w0 in enumerate((4, 6)):
        want = torch.zeros(q, T, dtype=torch.bool)
        want[:, :w0] = True
        want[:, w0 : w0 + 5] = wl
        assert torch.equal(got[b], want)


def test_static_forward_equals_eager(model):
    """Writing KV at tensor offsets and attending over the whole static cache == the eager forward
    over the live prefix (also per-row offsets in a batch)."""
    ids = torch.randint(0, MASK, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids, cache=model.new_cache(32)).logits
        cache = model.new_cache(32)
        model(ids[:, :10], cache=cache)
        out = model(ids[:, 10:], torch.arange(10, 14), None, cache, start=torch.tensor(10)).logits
        assert torch.allclose(out, full[:, 10:], atol=1e-5)
        assert cache.length == 10  # the static form leaves the host length to the caller
        bc = model.new_cache(32, batch=2)
        model(ids[:, :10].expand(2, -1), cache=bc)
        out2 = model(ids[:, 10:].expand(2, -1), torch.arange(10, 14).expand(2, -1), None, bc,
                     start=torch.tensor([10, 10])).logits
        assert torch.allclose(out2, full[:, 10:].expand(2, -1, -1), atol=1e-5)
    # the static step read its RoPE from the table new_cache built (a row per cache slot at least):
    # the same fp32 values rope_cos_sin computes; a cast or move drops it (rebuilt by new_cache)
    cos, _ = model.rope_table
    assert cos.shape[0] >= cache.max_len and cos.dtype == torch.float32
    pos = torch.arange(cache.max_len)[None]
    for got, want in zip(model.rope(pos, cache.max_len), model.rope(pos)):
        assert torch.allclose(got, want, atol=1e-6)
    moved = copy.deepcopy(model).to(torch.float64)
    assert moved.rope_table is None
    moved.new_cache(8)
    assert moved.rope_table[0].dtype == torch.float32 and moved.rope_table[0].shape[0] == 256


def test_compile_setting_parsing(monkeypatch):
    assert normalize("true") == "on" and normalize(False) == "off" and normalize("AUTO") == "auto"
    with pytest.raises(UserError, match="compile must be one of"):
        normalize("fast")
    monkeypatch.setenv("TIDAR_BENCH_COMPILE", "off")
    assert resolve("auto", "cpu") is False
    assert resolve("off", "cpu") is False
    monkeypatch.setattr("tidar_bench.compiled.unavailable_reason", lambda d: "no C++ compiler")
    monkeypatch.delenv("TIDAR_BENCH_COMPILE")
    assert resolve("auto", "cpu") is False  # auto falls back to eager
    with pytest.raises(UserError, match="no C\\+\\+ compiler"):
        resolve("on", "cpu")


def test_eager_steps_mask_matches_static_form(model):
    """The Steps runner in eager mode (live prefix, window mask) == the static form uncompiled."""
    steps = Steps(model, "cpu", compiled=False)
    ids = torch.randint(0, MASK, (1, 12), generator=torch.Generator().manual_seed(2))
    local = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)  # window of 4 from slot 8
    with torch.inference_mode():
        c1, c2 = model.new_cache(32), model.new_cache(32)
        model(ids[:, :9], cache=c1)
        model(ids[:, :9], cache=c2)
        a = steps(ids[:, 9:], torch.arange(9, 12), cache=c1, local_mask=local, window=8).logits
        b = model(ids[:, 9:], torch.arange(9, 12), local, c2, start=torch.tensor(9), window=torch.tensor(8)).logits
    assert c1.length == 12
    assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- compiled vs eager

pytestmark_compile = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="torch.compile unavailable")


def _same_tokens(a, b, prompts, cfg):
    for p in prompts:
        ga, gb = a.generate(p, cfg), b.generate(p, cfg)
        assert ga.tokens == gb.tokens, p
        assert gb.stats.nfe == ga.stats.nfe
    return gb


@pytestmark_compile
def test_compiled_ar_equals_eager(model):
    cfg = GenerationConfig(max_new_tokens=24)
    eager, comp = ARDecoder(model, compile="off"), ARDecoder(model, compile="on")
    assert comp.options()["compile"] is True
    comp.generate(_prompts(1)[0], cfg)  # compiles the greedy 1-token step (argmax inside)
    assert comp.greedy_steps.compile_s > 0 and comp.steps.compile_s == 0
    g = _same_tokens(eager, comp, _prompts(), cfg)
    assert g.stats.compile_s == 0.0  # nothing new to compile after the first call
    # sampling runs the step that returns logits: the same seeded draws compiled and eager
    sampled = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0.8, top_k=50, seed=3))
    for p in _prompts(2):
        assert comp.generate(p, sampled).tokens == eager.generate(p, sampled).tokens
    assert comp.steps.compile_s > 0


@pytestmark_compile
@pytest.mark.parametrize("max_blocks", [None, 2])
def test_compiled_tidar_is_lossless(model, max_blocks):
    cfg = GenerationConfig(max_new_tokens=24)
    ar = ARDecoder(model, compile="off")
    comp = TidarDecoder(model, mask_token_id=MASK, block_size=4, max_blocks=max_blocks, compile="on")
    eager = TidarDecoder(model, mask_token_id=MASK, block_size=4, max_blocks=max_blocks, compile="off")
    for p in _prompts():
        want = ar.generate(p, cfg).tokens
        ge, gc = eager.generate(p, cfg), comp.generate(p, cfg)
        assert ge.tokens == want and gc.tokens == want
        assert gc.stats.accepted_lengths == ge.stats.accepted_lengths
        # one fixed step shape: k + n_blocks * k tokens every step after the prefill
        assert set(gc.stats.tokens_fed[1:]) <= {4 + comp.n_blocks * 4}


@pytestmark_compile
@pytest.mark.parametrize("tree", [True, False])
def test_compiled_eagle_is_lossless(model, tree):
    head = EagleHead.from_target(model, "eagle3")
    cfg = GenerationConfig(max_new_tokens=20)
    ar = ARDecoder(model, compile="off")
    kw = dict(tree=tree, depth=3, top_k=2, total_tokens=6, chain_length=3)
    eager = EagleDecoder(model, head, compile="off", **kw)
    comp = EagleDecoder(model, head, compile="on", **kw)
    for p in _prompts():
        want = ar.generate(p, cfg).tokens
        ge, gc = eager.generate(p, cfg), comp.generate(p, cfg)
        assert ge.tokens == want and gc.tokens == want
        assert gc.stats.accepted_lengths == ge.stats.accepted_lengths


@pytestmark_compile
def test_compiled_eagle_trees_at_batch_4_equal_ar():
    """EAGLE trees at B = 4 (5 prompts of different lengths: refill), compiled fixed shapes [4, .]
    (absorb depth+1, expand top_k, verify total_tokens; inert padding): every row == batch-1 ar,
    and the same accepted lengths as the eager B = 4 run. The embedded trained head, so paths are long."""
    from pathlib import Path

    from tidar_bench.registry import DecoderContext, build_decoder

    emb = Path(__file__).resolve().parents[1] / "tidar_bench" / "embedded"
    ctx = DecoderContext(emb / "base", "cpu", "float32", emb / "eagle")
    ar = build_decoder("ar", ctx, {"compile": "off"})
    opts = {"depth": "4", "top_k": "3", "total_tokens": "10"}
    comp = build_decoder("eagle", ctx, {"compile": "on", **opts})
    eager = build_decoder("eagle", ctx, {"compile": "off", **opts})
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    ids = ctx.tokenizer.encode(text)
    prompts = [ids[: 10 + 7 * i] for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=20)
    want = [ar.generate(p, cfg).tokens for p in prompts]
    gc, ge = comp.generate_batch(prompts, cfg, 4), eager.generate_batch(prompts, cfg, 4)
    assert [g.tokens for g in gc] == want and [g.tokens for g in ge] == want
    assert [g.stats.accepted_lengths for g in gc] == [g.stats.accepted_lengths for g in ge]
    assert max(max(g.stats.accepted_lengths) for g in gc) > 2
    assert all(set(g.stats.tokens_fed[1:]) == {10} for g in gc)


@pytestmark_compile
@pytest.mark.parametrize("extra", [{}, {"separate_commit": True, "remasking": "low_confidence_dynamic"}])
def test_compiled_block_diffusion_equals_eager(model, extra):
    cfg = GenerationConfig(max_new_tokens=16)
    kw = dict(mask_token_id=MASK, block_size=4, threshold=0.5, **extra)  # extra: SDAR's rule and forward schedule
    eager = BlockDiffusionDecoder(model, compile="off", **kw)
    comp = BlockDiffusionDecoder(model, compile="on", **kw)
    _same_tokens(eager, comp, _prompts(2), cfg)


def test_run_decoder_settings_and_compile_default(tiny_llama, tmp_path):
    """`run --decoders ar,ar(compile=false),hf(compile=true) --compile off`: one entry per setting,
    --compile is every decoder's default, a setting's own option wins, labels stay as written."""
    from tidar_bench.harness.runner import RunSpec, _decoder_options

    spec = RunSpec(model=tiny_llama, decoders=["ar", "ar(compile=false)", "hf(compile=true)"], tasks=["gsm8k"],
                   out=tmp_path / "r", compile="off", decoder_args=["ar.compile=on"])
    full, given, names = _decoder_options(spec)
    assert names == {"ar": "ar", "ar(compile=false)": "ar", "hf(compile=true)": "hf"}
    assert full["ar"]["compile"] == "on"  # --decoder-arg ar.compile applies to every ar setting...
    assert full["ar(compile=false)"]["compile"] == "false"  # ...but the setting's own option wins
    assert full["hf(compile=true)"]["compile"] == "true"
    assert given["hf(compile=true)"] == {"compile": "true"}
    spec.decoder_args = []
    full, given, _ = _decoder_options(spec)
    assert full["ar"]["compile"] == "off" and given["ar"] == {}  # --compile is a default, not a label
