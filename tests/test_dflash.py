"""DFlash baseline: greedy == AR (random and perfect drafters, stops inside accepted runs), both
caches exact after every step, sampling keeps the AR distribution (and a broken rule is caught),
the official drafter layout loads, the training blocks see what decoding blocks see, and the
drafter trains (objective and CLI)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import tidar_bench.baselines.dflash as dflash_mod
from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.dflash import DFlashDecoder
from tidar_bench.baselines.dflash_drafter import DFlashDrafter, load_dflash_drafter, target_context
from tidar_bench.cli import main
from tidar_bench.compiled import unavailable_reason
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.errors import UserError
from tidar_bench.model import load_model
from tidar_bench.registry import DecoderContext, build_decoder
from tidar_bench.testing import CharTok, chi2_pvalue, make_hf_model, always_accept_chain
from test_eagle import _functional_target, _prompts


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models, thousands of small ops: one thread avoids OpenMP's per-op synchronisation, which
    on a loaded 2-core machine costs more than the ops (conftest sets 2 threads again per test)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    for fam in ("llama", "qwen3"):
        d = tmp_path_factory.mktemp(f"dflash_{fam}")
        make_hf_model(fam, d, seed=2, num_hidden_layers=4)
        out[fam] = (d, load_model(d, "float32", "cpu"))
    return out


def _drafter(model, block_size: int = 4, layers=(1, 3), n_layers: int = 2, seed: int = 1) -> DFlashDrafter:
    return DFlashDrafter.from_target(model, num_layers=n_layers, block_size=block_size,
                                     mask_token_id=model.config.vocab_size - 2, target_layer_ids=list(layers),
                                     seed=seed).eval()


def _perfect(drafter: DFlashDrafter, model, f: dict[int, int]) -> DFlashDrafter:
    """Force block row i to predict f^i(anchor), the target's greedy continuation (the functional
    target's embeddings are orthogonal, so the anchor is read back from its embedding)."""
    emb = model.model.embed_tokens.weight
    real = drafter.forward

    def forward(noise_emb, *args, **kwargs):
        states = real(noise_emb, *args, **kwargs)
        t = int((noise_emb[0, 0] @ emb.T).argmax())
        boost = torch.zeros_like(states)
        for i in range(1, states.shape[1]):
            boost[0, i] = 4.0 * emb[t]
            t = f[t]
        return states + boost

    drafter.forward = forward
    return drafter


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_equals_ar_random_drafter(targets, family):
    model = targets[family][1]
    tok = CharTok()
    ar = ARDecoder(model, tok)
    for bs in (2, 5):
        dec = DFlashDecoder(model, _drafter(model, block_size=bs), tok)
        assert dec.lossless and dec.options()["block_size"] == bs
        for i, p in enumerate(_prompts(4, seed=bs)):
            cfg = GenerationConfig(max_new_tokens=9 + i % 3)
            ref, got = ar.generate(p, cfg), dec.generate(p, cfg)
            assert got.tokens == ref.tokens and got.finish_reason == "length"
            assert got.stats.nfe == 1 + len(got.stats.accepted_lengths) == 1 + got.stats.draft_forwards
            assert set(got.stats.tokens_fed[1:]) == {bs}
            if i % 2 == 0:
                for c in (GenerationConfig(max_new_tokens=12, stop_token_ids=(ref.tokens[4],)),
                          GenerationConfig(max_new_tokens=12, stop_strings=(tok.decode(ref.tokens[3:5]),))):
                    a, e = ar.generate(p, c), dec.generate(p, c)
                    assert (e.tokens, e.text, e.finish_reason) == (a.tokens, a.text, a.finish_reason)


def test_perfect_drafter_accepts_whole_blocks(tmp_path):
    model, f = _functional_target(tmp_path)
    tok = CharTok()
    ar = ARDecoder(model, tok)
    dec = DFlashDecoder(model, _perfect(_drafter(model, block_size=6, layers=(0, 2)), model, f), tok)
    for p in ([3, 17, 12], [9], [2, 2]):
        cfg = GenerationConfig(max_new_tokens=23)
        a, e = ar.generate(p, cfg), dec.generate(p, cfg)
        assert e.tokens == a.tokens
        assert max(e.stats.accepted_lengths) == 6  # 5 drafts + bonus
        assert e.stats.nfe < a.stats.nfe / 3
    ref = ar.generate([7], GenerationConfig(max_new_tokens=30)).tokens
    for cfg in (GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=30, stop_token_ids=(ref[6],)),
                GenerationConfig(max_new_tokens=30, stop_strings=(tok.decode(ref[8:10]),))):
        a, e = ar.generate([7], cfg), dec.generate([7], cfg)
        assert (e.tokens, e.text, e.finish_reason) == (a.tokens, a.text, a.finish_reason)
        assert sum(e.stats.accepted_lengths) + 1 > len(e.tokens)  # the last step accepted past the limit


def test_caches_equal_fresh_prefill_after_every_step(targets, tmp_path):
    fmodel, f = _functional_target(tmp_path)
    cases = [(targets["llama"][1], _drafter(targets["llama"][1], block_size=4)),
             (fmodel, _perfect(_drafter(fmodel, block_size=5, layers=(1, 2, 3)), fmodel, f))]
    for model, drafter in cases:
        for sp, ds in ((SamplingParams(), False), (SamplingParams(temperature=1.0, seed=1), True),
                       (SamplingParams(temperature=0.7, seed=2), False)):
            dec = DFlashDecoder(model, drafter, draft_sample=ds)
            checked = []

            def on_step(caches, history):
                cache = caches["target"]
                assert cache.length == len(history) - 1
                with torch.no_grad():
                    fresh = model.new_cache(len(history))
                    out = model(torch.tensor([history[:-1]]), cache=fresh, hidden_layers=dec.layers)
                    for got, want in zip(cache.snapshot(), fresh.snapshot()):
                        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                    # drafter cache: the context entries of the first dcache.length committed positions
                    dc = caches["draft"]
                    n = dc.length
                    assert n < len(history) - 1  # this step's accepted features are still pending
                    fresh_d = drafter.new_cache(n + 1)
                    feats = target_context(out.hidden_states, dec.layers)[:, :n]
                    dummy = model.model.embed_tokens(torch.tensor([[0]]))
                    drafter(dummy, feats, torch.arange(n + 1), cache=fresh_d)
                    fresh_d.crop(n)
                    for got, want in zip(dc.snapshot(), fresh_d.snapshot()):
                        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
                checked.append(len(history))

            dec.on_step = on_step
            for p in _prompts(2, seed=4, vocab=28):
                g = dec.generate(p, GenerationConfig(max_new_tokens=14, sampling=sp))
                assert checked[-1] == len(p) + 1 + sum(g.stats.accepted_lengths)
            assert len(checked) >= 4


def test_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """New tokens 2 and 3 (both decided by the first verification with block size 3: draft d_1
    accepted or resampled, then d_2 or the bonus) vs the exact AR distribution (8 x 8 cells), for
    drafts sampled from the drafter and for argmax drafts; always accepting must fail the test."""
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8, num_hidden_layers=4)
    model = load_model(tmp_path, "float32", "cpu")
    drafter = DFlashDrafter.from_target(model, num_layers=1, block_size=3, mask_token_id=7, seed=5).eval()
    with torch.no_grad():  # the reference's init scale: drafts differ clearly from the target's samples
        drafter.norm.weight.fill_(1.0)
    prompt, T = [1, 4, 2], 1.0
    seqs = torch.tensor(list(itertools.product(range(8), repeat=3)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = (model(ids).logits[:, len(prompt) - 1: -1] / T).log_softmax(-1)
    joint = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp()
    exact = joint.view(8, 64).sum(0)  # marginal of (token 2, token 3)
    assert torch.isclose(exact.sum(), torch.tensor(1.0), atol=1e-5)

    def run(draft_sample, n):
        dec = DFlashDecoder(model, drafter, draft_sample=draft_sample)
        counts = torch.zeros(64)
        multi = 0
        for s in range(n):
            g = dec.generate(prompt, GenerationConfig(max_new_tokens=3, sampling=SamplingParams(temperature=T, seed=s)))
            counts[g.tokens[1] * 8 + g.tokens[2]] += 1
            multi += g.stats.accepted_lengths[0] > 1
        return chi2_pvalue(counts, exact), multi / n

    for ds in (True, False):
        p, accept_rate = run(ds, 400)
        assert accept_rate > 0.15, ds  # token 2 often is an accepted draft
        assert p > 1e-3, ds

    always_accept = always_accept_chain  # WRONG: no rejection (tidar_bench.testing)

    monkeypatch.setattr(dflash_mod, "verify_chain", always_accept)
    for ds in (True, False):  # 300 samples: with fewer, every cell can fall under 5 expected counts (no test left)
        p, _ = run(ds, 300)
        assert p < 1e-6, ds


def _official_layout(n_layers: int = 2) -> tuple[dict, dict]:
    """config.json + state dict with exactly the names and layout of z-lab/Qwen3-8B-DFlash-b16
    (5 layers, hidden 4096, 32 heads / 8 kv of 128, target layers [1, 9, 17, 25, 33] of 36),
    scaled down to the tiny 4-layer llama target (H 64, 4 heads / 2 kv of 16, intermediate 128)."""
    H, I, D = 64, 128, 16
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    ids = [1, 3]
    cfg = {"architectures": ["DFlashDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
           "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 4,
           "dflash_config": {"mask_token_id": 94, "target_layer_ids": ids}, "dtype": "bfloat16", "head_dim": D,
           "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02, "intermediate_size": I,
           "layer_types": ["full_attention"] * n_layers, "max_position_embeddings": 512, "max_window_layers": n_layers,
           "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": n_layers, "num_key_value_heads": 2,
           "num_target_layers": 4, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000,
           "sliding_window": None, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
           "vocab_size": 96}
    sd = {"fc.weight": w(H, len(ids) * H), "hidden_norm.weight": 1 + w(H), "norm.weight": 1 + w(H)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(4 * D, H), p + "self_attn.k_proj.weight": w(2 * D, H),
                   p + "self_attn.v_proj.weight": w(2 * D, H), p + "self_attn.o_proj.weight": w(H, 4 * D),
                   p + "self_attn.q_norm.weight": 1 + w(D), p + "self_attn.k_norm.weight": 1 + w(D),
                   p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H),
                   p + "mlp.down_proj.weight": w(H, I), p + "input_layernorm.weight": 1 + w(H),
                   p + "post_attention_layernorm.weight": 1 + w(H)})
    return cfg, sd


def test_official_layout_loads_and_decodes(targets, tmp_path):
    from safetensors.torch import save_file

    path, model = targets["llama"]
    cfg, sd = _official_layout()
    for kind in ("bin", "safetensors"):
        d = tmp_path / kind
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        if kind == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        else:
            save_file(sd, str(d / "model.safetensors"))
        drafter = load_dflash_drafter(d, model)
        got = drafter.state_dict()
        assert set(got) == set(sd)
        for k, v in sd.items():
            assert torch.equal(got[k], v), k
        assert (drafter.block_size, drafter.mask_token_id, drafter.target_layer_ids) == (4, 94, [1, 3])
        dec = build_decoder("dflash", DecoderContext(path, "cpu", "float32", draft_path=d), {"block_size": "3"})
        assert dec.options() == {"block_size": 3, "draft_layers": 2, "target_layers": [1, 3], "draft_sample": False,
                                 "compile": False}
        c = GenerationConfig(max_new_tokens=10)
        assert dec.generate([5, 6, 7], c).tokens == ARDecoder(model).generate([5, 6, 7], c).tokens
    st = tmp_path / "safetensors"
    save_file(dict(sd, **{"fc.weight": torch.zeros(64, 64)}), str(st / "model.safetensors"))
    with pytest.raises(UserError, match="fc.weight"):
        load_dflash_drafter(st, model)
    save_file({k: v for k, v in sd.items() if k != "hidden_norm.weight"}, str(st / "model.safetensors"))
    with pytest.raises(UserError, match="lacks"):
        load_dflash_drafter(st, model)
    save_file(sd, str(st / "model.safetensors"))
    for bad, match in (({"num_target_layers": 36}, "36 layers"), ({"dflash_config": {"mask_token_id": 500,
                       "target_layer_ids": [1, 3]}}, "mask_token_id"), ({"layer_types": ["sliding_attention"] * 2},
                       "sliding"), ({"hidden_size": 32}, "hidden size|shape")):
        (st / "config.json").write_text(json.dumps(dict(cfg, **bad)))
        with pytest.raises(UserError, match=match):
            load_dflash_drafter(st, model)
    with pytest.raises(UserError, match="draft"):
        build_decoder("dflash", DecoderContext(path, "cpu", "float32"))


def test_training_blocks_see_what_decoding_blocks_see(targets):
    """The training forward (context = the whole sequence, block mask) gives each block the same
    states as the decoding forward (context = the prefix before the anchor, through the cache)."""
    from tidar_bench.training.dflash import block_mask, sample_anchors

    model = targets["qwen3"][1]
    drafter = _drafter(model, block_size=4)
    k, S = 4, 12
    x = torch.randint(0, 90, (2, S), generator=torch.Generator().manual_seed(0))
    anchors = sample_anchors(2, S, k, 3, torch.Generator().manual_seed(1))
    assert anchors.min() >= 1 and anchors.max() <= S - k
    m = block_mask(anchors, S, k)
    assert m.shape == (2, 1, 3 * k, S + 3 * k)
    with torch.no_grad():
        out = model(x, hidden_layers=drafter.target_layer_ids)
        feats = target_context(out.hidden_states, drafter.target_layer_ids)
        noise = torch.full((2, 3, k), drafter.mask_token_id)
        noise[:, :, 0] = x.gather(1, anchors)
        pos = (anchors[:, :, None] + torch.arange(k)).view(2, -1)
        train_states = drafter(model.model.embed_tokens(noise.view(2, -1)), feats,
                               torch.cat([torch.arange(S).expand(2, -1), pos], 1), mask=m).view(2, 3, k, -1)
        for b, n in itertools.product(range(2), range(3)):
            a = int(anchors[b, n])
            cache = drafter.new_cache(a + k)
            cut = a // 2  # context fed in two parts: cached, then pending with the block
            drafter(model.model.embed_tokens(noise[b:b + 1, n, :1]), feats[b:b + 1, :cut], torch.arange(cut + 1),
                    cache=cache)
            cache.crop(cut)
            got = drafter(model.model.embed_tokens(noise[b:b + 1, n]), feats[b:b + 1, cut:a], torch.arange(cut, a + k),
                          cache=cache)
            torch.testing.assert_close(got[0], train_states[b, n], atol=1e-4, rtol=1e-4)


def _self_generated(model, n: int = 8, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        ids = torch.randint(0, 90, (1, 4), generator=gen)
        with torch.no_grad():
            for _ in range(length - 4):
                nxt = torch.multinomial((model(ids).logits[0, -1] / 0.5).softmax(-1), 1, generator=gen)
                ids = torch.cat([ids, nxt[None]], 1)
        seqs.append(ids[0])
    return seqs


def test_drafter_training_improves_and_reloads(targets, tmp_path):
    from tidar_bench.training.dflash import DFlashObjective
    from tidar_bench.training.loop import TrainConfig, train

    path, model = targets["llama"]
    seqs = _self_generated(model)
    gen = torch.Generator().manual_seed(1)

    class Data:
        seq_len = 32

        def __len__(self):
            return len(seqs)

        def batches(self, batch_size, rank=0, world=1, start=0):
            while True:
                yield torch.stack(seqs)[torch.randperm(8, generator=gen)[:batch_size]]

    drafter = DFlashDrafter.from_target(model, num_layers=2, block_size=4, mask_token_id=94, target_layer_ids=[1, 3],
                                        init="target")
    drafter.requires_grad_(True)
    loss, metrics = DFlashObjective(model, drafter, num_anchors=8, labels="data").loss(drafter, torch.stack(seqs[:2]))
    assert loss.isfinite() and set(metrics) == {"ce", "acc", "tau"}  # no kl: data labels have no entropy
    obj = DFlashObjective(model, drafter, num_anchors=8)
    assert obj.gamma == 2.0 and obj.labels == "target"
    hist = train(obj, Data(), tmp_path / "d", TrainConfig(batch_size=4, steps=20, lr=3e-3, warmup_steps=2,
                                                          log_every=1, progress=False))
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    kl_first, kl_last = hist[0]["kl"], sum(h["kl"] for h in hist[-3:]) / 3
    assert last < first and kl_last < 0.5 * kl_first, (first, last, kl_first, kl_last)
    assert sum(h["tau"] for h in hist[-3:]) / 3 > hist[0]["tau"]
    loaded = load_dflash_drafter(tmp_path / "d", model)
    for k, v in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    dec = DFlashDecoder(model, loaded)
    p, c = seqs[0][:6].tolist(), GenerationConfig(max_new_tokens=12)
    assert dec.generate(p, c).tokens == ARDecoder(model).generate(p, c).tokens


def test_train_dflash_cli(tmp_path):
    from tidar_bench.corpus import make_splits, train_tokenizer, write_jsonl
    from tidar_bench.model import ModelConfig, Transformer, init_weights, save_model

    items, _ = make_splits(120, 2, seed=0)
    write_jsonl(items, tmp_path / "train.jsonl")
    for name, with_mask in (("t", True), ("nomask", False)):
        tok = train_tokenizer([it["text"] for it in items], 200, tmp_path / name, with_mask=with_mask)
        cfg = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 48, "intermediate_size": 96,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512}
        save_model(init_weights(Transformer(ModelConfig.from_dict(cfg)), std=0.05), tmp_path / name)
    out = tmp_path / "drafter"
    argv = ["train", "dflash", "--target", str(tmp_path / "t"), "--data", str(tmp_path / "train.jsonl"),
            "--out", str(out), "--block-size", "4", "--num-layers", "2", "--target-layers", "1,2", "--steps", "3",
            "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and (out / "train_log.jsonl").is_file()
    raw = json.loads((out / "config.json").read_text())
    assert raw["dflash_config"]["target_layer_ids"] == [1, 2] and raw["block_size"] == 4
    dec = build_decoder("dflash", DecoderContext(tmp_path / "t", "cpu", "float32", draft_path=out), {})
    c = GenerationConfig(max_new_tokens=8)
    assert dec.generate([5, 6, 7], c).tokens == ARDecoder(dec.model).generate([5, 6, 7], c).tokens
    common = ["--data", str(tmp_path / "train.jsonl"), "--steps", "1", "--seq-len", "32", "--batch-size", "4",
              "--device", "cpu"]
    assert main(["train", "dflash", "--target", str(tmp_path / "t"), "--out", str(tmp_path / "o1"),
                 "--labels", "nope", *common]) == 2
    assert main(["train", "dflash", "--target", str(tmp_path / "t"), "--out", str(tmp_path / "o2"),
                 "--target-layers", "1,x", *common]) == 2
    assert main(["train", "dflash", "--target", str(tmp_path / "nomask"), "--out", str(tmp_path / "o3"), *common]) == 2


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="torch.compile unavailable")
def test_compiled_dflash_is_lossless(targets):
    """Compiled mode (two fixed step shapes: the padded drafter step and the verification) gives
    the eager decoder's tokens and accepted lengths, which are AR's tokens."""
    model = targets["llama"][1]
    drafter = _drafter(model, block_size=4)
    cfg = GenerationConfig(max_new_tokens=16)
    ar = ARDecoder(model)
    eager, comp = DFlashDecoder(model, drafter, compile="off"), DFlashDecoder(model, drafter, compile="on")
    assert comp.options()["compile"] is True
    for p in _prompts(2, seed=9):
        ge, gc = eager.generate(p, cfg), comp.generate(p, cfg)
        assert ge.tokens == gc.tokens == ar.generate(p, cfg).tokens
        assert gc.stats.accepted_lengths == ge.stats.accepted_lengths
    # the padded drafter step == the eager one for every pending-context length 1..block_size
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 12, 2 * model.config.hidden_size, generator=g)
    emb = model.model.embed_tokens(torch.tensor([[5] + [drafter.mask_token_id] * 3]))
    with torch.inference_mode():
        for c in (1, 3, 4):
            caches = []
            for dec in (eager, comp):
                dc = drafter.new_cache(32)
                drafter(emb[:, :1], feats[:, :6], torch.arange(7), cache=dc)
                dc.crop(6)
                caches.append((dec._draft(dc, emb, feats[:, 6:6 + c], [6 + c], [6]), dc))
            (se, ce), (sc, cc) = caches
            torch.testing.assert_close(sc, se, atol=1e-5, rtol=1e-5)
            assert ce.length == cc.length == 6 + c
            for a, b in zip(ce.snapshot(), cc.snapshot()):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- B rows (tidar_bench.engine)


def _batched(dec, prompts, cfg, batch=4):
    from tidar_bench.batched import generate_batch

    return generate_batch(dec, prompts, cfg, batch)


@pytest.mark.parametrize("block_size", [None, 3])
def test_batched_rows_equal_batch1_ar_and_batch1_dflash(block_size):
    """B = 4 (6 prompts of different lengths, refill, rows stopping at eos / the limit at different
    steps), the embedded trained drafter: every row's tokens are batch-1 AR's, and its forwards and
    acceptances are its own batch-1 run's (the rows never see each other)."""
    from test_batched import EMBEDDED, prompts_of

    ctx = DecoderContext(EMBEDDED / "base", "cpu", "float32", EMBEDDED / "dflash")
    ar = build_decoder("ar", ctx, {"compile": "off"})
    dec = build_decoder("dflash", ctx, {"compile": "off"} if block_size is None else
                        {"compile": "off", "block_size": str(block_size)})
    tok = ctx.tokenizer
    prompts = prompts_of(tok)
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=(tok.eos_token_id,))
    one = [dec.generate(p, cfg) for p in prompts]
    got = _batched(dec, prompts, cfg)
    assert [g.tokens for g in got] == [ar.generate(p, cfg).tokens for p in prompts] == [g.tokens for g in one]
    for g, w in zip(got, one):
        assert (g.stats.nfe, g.stats.draft_forwards, g.stats.accepted_lengths, g.stats.tokens_fed) == \
               (w.stats.nfe, w.stats.draft_forwards, w.stats.accepted_lengths, w.stats.tokens_fed)
    assert len({len(g.stats.accepted_lengths) for g in got}) > 1  # rows finished at different steps
    assert sum(g.stats.nfe for g in got) < sum(len(g.tokens) for g in got)  # the drafter pays off per row


@pytest.mark.parametrize("kind,kw", [("dflash", dict(draft_vocab=48)),
                                     ("dflash", dict(sample_from_anchor=True, sliding=None)),
                                     ("dspark", dict()), ("dspark", dict(draft_vocab=32, sample_from_anchor=False,
                                                                         sliding_window_non_causal=True))])
def test_batched_formats_equal_ar_and_sample_per_row(targets, kind, kw):
    """speculators DFlash / DSpark drafters (reduced draft vocabulary + d2t, sliding-window layers in
    the static per-row form, anchor-first, the Markov head) at B = 4: greedy rows are AR's; sampled
    rows (drafts sampled or argmax) are each exactly their own batch-1 run with the same seed."""
    from tidar_bench.testing import speculators_drafter

    model = targets["llama"][1]
    _, drafter = speculators_drafter(model.config, kind, **kw)
    prompts = _prompts(6, seed=7)
    cfg = GenerationConfig(max_new_tokens=10)
    ar = ARDecoder(model)
    assert [g.tokens for g in _batched(DFlashDecoder(model, drafter), prompts, cfg)] == \
           [ar.generate(p, cfg).tokens for p in prompts]
    for ds in (True, False):
        dec = DFlashDecoder(model, drafter, draft_sample=ds)
        cfg = GenerationConfig(max_new_tokens=10, sampling=SamplingParams(temperature=0.8, top_k=40, seed=11))
        got, want = _batched(dec, prompts, cfg), [dec.generate(p, cfg) for p in prompts]
        assert [g.tokens for g in got] == [w.tokens for w in want]
        assert [g.stats.accepted_lengths for g in got] == [w.stats.accepted_lengths for w in want]


def test_batched_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """B = 4, four different prompts decoded together, one call per seed: each row's new tokens 2
    and 3 (decided by its first verification) follow that prompt's exact AR distribution (chi-square
    over the 4 x 64 joint cells and over the 4 x 8 cells of token 2 alone), for sampled and argmax
    drafts; accepting every draft fails (token 2's cells)."""
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8, num_hidden_layers=4)
    model = load_model(tmp_path, "float32", "cpu")
    drafter = DFlashDrafter.from_target(model, num_layers=1, block_size=3, mask_token_id=7, seed=5).eval()
    with torch.no_grad():
        drafter.norm.weight.fill_(1.0)
    prompts, T = [[1, 4, 2], [3], [5, 0, 6, 1, 1], [2, 2]], 1.0
    seqs = torch.tensor(list(itertools.product(range(8), repeat=3)))
    exact = []
    for p in prompts:
        ids = torch.cat([torch.tensor(p).expand(len(seqs), -1), seqs], 1)
        with torch.no_grad():
            logp = (model(ids).logits[:, len(p) - 1: -1] / T).log_softmax(-1)
        exact.append(logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp().view(8, 8, 8).sum(0))
    exact = torch.stack(exact) / len(prompts)  # [prompt, token 2, token 3]

    def run(draft_sample, n):
        dec = DFlashDecoder(model, drafter, draft_sample=draft_sample)
        counts = torch.zeros(len(prompts), 8, 8)
        multi = 0
        for s in range(n):
            cfg = GenerationConfig(max_new_tokens=3, sampling=SamplingParams(temperature=T, seed=s))
            for i, g in enumerate(_batched(dec, prompts, cfg)):
                counts[i, g.tokens[1], g.tokens[2]] += 1
                multi += g.stats.accepted_lengths[0] > 1
        return (chi2_pvalue(counts.flatten(), exact.flatten()),
                chi2_pvalue(counts.sum(2).flatten(), exact.sum(2).flatten()), multi / (n * len(prompts)))

    for ds in (True, False):
        p_joint, p_first, accept_rate = run(ds, 100)
        assert accept_rate > 0.08, ds  # drafts are often accepted (token 2 is then a draft)
        assert p_joint > 1e-3 and p_first > 1e-3, ds

    always_accept = always_accept_chain  # WRONG: no rejection (tidar_bench.testing)

    monkeypatch.setattr(dflash_mod, "verify_chain", always_accept)
    for ds in (True, False):  # token 2 is then always the first draft: its marginal shows it at once
        _, p_first, _ = run(ds, 60)
        assert p_first < 1e-6, ds


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="torch.compile unavailable")
def test_compiled_batched_rows_equal_ar(targets):
    """Compiled steps at B = 4 (one graph per step shape and batch size; empty slots and padded
    context rows inert): every row is batch-1 AR's, and its acceptances are the eager decoder's."""
    model = targets["llama"][1]
    drafter = _drafter(model, block_size=4)
    prompts = _prompts(6, seed=12)
    cfg = GenerationConfig(max_new_tokens=14)
    ar = ARDecoder(model)
    eager, comp = DFlashDecoder(model, drafter, compile="off"), DFlashDecoder(model, drafter, compile="on")
    ge, gc = _batched(eager, prompts, cfg), _batched(comp, prompts, cfg)
    assert [g.tokens for g in gc] == [g.tokens for g in ge] == [ar.generate(p, cfg).tokens for p in prompts]
    assert [g.stats.accepted_lengths for g in gc] == [g.stats.accepted_lengths for g in ge]
    assert comp.target_steps.compile_s > 0 and all(g.stats.compile_s >= 0 for g in gc)
