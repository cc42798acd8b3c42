"""Third-party draft formats on replicas written in their layouts (checkpoint-layouts.md): AngelSlim
and SGLang/SpecForge EAGLE-3 heads (whose packages do not install here), and speculators EAGLE-3 /
DFlash / DSpark without the package (tests/test_reference_formats.py checks those against
speculators itself). Each loads by what its config says, decodes losslessly, refuses its unsupported
flags by name; DSpark's sequential Markov drafts keep speculative sampling exact."""

from __future__ import annotations

import itertools

import pytest
import torch

import tidar_bench.baselines.dflash as dflash_mod
from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.dflash import DFlashDecoder
from tidar_bench.baselines.dflash_drafter import DFlashConfig, DFlashDrafter, load_dflash_drafter
from tidar_bench.baselines.eagle import EagleDecoder
from tidar_bench.baselines.eagle_head import load_eagle_head
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.errors import UserError
from tidar_bench.formats import detect
from tidar_bench.model import load_model, save_checkpoint
from tidar_bench.testing import chi2_pvalue, make_hf_model, save_draft, speculators_drafter, speculators_layer, always_accept_chain
from test_eagle import _official_layout, _prompts


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats_qwen3")
    make_hf_model("qwen3", d, seed=2, num_hidden_layers=4)
    return d, load_model(d, "float32", "cpu")


def _lossless(dec, model, n: int = 4, new: int = 12):
    ar = ARDecoder(model)
    for p in _prompts(n, seed=7):
        c = GenerationConfig(max_new_tokens=new)
        assert dec.generate(p, c).tokens == ar.generate(p, c).tokens, p


# ----------------------------------------------------------------------------- EAGLE-3


def test_angelslim_head_loads_with_its_quirks(target, tmp_path):
    path, model = target
    cfg, sd = _official_layout(model)
    # AngelSlim's Qwen3 config: its own architecture name, no head_dim / target_hidden_size, a tie flag
    # that does not apply, attention_bias in the config that its layer ignores; d2t/t2d always saved
    cfg = dict(cfg, architectures=["Eagle3LlamaForCausalLM"], target_model_type="qwen3", tie_word_embeddings=True,
               attention_bias=True)
    save_draft(tmp_path / "a", cfg, sd)
    head = load_eagle_head(tmp_path / "a", model)
    assert head.config.format == "angelslim-eagle3" and head.midlayer.self_attn.q_proj.bias is None
    dec = EagleDecoder(model, head, depth=3, top_k=2, total_tokens=6)
    assert dec.options()["format"] == "angelslim-eagle3" and dec.options()["target_layers"] == [1, 1, 0]
    _lossless(dec, model)
    save_draft(tmp_path / "b", cfg, dict(sd, **{"fc.weight": torch.zeros(64 + 2, 3 * 64)}))  # early_stop_method
    with pytest.raises(UserError, match="early-stop"):
        load_eagle_head(tmp_path / "b", model)


def test_specforge_aux_ids_are_layer_outputs(target, tmp_path):
    path, model = target
    cfg, sd = _official_layout(model)
    cfg = dict(cfg, architectures=["LlamaForCausalLMEagle3"], eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 2, 3]})
    head = load_eagle_head(save_draft(tmp_path / "s", cfg, sd), model)
    assert detect(cfg) == "specforge-eagle3"
    dec = EagleDecoder(model, head, depth=3, top_k=2, total_tokens=6)
    assert dec.options()["target_layers"] == [0, 2, 3]  # SGLang captures the input of k + 1 = our output of k
    _lossless(dec, model)
    for bad, match in (({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 4]}}, "outside"),
                       ({"eagle_config": None, "eagle_aux_hidden_state_layer_ids": [1, 2, 3]}, "ambiguous")):
        save_draft(tmp_path / "bad", dict(cfg, **bad), sd)
        with pytest.raises(UserError, match=match):
            load_eagle_head(tmp_path / "bad", model)


def _speculators_eagle3(model, **top) -> tuple[dict, dict]:
    """The speculators layout of a Qwen3 EAGLE-3 head (nested config, layers.0., q/k norm, a saved
    embedding, full vocabulary: no d2t/t2d), written from checkpoint-layouts.md section 1a."""
    cfg, sd = _official_layout(model, draft_vocab=96)
    c = model.config
    g = torch.Generator().manual_seed(3)
    sd = {k.replace("midlayer.", "layers.0."): v for k, v in sd.items() if k not in ("d2t", "t2d")}
    D = c.head_dim
    sd.update({"layers.0.self_attn.q_proj.weight": torch.randn(4 * D, 128, generator=g) * 0.05,
               "layers.0.self_attn.k_proj.weight": torch.randn(2 * D, 128, generator=g) * 0.05,
               "layers.0.self_attn.v_proj.weight": torch.randn(2 * D, 128, generator=g) * 0.05,
               "layers.0.self_attn.o_proj.weight": torch.randn(64, 4 * D, generator=g) * 0.05,
               "layers.0.self_attn.q_norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
               "layers.0.self_attn.k_norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
               "embed_tokens.weight": torch.randn(96, 64, generator=g)})
    raw = dict({"speculators_model_type": "eagle3", "architectures": ["Eagle3DraftModel"], "draft_vocab_size": 96,
                "norm_before_residual": True, "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
                "transformer_layer_config": speculators_layer(model.config)}, **top)
    return raw, sd


def test_speculators_eagle3_replica(target, tmp_path):
    path, model = target
    raw, sd = _speculators_eagle3(model)
    head = load_eagle_head(save_draft(tmp_path / "e", raw, sd), model)
    assert head.config.format == "speculators-eagle3" and head.midlayer.norm_before_residual
    assert torch.equal(head.midlayer.self_attn.q_norm.weight, sd["layers.0.self_attn.q_norm.weight"])
    assert torch.equal(head.embed_tokens.weight, sd["embed_tokens.weight"])  # its own, not the target's
    dec = EagleDecoder(model, head, tree=False, chain_length=3)
    assert dec.options()["target_layers"] == [0, 1, 2]  # inputs of layers 1..3
    _lossless(dec, model)
    for top, match in (({"norm_output": True}, "norm_output"), ({"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}, "embedding"),
                       ({"speculators_model_type": "mlp"}, "mlp")):
        save_draft(tmp_path / "bad", dict(raw, **top), sd)
        with pytest.raises(UserError, match=match):
            load_eagle_head(tmp_path / "bad", model)
    two = dict(raw, eagle_aux_hidden_state_layer_ids=[1, 3])  # fc reads as many layers as the config names
    head = load_eagle_head(save_draft(tmp_path / "two", two, dict(sd, **{"fc.weight": sd["fc.weight"][:, :128]})), model)
    assert head.fc.in_features == 128 and head.feature_layers(4) == (0, 2)
    _lossless(EagleDecoder(model, head, tree=False, chain_length=3), model, n=2)
    save_draft(tmp_path / "bad", {k: v for k, v in raw.items() if k != "norm_before_residual"}, sd)
    with pytest.raises(UserError, match="norm_before_residual"):
        load_eagle_head(tmp_path / "bad", model)


# ----------------------------------------------------------------------------- DFlash / DSpark


def _spec_drafter(model, kind: str = "dspark", **kw):
    return speculators_drafter(model.config, kind, **kw)


def test_speculators_dflash_and_dspark_replicas(target, tmp_path):
    path, model = target
    ar = ARDecoder(model)
    cases = [("dflash", dict(draft_vocab=48)), ("dflash", dict(sample_from_anchor=True, sliding=None)),
             ("dspark", dict()), ("dspark", dict(draft_vocab=32, sample_from_anchor=False))]
    for i, (kind, kw) in enumerate(cases):
        raw, drafter = _spec_drafter(model, kind, **kw)
        sd = dict(drafter.state_dict(), **{"embed_tokens.weight": torch.randn(96, 64)})  # saved copies, not read
        if kind == "dspark":
            sd["confidence_head.proj.weight"] = torch.randn(1, 64 + 8)
        d = save_draft(tmp_path / f"c{i}", raw, sd)
        got = load_dflash_drafter(d, model)
        assert all(torch.equal(got.state_dict()[k], v) for k, v in drafter.state_dict().items())
        c = got.config
        assert got.target_layer_ids == [0, 2]  # speculators ids are one above ours
        assert c.sample_from_anchor == kw.get("sample_from_anchor", kind == "dspark")
        assert c.sliding_layers == ([0] if kw.get("sliding", 3) else []) and (got.markov_head is not None) == (kind == "dspark")
        dec = DFlashDecoder(model, got)
        assert dec.options()["format"] == f"speculators-{kind}"
        runs = [dec.generate(p, GenerationConfig(max_new_tokens=12)) for p in _prompts(4, seed=i)]
        for p, g in zip(_prompts(4, seed=i), runs):
            assert g.tokens == ar.generate(p, GenerationConfig(max_new_tokens=12)).tokens
        n_fed = drafter.block_size + int(c.sample_from_anchor)
        assert all(f == n_fed for g in runs for f in g.stats.tokens_fed[1:])  # anchor-first: B drafts
    raw, drafter = _spec_drafter(model, "dspark")
    with pytest.raises(UserError, match="gated"):
        load_dflash_drafter(save_draft(tmp_path / "g", dict(raw, markov_head_type="gated"), drafter.state_dict()), model)
    raw["architectures"] = ["DFlash2DraftModel"]
    raw.pop("speculators_model_type")
    with pytest.raises(UserError, match="DFlash2"):
        load_dflash_drafter(save_draft(tmp_path / "g", raw, drafter.state_dict()), model)


def test_sliding_window_mask_is_speculators_rule(target):
    """Block rows of a sliding-window layer see the W context positions before the block and the
    block causally; the same states come from one forward and from a cached split."""
    _, model = target
    _, drafter = _spec_drafter(model, "dflash", sliding=3)
    m = drafter.window_mask(torch.arange(4, 10)[None] + 0, 4, 4, 6)  # 4 cached + 2 fed context, block at 6
    want_ctx = torch.tensor([False, False, False, True, True, True])
    assert torch.equal(m[0, 0, :, :6], want_ctx.expand(4, -1))
    assert torch.equal(m[0, 0, :, 6:], torch.ones(4, 4, dtype=torch.bool).tril())
    g = torch.Generator().manual_seed(0)
    ctx, noise = torch.randn(1, 6, 128, generator=g), torch.randn(1, 4, 64, generator=g)
    with torch.no_grad():
        one = drafter(noise, ctx, torch.arange(10))
        cache = drafter.new_cache(32)
        drafter(noise, ctx[:, :4], torch.arange(8), cache=cache)
        cache.crop(4)
        two = drafter(noise, ctx[:, 4:], torch.arange(4, 10), cache=cache)
        full = DFlashDrafter(DFlashConfig(dict(drafter.config.raw, use_sliding_window=False), "speculators-dflash"))
        full.load_state_dict(drafter.state_dict())
        wide = full(noise, ctx, torch.arange(10))
    assert torch.allclose(one, two, atol=1e-5) and not torch.allclose(one, wide, atol=1e-3)


def test_dspark_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """DSpark (Markov head, anchor-first, block 2 = 2 drafts): new tokens 2 and 3 are decided by the
    first verification; their joint distribution must be AR's for sampled and argmax drafts, and
    accepting every draft must fail."""
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8, num_hidden_layers=4)
    model = load_model(tmp_path, "float32", "cpu")
    raw, drafter = _spec_drafter(model, "dspark", block_size=2, n_layers=1, sliding=None, seed=5, markov_rank=4)
    with torch.no_grad():
        drafter.norm.weight.fill_(1.0)
    prompt, T = [1, 4, 2], 1.0
    seqs = torch.tensor(list(itertools.product(range(8), repeat=3)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = (model(ids).logits[:, len(prompt) - 1: -1] / T).log_softmax(-1)
    exact = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp().view(8, 64).sum(0)

    def run(draft_sample, n):
        dec = DFlashDecoder(model, drafter, draft_sample=draft_sample)
        counts, multi = torch.zeros(64), 0
        for s in range(n):
            g = dec.generate(prompt, GenerationConfig(max_new_tokens=3, sampling=SamplingParams(temperature=T, seed=s)))
            counts[g.tokens[1] * 8 + g.tokens[2]] += 1
            multi += g.stats.accepted_lengths[0] > 1
        return chi2_pvalue(counts, exact), multi / n

    for ds, n, rate in ((True, 300, 0.15), (False, 200, 0.05)):
        p, accept_rate = run(ds, n)
        assert accept_rate > rate, ds  # token 2 often is an accepted draft
        assert p > 1e-3, ds

    always_accept = always_accept_chain  # WRONG: no rejection (tidar_bench.testing)

    monkeypatch.setattr(dflash_mod, "verify_chain", always_accept)
    p, _ = run(True, 300)
    assert p < 1e-5
