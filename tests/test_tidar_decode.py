"""TiDAR decoding: lossless against AR greedy, cache == fresh prefill after every step, sampling
keeps the AR distribution (and a broken acceptance rule is caught), and the lossy options run."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tidar_bench.baselines.ar import ARDecoder
from tidar_bench import tidar as tidar_mod
from tidar_bench.checkpoint import TidarConfig
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.errors import UserError
from tidar_bench.model import load_model
from tidar_bench.registry import DecoderContext, build_decoder
from tidar_bench.testing import CharTok, chi2_pvalue, make_hf_model, always_accept_chain
from tidar_bench.tidar import TidarDecoder

V = 96
MASK = V - 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for fam in ("llama", "qwen2", "qwen3"):
        d = tmp_path_factory.mktemp(f"tidar_{fam}")
        make_hf_model(fam, d, seed=1)
        TidarConfig(mask_token_id=MASK, block_size=4).save(d)
        out[fam] = (d, load_model(d, "float32", "cpu"))
    return out


def _prompts(n: int, seed: int = 0, vocab: int = MASK) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_ar(models, family):
    model = models[family][1]
    tok = CharTok()
    ar = ARDecoder(model, tok)
    accepted = []
    for k in (1, 2, 4, 8):
        td = TidarDecoder(model, tok, mask_token_id=MASK, block_size=k)
        for i, p in enumerate(_prompts(8, seed=k)):
            ref = ar.generate(p, GenerationConfig(max_new_tokens=11 + i % 4))
            t = td.generate(p, GenerationConfig(max_new_tokens=11 + i % 4))
            assert t.tokens == ref.tokens and t.finish_reason == "length"
            accepted += t.stats.accepted_lengths
            configs = [
                # a stop id and a stop string that first occur inside the reference output
                GenerationConfig(max_new_tokens=14, stop_token_ids=(ref.tokens[5 + i % 4],)),
                GenerationConfig(max_new_tokens=14, stop_strings=(tok.decode(ref.tokens[4 + i % 5: 6 + i % 5]),)),
            ]
            for cfg in configs:
                a, t = ar.generate(p, cfg), td.generate(p, cfg)
                assert t.tokens == a.tokens, (k, i, cfg)
                assert (t.text, t.finish_reason) == (a.text, a.finish_reason)
                assert t.stats.new_tokens == len(t.tokens)
                assert t.stats.nfe == 1 + len(t.stats.accepted_lengths) == len(t.stats.tokens_fed)
                assert all(1 <= n <= k for n in t.stats.accepted_lengths)
                accepted += t.stats.accepted_lengths
        assert td.lossless and td.options()["drafts_per_step"] == k - 1
    # random models accept a few drafts by chance (repetitions): multi-token steps did happen
    assert max(accepted) > 1


def test_cache_equals_fresh_prefill_after_every_step(models):
    model = models["llama"][1]
    for k, sp, max_blocks in [(4, SamplingParams(), None), (3, SamplingParams(temperature=1.0, seed=3), None),
                              (8, SamplingParams(), 2)]:
        td = TidarDecoder(model, mask_token_id=MASK, block_size=k, max_blocks=max_blocks)
        checked = []

        def on_step(caches, history):
            cache = caches["target"]
            assert cache.length == len(history) - 1
            fresh = model.new_cache(len(history))
            model(torch.tensor([history[:-1]]), cache=fresh)
            for got, want in zip(cache.snapshot(), fresh.snapshot()):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            checked.append(len(history))

        td.on_step = on_step
        for p in _prompts(3, seed=11):
            g = td.generate(p, GenerationConfig(max_new_tokens=16, sampling=sp))
            assert checked[-1] == len(p) + 1 + sum(g.stats.accepted_lengths)  # after the last step
        assert len(checked) >= 3 * 5


def _functional_model(family: str, path) -> torch.nn.Module:
    """A model whose next-token prediction depends only on the current input token: attention
    and MLP outputs are zeroed, embeddings orthogonal, lm_head maps token t to f(t). Mask tokens
    predict c and f(c) = c, other tokens walk down/up to c: once the text reaches c the diffusion
    drafts (all c) are always accepted, so multi-token acceptance and the bonus path run."""
    vocab, c = 32, 5
    make_hf_model(family, path, vocab_size=vocab, tie_word_embeddings=False)
    m = load_model(path, "float32", "cpu")
    f = {t: (t - 1 if t > c else t + 1) for t in range(vocab)}
    f[c] = f[vocab - 2] = f[vocab - 1] = c
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        m.model.embed_tokens.weight.copy_(q[:vocab] * 8)
        m.lm_head.weight.zero_()
        for t, v in f.items():
            m.lm_head.weight[v] += q[t]
    return m


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_high_acceptance_multi_token_and_bonus(tmp_path, family):
    model = _functional_model(family, tmp_path)
    ar = ARDecoder(model)
    for k in (2, 4, 8):
        td = TidarDecoder(model, mask_token_id=30, block_size=k)
        for p in ([3, 17, 12], [9], [2]):
            cfg = GenerationConfig(max_new_tokens=20)
            a, t = ar.generate(p, cfg), td.generate(p, cfg)
            assert t.tokens == a.tokens
            acc = t.stats.accepted_lengths
            assert k in acc  # all k-1 drafts accepted + the bonus token
            assert t.stats.mean_accepted_length > 1.0
            assert t.stats.nfe < a.stats.nfe
        # max_new_tokens falls inside an accepted block: the step is cut there
        cfg = GenerationConfig(max_new_tokens=11)
        t = td.generate([7], cfg)
        assert t.tokens == ar.generate([7], cfg).tokens == [6] + [5] * 10
        assert 1 + sum(t.stats.accepted_lengths) > 11 or k == 2


def _tiny_vocab_model(path):
    make_hf_model("llama", path, seed=3, vocab_size=8)
    return load_model(path, "float32", "cpu")


def test_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """TiDAR samples of the first 3 tokens vs the exact AR distribution enumerated with the
    model (8^3 sequences): chi-square on the joint of tokens 1-2 (64 cells) and on token 3. With
    k = 3, tokens 2 and 3 mostly come from verified drafts. The same test must reject an
    always-accept rule (drafts kept without rejection sampling)."""
    model = _tiny_vocab_model(tmp_path)
    prompt = [1, 4, 2]
    T, n_new = 1.0, 3
    seqs = torch.tensor(list(itertools.product(range(8), repeat=n_new)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = (model(ids).logits[:, len(prompt) - 1: -1] / T).log_softmax(-1)
    exact = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp().view(8, 8, 8)
    assert torch.isclose(exact.sum(), torch.tensor(1.0), atol=1e-5)

    def pvalues(n: int) -> tuple[float, float, float]:
        td = TidarDecoder(model, mask_token_id=6, block_size=3)
        counts = torch.zeros(8, 8, 8)
        acc = []
        for s in range(n):
            g = td.generate(prompt, GenerationConfig(max_new_tokens=n_new, sampling=SamplingParams(temperature=T, seed=s)))
            counts[tuple(g.tokens)] += 1
            acc += g.stats.accepted_lengths
        return (chi2_pvalue(counts.sum(2).flatten(), exact.sum(2).flatten()),
                chi2_pvalue(counts.sum((0, 1)), exact.sum((0, 1))), sum(acc) / len(acc))

    p12, p3, mean_acc = pvalues(2000)
    assert mean_acc > 1.3  # drafts really were accepted, so their verification is what is tested
    assert min(p12, p3) > 1e-3

    always_accept = always_accept_chain  # WRONG: no rejection (tidar_bench.testing)

    monkeypatch.setattr(tidar_mod, "verify_chain", always_accept)
    p12, p3, _ = pvalues(600)
    assert min(p12, p3) < 1e-6


def test_max_blocks_is_lossless_and_cheaper(models):
    model = models["qwen3"][1]
    ar = ARDecoder(model)
    full = TidarDecoder(model, mask_token_id=MASK, block_size=8)
    for cap in (1, 2, 3):
        td = TidarDecoder(model, mask_token_id=MASK, block_size=8, max_blocks=cap)
        assert td.options()["max_blocks"] == cap and td.lossless
        for p in _prompts(4, seed=5):
            cfg = GenerationConfig(max_new_tokens=17)
            t, f = td.generate(p, cfg), full.generate(p, cfg)
            assert t.tokens == ar.generate(p, cfg).tokens
            assert max(t.stats.tokens_fed[1:]) <= 8 + cap * 8
            assert max(f.stats.tokens_fed[1:]) == 8 + 8 * 8


def test_beta_mixing_is_lossy_and_beta_zero_trusts_diffusion(models):
    model = models["llama"][1]
    for beta in (0.5, 0.0):
        td = TidarDecoder(model, mask_token_id=MASK, block_size=4, beta=beta)
        assert not td.lossless and td.options()["lossless"] is False and td.options()["beta"] == beta
        g = td.generate([3, 1, 4], GenerationConfig(max_new_tokens=15))
        assert len(g.tokens) == 15
        if beta == 0.0:  # the target at a draft position is the diffusion argmax itself: all accepted
            assert all(a == 4 for a in g.stats.accepted_lengths[:-1])
    gs = td.generate([3, 1, 4], GenerationConfig(max_new_tokens=15, sampling=SamplingParams(temperature=0.8, seed=0)))
    assert len(gs.tokens) == 15


def test_pure_diffusion_mode(models):
    model = models["llama"][1]
    for k, steps in ((4, None), (4, 2), (8, 1)):
        td = TidarDecoder(model, mask_token_id=MASK, block_size=k, mode="diffusion", steps=steps)
        assert not td.lossless and td.options()["steps"] == (steps or k)
        for n in (1, 10, 16):
            g = td.generate([5, 9], GenerationConfig(max_new_tokens=n))
            assert len(g.tokens) == n and g.finish_reason == "length"
            blocks = math.ceil(n / k)
            assert g.stats.nfe == blocks * (steps or k)  # `steps` forwards per block, prefill included
    gs = td.generate([5, 9], GenerationConfig(max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=0)))
    assert len(gs.tokens) == 12


def test_registry_build_and_option_errors(models):
    path = models["llama"][0]
    ctx = DecoderContext(path, device="cpu", dtype="float32")
    td = build_decoder("tidar", ctx, {"beta": "0.5", "max_blocks": "2"})
    assert td.k == 4 and td.mask_id == MASK and not td.lossless  # block_size from tidar_config.json
    assert build_decoder("tidar", ctx, {"block_size": "2", "mode": "diffusion"}).options()["mode"] == "diffusion"
    for bad in ({"mode": "chain"}, {"beta": "1.5"}, {"max_blocks": "0"}, {"block_size": "2", "steps": "3"}):
        with pytest.raises(UserError):
            build_decoder("tidar", ctx, bad)
    with pytest.raises(UserError):
        build_decoder("tidar", DecoderContext(models["llama"][0].parent, device="cpu"), {})


def test_factory_options_are_the_options_dataclass():
    """`tidar`'s factory takes exactly TidarOptions' fields (mask_token_id comes from the checkpoint) plus
    preset, with the dataclass's defaults but for block_size (the checkpoint's) and compile (auto)."""
    import dataclasses
    import inspect

    from tidar_bench.tidar_options import TidarOptions

    params = inspect.signature(tidar_mod.build).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TidarOptions)}
    assert set(params) - {"ctx"} == set(fields) - {"mask_token_id"} | {"preset"}
    differ = {n for n, f in fields.items() if n in params and params[n].default != f}
    assert differ == {"block_size", "compile"}
    with pytest.raises(UserError, match="rule must be one of exact, authors, authors-greedy"):
        TidarOptions(mask_token_id=0, rule="sglang")
    o = TidarOptions(mask_token_id=0, rule="authors", first_token="ar")
    assert (o.first_token, o.prefill, o.accept, o.offset0, o.lossless) == ("ar", "two", "ratio", 1, False)


def test_padded_layout_is_the_hand_built_one():
    """`masks.tidar_padded_step`: k causal slots, then n_blocks blocks (block b serves outcomes[b], the
    rest see x and themselves), as the decoder used to build it by hand."""
    from tidar_bench.masks import tidar_padded_step, tidar_step

    for k, nb, outcomes in ((4, 4, (0, 1, 2, 3)), (4, 2, (1, 3)), (5, 3, (2,)), (1, 1, (0,))):
        n = k + nb * k
        local = torch.zeros(n, n, dtype=torch.bool)
        local[:k, :k] = torch.ones(k, k, dtype=torch.bool).tril()
        pos = torch.zeros(n, dtype=torch.long)
        pos[:k] = torch.arange(k)
        for b in range(nb):
            s, j = k + b * k, outcomes[b] if b < len(outcomes) else 0
            local[s : s + k, : j + 1] = True
            local[s : s + k, s : s + k] = True
            pos[s : s + k] = torch.arange(j + 1, j + 1 + k)
        lay = tidar_padded_step(k, nb, outcomes)
        assert lay.n_fed == n and lay.n_causal == k
        assert [lay.block_start(b) for b in range(nb)] == [k + b * k for b in range(nb)]
        assert torch.equal(tidar_step(lay), local) and torch.equal(lay.positions(), pos)


def test_diffusion_mode_is_its_own_decoder_with_bds_unmasking(models, monkeypatch):
    from tidar_bench import tidar_diffusion, unmasking
    from tidar_bench.baselines import block_diffusion

    model = models["llama"][1]
    td = TidarDecoder(model, mask_token_id=MASK, block_size=4, mode="diffusion", steps=2)
    assert isinstance(td, tidar_diffusion.TidarDiffusionDecoder) and not isinstance(td, TidarDecoder)
    assert tidar_diffusion.unmask_top is block_diffusion.unmask_top is unmasking.unmask_top
    calls = []

    def spy(*a, **kw):
        calls.append(a[3])
        return unmasking.unmask_top(*a, **kw)

    monkeypatch.setattr(tidar_diffusion, "unmask_top", spy)
    g = td.generate([5, 9], GenerationConfig(max_new_tokens=8))
    assert len(g.tokens) == 8 and calls == [2, 2, 2, 2]  # two blocks, two forwards of 2 positions each
    with pytest.raises(UserError, match="apply to mode=tidar only"):
        TidarDecoder(model, mask_token_id=MASK, block_size=4, mode="diffusion", rule="authors")
