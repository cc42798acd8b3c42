"""EAGLE baseline: greedy == AR (chain and tree, random and perfect heads, stops inside accepted
runs), caches == fresh prefills after every step, sampling keeps the AR distribution (and a broken
rule is caught), the official EAGLE-3 checkpoint layout loads, and the head trains."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import tidar_bench.baselines.eagle as eagle_mod
from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.eagle import EagleDecoder
from tidar_bench.baselines.eagle_head import EagleHead, load_eagle_head, target_features
from tidar_bench.cli import main
from tidar_bench.decoding import GenerationConfig, SamplingParams, sample
from tidar_bench.errors import UserError
from tidar_bench.model import load_model
from tidar_bench.registry import DecoderContext, build_decoder
from tidar_bench.testing import CharTok, chi2_pvalue, eagle3_layout, make_hf_model, always_accept_chain


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    for fam in ("llama", "qwen3"):
        d = tmp_path_factory.mktemp(f"eagle_{fam}")
        make_hf_model(fam, d, seed=2, num_hidden_layers=4)
        out[fam] = (d, load_model(d, "float32", "cpu"))
    return out


def _prompts(n: int, seed: int = 0, vocab: int = 95) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _head(model, form: str) -> EagleHead:
    if form == "eagle3":  # a reduced draft vocabulary (every other id): exercises d2t
        head = EagleHead.from_target(model, "eagle3", draft_vocab_size=48, seed=1)
        head.set_draft_vocab(torch.arange(0, 96, 2))
        return head.eval()
    return EagleHead.from_target(model, "eagle1", seed=1).eval()


@pytest.mark.parametrize("family,form", [("llama", "eagle3"), ("qwen3", "eagle1")])
def test_greedy_equals_ar_random_head(targets, family, form):
    model = targets[family][1]
    tok = CharTok()
    ar = ARDecoder(model, tok)
    head = _head(model, form)
    assert torch.equal(head.to_target(torch.tensor([0, 1, 5])), torch.tensor([0, 2, 10])) or form == "eagle1"
    for opts in (dict(depth=3, top_k=3, total_tokens=8), dict(tree=False, chain_length=3)):
        dec = EagleDecoder(model, head, tok, **opts)
        assert dec.lossless and dec.options()["tree"] == opts.get("tree", True)
        for i, p in enumerate(_prompts(8, seed=len(opts))):
            cfg = GenerationConfig(max_new_tokens=9 + i % 3)
            ref, got = ar.generate(p, cfg), dec.generate(p, cfg)
            assert got.tokens == ref.tokens and got.finish_reason == "length"
            assert got.stats.nfe == 1 + len(got.stats.accepted_lengths)
            assert got.stats.draft_forwards == dec.depth * (got.stats.nfe - 1)
            assert max(got.stats.tokens_fed[1:]) <= dec.total_tokens
            if i % 2 == 0:  # a stop id / stop string first occurring inside the reference output
                for c in (GenerationConfig(max_new_tokens=12, stop_token_ids=(ref.tokens[4],)),
                          GenerationConfig(max_new_tokens=12, stop_strings=(tok.decode(ref.tokens[3:5]),))):
                    a, e = ar.generate(p, c), dec.generate(p, c)
                    assert (e.tokens, e.text, e.finish_reason) == (a.tokens, a.text, a.finish_reason)


def _functional_target(path, family: str = "llama"):
    """Next token depends only on the current token: t -> f(t) = (3t + 1) % 29 (attention and MLP
    outputs zeroed, orthogonal embeddings, lm_head maps t to f(t))."""
    vocab = 32
    make_hf_model(family, path, vocab_size=vocab, tie_word_embeddings=False, num_hidden_layers=4)
    m = load_model(path, "float32", "cpu")
    f = {t: (3 * t + 1) % 29 for t in range(vocab)}
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        m.model.embed_tokens.weight.copy_(q[:vocab] * 8)
        m.lm_head.weight.zero_()
        for t, v in f.items():
            m.lm_head.weight[v] += q[t]
    return m, f


def _perfect(head: EagleHead, f: dict[int, int]) -> EagleHead:
    """Force the head's prediction at pair (feature, token t) to f(t), the target's greedy next token."""
    table = torch.tensor([f[t] for t in range(len(f))])
    real = head.forward

    def forward(ids, *args, **kwargs):
        hidden, logits = real(ids, *args, **kwargs)
        return hidden, logits + 30.0 * F.one_hot(table[ids], logits.shape[-1])

    head.forward = forward
    return head


def test_perfect_head_accepts_long_runs(tmp_path):
    model, f = _functional_target(tmp_path)
    tok = CharTok()
    ar = ARDecoder(model, tok)
    head = _perfect(EagleHead.from_target(model, "eagle3").eval(), f)
    for opts in (dict(depth=5, top_k=3, total_tokens=12), dict(tree=False, chain_length=4)):
        dec = EagleDecoder(model, head, tok, **opts)
        for p in ([3, 17, 12], [9], [2, 2]):
            cfg = GenerationConfig(max_new_tokens=23)
            a, e = ar.generate(p, cfg), dec.generate(p, cfg)
            assert e.tokens == a.tokens
            assert max(e.stats.accepted_lengths) == dec.depth + 1  # the whole draft path + bonus
            assert e.stats.mean_accepted_length > 2
            assert e.stats.nfe < a.stats.nfe / 2
        # limits falling inside an accepted run: the run is cut exactly where AR stops
        ref = ar.generate([7], GenerationConfig(max_new_tokens=30)).tokens
        for cfg in (GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=30, stop_token_ids=(ref[6],)),
                    GenerationConfig(max_new_tokens=30, stop_strings=(tok.decode(ref[8:10]),))):
            a, e = ar.generate([7], cfg), dec.generate([7], cfg)
            assert (e.tokens, e.text, e.finish_reason) == (a.tokens, a.text, a.finish_reason)
            assert sum(e.stats.accepted_lengths) + 1 > len(e.tokens)  # the last step accepted past the limit


@pytest.mark.parametrize("form", ["eagle3", "eagle1"])
def test_caches_equal_fresh_prefill_after_every_step(targets, form, tmp_path):
    cases = [(targets["llama"][1], _head(targets["llama"][1], form), None)]
    fmodel, f = _functional_target(tmp_path)
    cases.append((fmodel, _perfect(EagleHead.from_target(fmodel, form).eval(), f), None))
    for model, head, _ in cases:
        for opts, sp in ((dict(depth=4, top_k=2, total_tokens=7), SamplingParams()),
                         (dict(tree=False, chain_length=3), SamplingParams(temperature=1.0, seed=1)),
                         (dict(depth=3, top_k=3, total_tokens=9), SamplingParams(temperature=0.7, seed=2))):
            dec = EagleDecoder(model, head, **opts)
            checked = []

            def on_step(caches, history):
                cache = caches["target"]
                assert cache.length == len(history) - 1
                with torch.no_grad():
                    fresh = model.new_cache(len(history))
                    out = model(torch.tensor([history[:-1]]), cache=fresh, hidden_layers=dec.layers)
                    for got, want in zip(cache.snapshot(), fresh.snapshot()):
                        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                    # head cache: the committed pairs (feature i, token i+1) before this step's path
                    hc = caches["head"]
                    n = hc.length
                    fresh_h = head.new_cache(n)
                    feats = target_features(model, out.hidden_states, head.form)[:, :n]
                    head(torch.tensor([history[1:n + 1]]), target_feats=feats, cache=fresh_h)
                    for got, want in zip(hc.snapshot(), fresh_h.snapshot()):
                        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
                checked.append(len(history))

            dec.on_step = on_step
            for p in _prompts(2, seed=4, vocab=30):
                g = dec.generate(p, GenerationConfig(max_new_tokens=14, sampling=sp))
                assert checked[-1] == len(p) + 1 + sum(g.stats.accepted_lengths)
            assert len(checked) >= 4


def _exact_two_tokens(model, prompt: list[int], T: float) -> torch.Tensor:
    """The AR distribution of the first 2 new tokens of a vocab-8 model: [64] (cell a * 8 + b)."""
    seqs = torch.tensor(list(itertools.product(range(8), repeat=2)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = (model(ids).logits[:, len(prompt) - 1: -1] / T).log_softmax(-1)
    exact = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp()
    assert torch.isclose(exact.sum(), torch.tensor(1.0), atol=1e-5)
    return exact


def test_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """Samples of the first 2 new tokens vs the exact AR distribution (8 x 8 cells), tree and
    chain; an always-accept rule must be rejected by the same test."""
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8, num_hidden_layers=4)
    model = load_model(tmp_path, "float32", "cpu")
    head = EagleHead.from_target(model, "eagle3", seed=5).eval()
    prompt, T = [1, 4, 2], 1.0
    exact = _exact_two_tokens(model, prompt, T)

    def run(opts, n):
        dec = EagleDecoder(model, head, **opts)
        counts = torch.zeros(64)
        multi = 0
        for s in range(n):
            g = dec.generate(prompt, GenerationConfig(max_new_tokens=2, sampling=SamplingParams(temperature=T, seed=s)))
            counts[g.tokens[0] * 8 + g.tokens[1]] += 1
            multi += g.stats.accepted_lengths[0] > 1
        return chi2_pvalue(counts, exact), multi / n

    tree, chain = dict(depth=2, top_k=3, total_tokens=8), dict(tree=False, chain_length=2)
    for opts in (tree, chain):
        p, accept_rate = run(opts, 800)
        assert accept_rate > 0.2  # the second token often comes from an accepted draft
        assert p > 1e-3, opts

    def first_child(fed_tokens, children, probs, generator):  # wrong: accept the best path blindly
        path = [0]
        while children[path[-1]]:
            path.append(children[path[-1]][0])
        return path, int(sample(probs[path[-1]], generator))

    always_accept = always_accept_chain  # WRONG: no rejection (tidar_bench.testing)

    monkeypatch.setattr(eagle_mod, "tree_sample_walk", first_child)
    monkeypatch.setattr(eagle_mod, "verify_chain", always_accept)
    for opts in (tree, chain):
        p, _ = run(opts, 300)
        assert p < 1e-6, opts


def test_batched_sampling_rows_equal_their_batch1_runs(targets):
    """B = 4 (6 prompts of different lengths: refill): tree sampling walk and sampled
    chains per row, each row with its own generator seeded as alone == its own batch-1 sampled run."""
    model = targets["llama"][1]
    head = _head(model, "eagle3")
    prompts = _prompts(6, seed=7)
    for opts in (dict(depth=3, top_k=3, total_tokens=8), dict(tree=False, chain_length=3)):
        dec = EagleDecoder(model, head, **opts)
        cfg = GenerationConfig(max_new_tokens=14, sampling=SamplingParams(temperature=0.8, seed=3))
        want = [dec.generate(p, cfg) for p in prompts]
        got = dec.generate_batch(prompts, cfg, 4)
        assert [g.tokens for g in got] == [w.tokens for w in want]
        assert [g.stats.accepted_lengths for g in got] == [w.stats.accepted_lengths for w in want]


def test_batched_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """At B = 4, every row's first 2 new tokens follow the exact AR distribution of its own prompt
    (4 prompts of different lengths in one batch; one chi-square over the 4 x 64 cells), tree and
    chain; the wrong first-child rule is rejected by the same test."""
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8, num_hidden_layers=4)
    model = load_model(tmp_path, "float32", "cpu")
    head = EagleHead.from_target(model, "eagle3", seed=5).eval()
    prompts, T = [[1, 4, 2], [3], [5, 0, 7, 1, 6], [2, 2]], 1.0
    exact = torch.cat([_exact_two_tokens(model, p, T) for p in prompts]) / len(prompts)

    def run(opts, n):
        dec = EagleDecoder(model, head, **opts)
        counts = torch.zeros(len(prompts), 64)
        for s in range(n):
            cfg = GenerationConfig(max_new_tokens=2, sampling=SamplingParams(temperature=T, seed=s))
            for r, g in enumerate(dec.generate_batch(prompts, cfg, 4)):
                counts[r, g.tokens[0] * 8 + g.tokens[1]] += 1
        return chi2_pvalue(counts.flatten(), exact)

    tree, chain = dict(depth=2, top_k=3, total_tokens=8), dict(tree=False, chain_length=2)
    for opts in (tree, chain):
        assert run(opts, 250) > 1e-3, opts

    def first_child(fed_tokens, children, probs, generator):  # wrong: accept the best path blindly
        path = [0]
        while children[path[-1]]:
            path.append(children[path[-1]][0])
        return path, int(sample(probs[path[-1]], generator))

    monkeypatch.setattr(eagle_mod, "tree_sample_walk", first_child)
    assert run(tree, 120) < 1e-6


def _official_layout(target, draft_vocab: int = 32) -> tuple[dict, dict]:
    """yuhuili/EAGLE3-LLaMA3.1-Instruct-8B's names, scaled down to the tiny target (H 64, vocab 96)."""
    return eagle3_layout(target.config, draft_vocab)


def test_official_eagle3_layout_loads_and_decodes(targets, tmp_path):
    import json

    from safetensors.torch import save_file

    path, model = targets["llama"]
    cfg, sd = _official_layout(model)
    for kind in ("bin", "safetensors"):
        d = tmp_path / kind
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        if kind == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        else:
            save_file(sd, str(d / "model.safetensors"))
        head = load_eagle_head(d, model)
        got = head.state_dict()
        for k, v in sd.items():
            assert torch.equal(got[k], v), k
        assert torch.equal(head.embed_tokens.weight, model.model.embed_tokens.weight)
        assert head.form == "eagle3" and head.lm_head.out_features == 32
        assert torch.equal(head.to_target(torch.arange(32)), torch.arange(0, 96, 3))
        # through the registry: the draft dir is ctx.draft_path; greedy stays lossless
        dec = build_decoder("eagle", DecoderContext(path, "cpu", "float32", draft_path=d),
                            {"depth": "3", "top_k": "2", "total_tokens": "6"})
        assert dec.options() == {"form": "eagle3", "format": "safeailab-eagle3", "target_layers": [1, 1, 0],
                                 "draft_vocab_size": 32, "tree": True, "depth": 3, "top_k": 2,
                                 "total_tokens": 6, "compile": False}  # tests: compile=auto means off
        cfg_g = GenerationConfig(max_new_tokens=10)
        assert dec.generate([5, 6, 7], cfg_g).tokens == ARDecoder(model).generate([5, 6, 7], cfg_g).tokens
    # a tensor of the wrong shape, a missing tensor, and a missing draft dir are user errors
    bad = dict(sd, **{"fc.weight": torch.zeros(64, 64)})
    save_file(bad, str(tmp_path / "safetensors" / "model.safetensors"))
    with pytest.raises(UserError, match="fc.weight"):
        load_eagle_head(tmp_path / "safetensors", model)
    save_file({k: v for k, v in sd.items() if k != "norm.weight"}, str(tmp_path / "safetensors" / "model.safetensors"))
    with pytest.raises(UserError, match="lacks"):
        load_eagle_head(tmp_path / "safetensors", model)
    with pytest.raises(UserError, match="draft"):
        build_decoder("eagle", DecoderContext(path, "cpu", "float32"))


def test_ttt_mask_matches_tree_drafting():
    from tidar_bench.training.eagle_head import ttt_mask

    m = ttt_mask(4, 3)
    row = lambda a, i: m[a * 4 + i].view(3, 4)  # noqa: E731 - [step, pair]
    # step 2 at pair 3: real pairs 0..1, its step-1 parent at pair 2, itself
    assert row(2, 3).tolist() == [[True, True, False, False], [False, False, True, False], [False, False, False, True]]
    assert row(0, 2).tolist() == [[True, True, True, False], [False] * 4, [False] * 4]
    assert m.diagonal().all()


@pytest.mark.parametrize("form", ["eagle3", "eagle1"])
def test_head_training_loss_decreases(targets, tmp_path, form):
    """30 steps on sequences the target itself generates: the head learns to predict them; the
    saved head loads and decodes losslessly."""
    from tidar_bench.training.eagle_head import EagleHeadObjective
    from tidar_bench.training.loop import TrainConfig, train

    path, model = targets["llama"]
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(8):  # a tiny corpus: sampled continuations of random prompts
        ids = torch.randint(0, 95, (1, 4), generator=gen)
        with torch.no_grad():
            for _ in range(28):
                nxt = torch.multinomial((model(ids).logits[0, -1] / 0.5).softmax(-1), 1, generator=gen)
                ids = torch.cat([ids, nxt[None]], 1)
        seqs.append(ids[0])

    class Data:  # the training loop's dataset interface (training/data.py)
        seq_len = 32

        def __len__(self):
            return 8

        def batches(self, batch_size, rank=0, world=1, start=0):
            while True:
                yield torch.stack(seqs)[torch.randperm(8, generator=gen)[:batch_size]]

    head = EagleHead.from_target(model, form, draft_vocab_size=64 if form == "eagle3" else None)
    obj = EagleHeadObjective(model, head, ttt_steps=2)
    hist = train(obj, Data(), tmp_path / "head", TrainConfig(batch_size=4, steps=30, lr=3e-3, warmup_steps=3,
                                                             log_every=1, progress=False))
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    kl_first, kl_last = hist[0]["kl0"], sum(h["kl0"] for h in hist[-3:]) / 3
    assert last < first and kl_last < 0.5 * kl_first, (first, last, kl_first, kl_last)
    assert "ce1" in hist[-1] and (("reg0" in hist[-1]) == (form == "eagle1"))
    loaded = load_eagle_head(tmp_path / "head", model)
    assert loaded.form == form
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    dec = EagleDecoder(model, loaded, depth=3, top_k=2, total_tokens=6)
    p = seqs[0][:6].tolist()
    c = GenerationConfig(max_new_tokens=10)
    assert dec.generate(p, c).tokens == ARDecoder(model).generate(p, c).tokens


def test_train_eagle_cli(tmp_path):
    from tidar_bench.corpus import make_splits, train_tokenizer, write_jsonl
    from tidar_bench.model import ModelConfig, Transformer, init_weights, save_model

    items, _ = make_splits(120, 2, seed=0)
    write_jsonl(items, tmp_path / "train.jsonl")
    tok = train_tokenizer([it["text"] for it in items], 200, tmp_path / "t", with_mask=False)
    cfg = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 48, "intermediate_size": 96,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    save_model(init_weights(Transformer(ModelConfig.from_dict(cfg)), std=0.05), tmp_path / "t")
    out = tmp_path / "head"
    argv = ["train", "eagle", "--target", str(tmp_path / "t"), "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
            "--draft-vocab-size", "64", "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and (out / "train_log.jsonl").is_file()
    dec = build_decoder("eagle", DecoderContext(tmp_path / "t", "cpu", "float32", draft_path=out), {"tree": "false"})
    assert dec.options()["draft_vocab_size"] == 64 and dec.options()["chain_length"] == 5
    c = GenerationConfig(max_new_tokens=8)
    model = dec.model
    assert dec.generate([5, 6, 7], c).tokens == ARDecoder(model).generate([5, 6, 7], c).tokens
    assert main(argv[:-2] + ["--device", "cpu", "--form", "nope"]) == 2  # out is not empty / bad form: one-line error
    assert main(["train", "eagle", "--target", str(tmp_path / "t"), "--data", str(tmp_path / "train.jsonl"),
                 "--out", str(tmp_path / "h2"), "--form", "eagle1", "--draft-vocab-size", "8"]) == 2
