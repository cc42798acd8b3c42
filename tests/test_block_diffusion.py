"""Block diffusion: masks against hand-written matrices, the decoder against a plain full-recompute
reference (both prediction conventions), committed KV == fresh block-causal prefill, stopping inside
a block, option errors, Fast-dLLM v2 and SDAR config reading, SDAR's decode rules by hand, and the
training objective. (SDAR against its authors' own code: scripts/reference/sdar_check.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from tidar_bench.baselines.block_diffusion import BlockDiffusionDecoder
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.errors import UserError
from tidar_bench.masks import block_causal, block_diffusion_step, block_diffusion_training
from tidar_bench.model import load_model
from tidar_bench.registry import DecoderContext, build_decoder
from tidar_bench.testing import CharTok, make_hf_model, make_sdar_replica
from tidar_bench.training.block_diffusion import BDConfig, BlockDiffusionObjective

V = 96
MASK = V - 2


def _t(rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bd_qwen2")
    make_hf_model("qwen2", d, seed=3)
    BDConfig(mask_token_id=MASK, block_size=4).save(d)
    return d, load_model(d, "float32", "cpu")


# ----------------------------------------------------------------------------- masks


def test_training_mask_by_hand():
    # [x_t (4) | x_0 (4)], B = 2: noised block 1 sees clean block 0, clean is block-causal
    expected = _t([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(block_diffusion_training(4, 2), expected)
    # S not a multiple of B: last block is short
    e3 = block_diffusion_training(3, 2)
    assert torch.equal(e3[2], _t([0, 0, 1, 1, 1, 0]))
    assert torch.equal(e3[5], _t([0, 0, 0, 1, 1, 1]))


def test_step_masks_by_hand():
    # current block of 2 after 4 cached tokens: everything visible
    assert torch.equal(block_diffusion_step(4, 2, 2), torch.ones(2, 6, dtype=torch.bool))
    # commit block [2,4) together with the next block [4,6): the committed block must not see it
    expected = _t([
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(block_diffusion_step(2, 4, 2), expected)
    # unaligned start: positions 1..3, blocks 0,1,1
    assert torch.equal(block_causal(3, 2, cached=1), _t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))
    # decoding rows == the training mask's noised rows once the clean prefix is the cache
    S, B = 8, 4
    train = block_diffusion_training(S, B)
    noised_block1 = torch.cat([train[B:2 * B, S:S + B], train[B:2 * B, B:2 * B]], dim=1)
    assert torch.equal(block_diffusion_step(B, B, B), noised_block1)


# ----------------------------------------------------------------------------- reference decoder


def _plain_block_causal(n, B):
    return torch.tensor([[j // B <= i // B for j in range(n)] for i in range(n)])


def reference(model, prompt, B, max_new, shift=False, mask=MASK):
    """Full recompute every step, one token per step (the most confident masked position; the
    mask token is never an output)."""

    def logits(seq):
        out = model(torch.tensor([seq]), mask=_plain_block_causal(len(seq), B)).logits[0]
        out[:, mask] = float("-inf")
        return out

    seq, L = list(prompt), len(prompt)
    while len(seq) - L < max_new:
        start = len(seq) // B * B
        if shift and len(seq) == start:  # AR step: next block's head from the last output
            seq.append(int(logits(seq)[-1].argmax()))
            continue
        canvas = seq + [mask] * (start + B - len(seq))
        known = [True] * (len(seq) - start) + [False] * (start + B - len(seq))
        while not all(known):
            out = logits(canvas)
            pred = out[start : start + B]
            if shift:  # position j from output j-1; position 0 is always known (row unused)
                pred = torch.cat([pred[:1], pred[:-1]])
            conf, tok = pred.softmax(-1).max(-1)
            conf[torch.tensor(known)] = -1.0
            i = int(conf.argmax())
            canvas[start + i] = int(tok[i])
            known[i] = True
        seq = canvas
    return seq[L : L + max_new]


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (1, 3, 4, 6, 8)]


@pytest.mark.parametrize("shift", [False, True])
def test_threshold_one_equals_reference_and_cache_is_exact(ckpt, shift):
    _, model = ckpt
    B = 4
    dec = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=B, threshold=1.0, token_shift=shift)
    checked = []

    def on_step(caches, history):  # the engine's hook: prompt + emitted tokens; the cache holds a prefix
        cache = caches["target"]
        committed = history[: cache.length]
        n = len(committed)
        assert n == cache.length and n % B == 0
        if n:
            fresh = model.new_cache(n)
            model(torch.tensor([committed]), mask=block_causal(n, B), cache=fresh)
            for a, b in zip(cache.snapshot(), fresh.snapshot()):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            checked.append(n)

    dec.on_step = on_step
    for p in _prompts():
        g = dec.generate(p, GenerationConfig(max_new_tokens=10))
        assert g.tokens == reference(model, p, B, 10, shift), (p, shift)
        assert g.finish_reason == "length"
        assert g.stats.nfe == len(g.stats.tokens_fed) == len(g.stats.accepted_lengths)
        assert all(a == 1 for a in g.stats.accepted_lengths)  # one token per forward
        assert sum(g.stats.accepted_lengths) >= len(g.tokens)
        again = dec.generate(p, GenerationConfig(max_new_tokens=10))
        assert again.tokens == g.tokens
    assert len(set(checked)) >= 3  # commits at several prefix lengths were compared


def test_steps_equal_threshold_one_and_no_cache_equals_cache(ckpt):
    _, model = ckpt
    p = _prompts()[2]
    cfg = GenerationConfig(max_new_tokens=12)
    one = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, threshold=1.0).generate(p, cfg)
    steps = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, steps=4).generate(p, cfg)
    assert steps.tokens == one.tokens
    for kw in ({}, {"sub_block": 2}, {"token_shift": True}):
        cached = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, threshold=0.3, **kw).generate(p, cfg)
        plain = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, threshold=0.3, block_cache=False,
                                      **kw).generate(p, cfg)
        assert plain.tokens == cached.tokens and plain.stats.nfe == cached.stats.nfe
    # one step per block: B tokens per forward (prompt of 4 = one committed block, 3 blocks)
    fast = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, steps=1).generate(p, cfg)
    assert fast.stats.nfe == 3 and fast.stats.accepted_lengths == [4, 4, 4]
    assert fast.stats.tokens_fed == [8, 8, 8]  # prompt + block, then finished block + next block


def test_sub_block_goes_left_to_right(ckpt):
    _, model = ckpt
    dec = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, threshold=1.0, sub_block=2)
    order = []
    orig = dec._unmask

    def spy(logits, block, known, *a):
        idx = orig(logits, block, known, *a)
        order.extend(idx)
        return idx

    dec._unmask = spy
    dec.generate(_prompts()[2], GenerationConfig(max_new_tokens=8))
    for b in range(0, len(order), 4):
        assert set(order[b : b + 2]) == {0, 1} and set(order[b + 2 : b + 4]) == {2, 3}


def test_sampling_is_seeded_and_random_remasking_runs(ckpt):
    _, model = ckpt
    p = _prompts()[1]
    sp = SamplingParams(temperature=1.0, seed=5)
    dec = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, steps=2, remasking="random")
    a = dec.generate(p, GenerationConfig(max_new_tokens=9, sampling=sp))
    b = dec.generate(p, GenerationConfig(max_new_tokens=9, sampling=sp))
    assert a.tokens == b.tokens and len(a.tokens) == 9 and MASK not in a.tokens
    c = dec.generate(p, GenerationConfig(max_new_tokens=9, sampling=SamplingParams(temperature=1.0, seed=6)))
    assert c.tokens != a.tokens  # the seed matters (9 tokens over a 96-token vocabulary)
    # first block: 3 prompt tokens + 1 mask (one step); then 2 steps of 2 tokens per block
    assert a.stats.accepted_lengths == [1, 2, 2, 2, 2] and a.stats.tokens_fed == [4, 8, 4, 8, 4]


# ----------------------------------------------------------------------------- stopping


def test_stop_string_and_max_tokens_inside_a_block(ckpt):
    _, model = ckpt
    tok = CharTok()
    p = _prompts()[3]  # 6 tokens: first block holds 2 prompt tokens + 2 generated
    dec = BlockDiffusionDecoder(model, tok, mask_token_id=MASK, block_size=4, threshold=1.0)
    full = dec.generate(p, GenerationConfig(max_new_tokens=14))
    ref = full.tokens
    # max_new_tokens = 5 ends inside the second generated block
    g = dec.generate(p, GenerationConfig(max_new_tokens=5))
    assert g.tokens == ref[:5] and g.finish_reason == "length"
    # stop string: the first new character at index >= 3 (inside a block)
    i = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    s = tok.decode([ref[i]])
    g = dec.generate(p, GenerationConfig(max_new_tokens=14, stop_strings=(s,)))
    assert g.tokens == ref[: i + 1] and g.finish_reason == "stop_string"
    assert g.text == tok.decode(ref[:i])
    assert g.stats.nfe <= full.stats.nfe
    # stop token id: not emitted
    g = dec.generate(p, GenerationConfig(max_new_tokens=14, stop_token_ids=(ref[i],)))
    assert g.tokens == ref[:i] and g.finish_reason == "stop_token"


# ----------------------------------------------------------------------------- registry / options


def test_build_and_bad_options(ckpt, tmp_path):
    d, model = ckpt
    ctx = DecoderContext(d, device="cpu", dtype="float32")
    dec = build_decoder("bd", ctx, {"threshold": "0.5", "sub_block": "2", "block_cache": "false"})
    assert dec.options()["block_size"] == 4 and dec.options()["sub_block"] == 2 and not dec.block_cache
    assert dec.lossless is False
    for bad in ({"threshold": "0"}, {"threshold": "1.5"}, {"steps": "0"}, {"steps": "9"},
                {"remasking": "nope"}, {"remasking": "random"}, {"sub_block": "3"},
                {"sub_block": "2", "steps": "2"}, {"block_size": "0"}, {"nope": "1"}, {"steps": "x"}):
        with pytest.raises(UserError):
            build_decoder("bd", ctx, bad)
    plain = tmp_path / "plain"
    make_hf_model("qwen2", plain)
    with pytest.raises(UserError, match="bd_config.json"):
        build_decoder("bd", DecoderContext(plain, device="cpu", dtype="float32"))
    with pytest.raises(UserError):
        BlockDiffusionDecoder(model, mask_token_id=V, block_size=4)
    with pytest.raises(UserError):
        dec.generate([], GenerationConfig(max_new_tokens=3))


def test_fast_dllm_config_is_read_as_qwen2(tmp_path):
    """A Fast_dLLM_Qwen checkpoint: model_type read as qwen2, mask 151665, bd_size, token shift."""
    d = tmp_path / "fast"
    make_hf_model("qwen2", d, vocab_size=151_680, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="Fast_dLLM_Qwen", architectures=["Fast_dLLM_QwenForCausalLM"], bd_size=8)
    (d / "config.json").write_text(json.dumps(cfg))
    ctx = DecoderContext(d, device="cpu", dtype="float32")
    dec = build_decoder("bd", ctx, {"threshold": "1.0"})
    assert dec.options()["mask_token_id"] == 151_665 and dec.B == 8 and dec.token_shift and dec.sub_block == 8
    p = [5, 17, 3]
    g = dec.generate(p, GenerationConfig(max_new_tokens=6))
    assert g.tokens == reference(dec.model, p, 8, 6, shift=True, mask=151_665)
    assert list((d).glob("*.tmp")) == [] and json.loads((d / "config.json").read_text())["model_type"] == "Fast_dLLM_Qwen"


# ----------------------------------------------------------------------------- SDAR


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdar")
    hf = make_sdar_replica(d, seed=4, vocab_size=V, block_size=4, mask_token_id=MASK)
    return d, hf


def test_sdar_checkpoint_is_read_from_its_config(sdar):
    """model_type sdar loads as Qwen3 (same logits as the HF Qwen3 model it was saved from); block
    size and mask id come from config.json; SDAR's dynamic rule with steps = B and a threshold no
    confidence exceeds is one most-confident token per forward: the full-recompute reference."""
    d, hf = sdar
    ctx = DecoderContext(d, device="cpu", dtype="float32")
    ids = torch.tensor([[5, 17, 3, 40, 8]])
    torch.testing.assert_close(ctx.model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    dec = build_decoder("bd", ctx, {"threshold": "1.0"})
    o = dec.options()
    assert (o["mask_token_id"], o["block_size"], o["token_shift"], o["remasking"], o["steps"]) == \
        (MASK, 4, False, "low_confidence_dynamic", 4)
    for p in _prompts()[1:3]:  # a prompt tail of 3, and a full prompt block
        g = dec.generate(p, GenerationConfig(max_new_tokens=7))
        assert g.tokens == reference(ctx.model, p, 4, 7), p
        assert all(a == 1 for a in g.stats.accepted_lengths)
    assert build_decoder("ar", ctx).generate([5, 17], GenerationConfig(max_new_tokens=3)).tokens  # ar reads it too


def _rows(dec, confs):
    """Logits whose argmax at block position i is token i + 1, with confidence about confs[i]."""
    logits = torch.full((len(confs), V), 0.0)
    for i, c in enumerate(confs):
        logits[i, i + 1] = float(torch.log(torch.tensor(c * (V - 1) / (1 - c))))
    return logits


@pytest.mark.parametrize("rule", ["low_confidence_dynamic", "low_confidence_static", "sequential"])
def test_sdar_rules_by_hand(ckpt, rule):
    _, model = ckpt
    dec = BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=4, steps=2, remasking=rule, threshold=0.5)
    assert dec.step_counts == [2, 2]
    assert BlockDiffusionDecoder(model, mask_token_id=MASK, block_size=8, steps=3, remasking=rule).step_counts == [3, 3, 2]
    greedy = SamplingParams()

    def unmask(confs, known, step=0):
        block = torch.full((4,), MASK)
        block[torch.tensor(known)] = 0
        idx = dec._unmask(_rows(dec, confs), block, list(known), step, greedy, None, None)
        assert all(int(block[i]) == i + 1 for i in idx) and all(int(block[i]) == 0 for i in range(4) if known[i])
        return sorted(idx)

    none = [False] * 4
    three_high = [0.6, 0.2, 0.7, 0.9]  # three masked positions above 0.5 >= the step's count of 2
    one_high = [0.3, 0.2, 0.4, 0.9]  # one above: fewer than 2, so the top 2
    expected = {"low_confidence_dynamic": ([0, 2, 3], [2, 3]), "low_confidence_static": ([2, 3], [2, 3]),
                "sequential": ([0, 1], [0, 1])}[rule]
    assert unmask(three_high, none) == expected[0]
    assert unmask(one_high, none) == expected[1]
    # one masked position left, count 2: only it (SDAR's topk would also rewrite a final position)
    assert unmask(three_high, [True, True, False, True], step=1) == [2]
    if rule == "low_confidence_dynamic":  # strictly above the threshold: a tie does not count
        tokens, conf = dec._pick(_rows(dec, three_high), greedy, None)
        dec.threshold = float(conf[0])
        assert unmask(three_high, none) == [2, 3]


def test_sdar_separate_commit_same_tokens_more_forwards(sdar):
    """SDAR's separate prefill and commit forwards: the same tokens and the same exact block-causal
    cache; one more forward per committed block (and one for the prompt's full blocks)."""
    d, _ = sdar
    ctx = DecoderContext(d, device="cpu", dtype="float32")
    model = ctx.model
    cfg = GenerationConfig(max_new_tokens=12)
    p = _prompts()[2]  # 4 tokens: one full prompt block
    merged = build_decoder("bd", ctx, {"steps": "1"}).generate(p, cfg)
    dec = build_decoder("bd", ctx, {"steps": "1", "separate_commit": "true"})
    seen = []

    def on_step(caches, history):
        cache = caches["target"]
        committed = history[: cache.length]
        n = len(committed)
        assert n == cache.length and n % 4 == 0
        if n:
            fresh = model.new_cache(n)
            model(torch.tensor([committed]), mask=block_causal(n, 4), cache=fresh)
            for a, b in zip(cache.snapshot(), fresh.snapshot()):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        seen.append(n)

    dec.on_step = on_step
    sep = dec.generate(p, cfg)
    assert sep.tokens == merged.tokens
    assert merged.stats.tokens_fed == [8, 8, 8] and merged.stats.accepted_lengths == [4, 4, 4]
    assert sep.stats.tokens_fed == [4] * 6 and sep.stats.accepted_lengths == [0, 4, 0, 4, 0, 4]
    assert seen == [4, 4, 8, 8, 12, 12]
    cfg = GenerationConfig(max_new_tokens=9)
    for p in (_prompts()[1], _prompts()[3]):  # prompt tails of 3 and 2, the dynamic rule: same tokens both ways
        a = build_decoder("bd", ctx, {"threshold": "0.2"}).generate(p, cfg)
        b = build_decoder("bd", ctx, {"threshold": "0.2", "separate_commit": "true"}).generate(p, cfg)
        assert a.tokens == b.tokens and b.stats.nfe > a.stats.nfe


def test_sdar_bad_configs_and_options(sdar, tmp_path):
    d, _ = sdar
    ctx = DecoderContext(d, device="cpu", dtype="float32")
    for bad in ({"separate_commit": "true", "token_shift": "true"}, {"separate_commit": "true", "block_cache": "false"},
                {"sub_block": "2"}, {"remasking": "entropy_bounded"}):
        with pytest.raises(UserError):
            build_decoder("bd", ctx, bad)
    cfg = json.loads((d / "config.json").read_text())
    for change, msg in (({"mask_token_id": None}, "lacks an integer mask_token_id"),
                        ({"architectures": ["SDARMoeForCausalLM"]}, "SDARMoeForCausalLM"),
                        ({"attention_bias": True}, "attention_bias")):
        other = tmp_path / msg.split()[-1]
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**cfg, **change}))
        (other / "model.safetensors").symlink_to(d / "model.safetensors")
        with pytest.raises(UserError, match=msg):
            build_decoder("bd", DecoderContext(other, device="cpu", dtype="float32"))


# ----------------------------------------------------------------------------- objective


@pytest.fixture()
def trainable(ckpt):
    d, _ = ckpt
    model = load_model(d, "float32", "cpu")
    model.requires_grad_(True)
    return model


@pytest.mark.parametrize("shift", [False, True])
def test_objective_loss_by_hand(trainable, shift):
    obj = BlockDiffusionObjective(trainable, None, block_size=2, mask_token_id=MASK, token_shift=shift)
    x0 = torch.tensor([[5, 9, 11, 7, 3, 8]])
    masked = torch.tensor([[False, True, False, True, False, True]])
    x_t = x0.masked_fill(masked, MASK)
    p = torch.full((1, 6), 0.5)
    loss, info = obj.masked_loss(trainable, x0, x_t, masked, p)
    # by hand: the noised copy's outputs under the training mask, CE only at positions 1, 3, 5
    ids = torch.cat([x_t, x0], dim=1)
    out = trainable(ids, torch.arange(6).repeat(2), block_diffusion_training(6, 2)).logits[0, :6]
    rows = [0, 2, 4] if shift else [1, 3, 5]  # token shift: output i-1 predicts position i
    expected = torch.stack([F_ce(out[r], int(x0[0, c])) for r, c in zip(rows, [1, 3, 5])]).mean()
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss)
    # clean tokens at masked positions are visible only to later blocks: the last block's target
    # token changes the loss through its CE term only
    other = x0.clone()
    other[0, 5] = 40
    loss2, _ = obj.masked_loss(trainable, other, other.masked_fill(masked, MASK), masked, p)
    expected2 = (expected * 3 - F_ce(out[rows[2]], int(x0[0, 5])) + F_ce(out[rows[2]], 40)) / 3
    torch.testing.assert_close(loss2, expected2)
    # inv_t weighting: mean over all supervisable tokens of CE / p
    obj_w = BlockDiffusionObjective(trainable, None, block_size=2, mask_token_id=MASK, token_shift=shift,
                                    loss_weighting="inv_t")
    lw, _ = obj_w.masked_loss(trainable, x0, x_t, masked, p)
    n_sup = 5 if shift else 6
    torch.testing.assert_close(lw, expected * 3 / 0.5 / n_sup)


def F_ce(logits, target):
    return torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))


def test_noise_rules(trainable):
    torch.manual_seed(0)
    x0 = torch.randint(0, MASK, (64, 32))
    obj = BlockDiffusionObjective(trainable, None, block_size=4, mask_token_id=MASK, eps=0.5)
    x_t, masked, p = obj.noise(x0)
    assert torch.equal(x_t == MASK, masked) and torch.equal(x_t[~masked], x0[~masked])
    assert float(p.min()) >= 0.5 and torch.equal(p.view(64, 8, 4), p.view(64, 8, 4)[..., :1].expand(-1, -1, 4))
    assert 0.6 < masked.float().mean() < 0.9  # E[p] = 0.75
    shift = BlockDiffusionObjective(trainable, None, block_size=4, mask_token_id=MASK, token_shift=True)
    _, m2, _ = shift.noise(x0)
    assert not m2[:, ::4].any() and m2.any()
    comp = BlockDiffusionObjective(trainable, None, block_size=4, mask_token_id=MASK, complementary=True)
    loss, info = comp.loss(trainable, x0[:2])
    assert torch.isfinite(loss) and info["masked_frac"] == 0.5  # each token supervised exactly once
    with pytest.raises(UserError):
        BlockDiffusionObjective(trainable, None, block_size=4, mask_token_id=MASK, loss_weighting="x")
    with pytest.raises(UserError):
        BlockDiffusionObjective(trainable, None, block_size=4, mask_token_id=V)


def test_objective_learns_and_saves(trainable, tmp_path):
    torch.manual_seed(0)
    obj = BlockDiffusionObjective(trainable, None, block_size=4, mask_token_id=MASK)
    assert obj.module() is trainable
    # tiny corpus: arithmetic progressions mod 50, easy to denoise from the left context
    starts = torch.randint(0, 50, (64, 1))
    steps_ = torch.randint(1, 4, (64, 1))
    corpus = (starts + steps_ * torch.arange(16)) % 50
    fixed = obj.noise(corpus, torch.Generator().manual_seed(1))

    def eval_loss():
        with torch.no_grad():
            return float(obj.masked_loss(trainable, corpus, *fixed)[0])

    before = eval_loss()
    opt = torch.optim.AdamW(trainable.parameters(), lr=3e-3)
    for it in range(30):
        batch = corpus[(it * 8) % 64 : (it * 8) % 64 + 8]
        loss, info = obj.loss(trainable, batch)
        assert torch.isfinite(loss) and 0 < info["masked_frac"] <= 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
    out = tmp_path / "bd"
    obj.save(out)
    assert BDConfig.load(out) == BDConfig(mask_token_id=MASK, block_size=4, token_shift=False)
    dec = build_decoder("bd", DecoderContext(out, device="cpu", dtype="float32"), {"threshold": "1.0"})
    assert len(dec.generate([1, 2, 3], GenerationConfig(max_new_tokens=5)).tokens) == 5
