"""Shared decoding rules: warps, verification, stopping; the AR decoder against transformers."""

import pytest
import torch

from tidar_bench.decoding import (GenerationConfig, SamplingParams, StopChecker, greedy_verify,
                                  speculative_verify, warp_probs)
from tidar_bench.errors import UserError
from tidar_bench.testing import chi2_pvalue
from tidar_bench.registry import DecoderContext, build_decoder


def test_warp_probs_top_k_top_p_and_greedy():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    p = warp_probs(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(p, logits.softmax(-1))
    pk = warp_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (pk[2:] == 0).all() and torch.isclose(pk.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)
    pp = warp_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0] + 0.01)))
    assert (pp > 0).tolist() == [True, True, False, False]  # first token alone is not enough mass
    g = warp_probs(logits, SamplingParams())
    assert g.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_greedy_verify():
    logits = torch.full((4, 5), -1.0)
    for i, t in enumerate([3, 1, 4, 2]):
        logits[i, t] = 1.0
    assert greedy_verify(torch.tensor([3, 1, 4]), logits) == (3, 2)  # all accepted + bonus
    assert greedy_verify(torch.tensor([3, 0, 4]), logits) == (1, 1)  # first mismatch at 1
    assert greedy_verify(torch.tensor([0, 1, 4]), logits) == (0, 3)
    assert greedy_verify(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 3)




def test_speculative_verify_keeps_target_distribution():
    """One draft from q, verified against p: the first emitted token must be distributed as p.
    An always-accept rule would emit q instead; the same test detects that."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def emitted(rule, n=20000, seed=0):
        g = torch.Generator().manual_seed(seed)
        counts = torch.zeros(4)
        for _ in range(n):
            d = torch.multinomial(q, 1, generator=g)
            acc, tok = rule(d, q[None], torch.stack([p, p]), g)
            counts[int(d) if acc == 1 else tok] += 1
        return counts / n

    def always_accept(d, qp, tp, g):
        return 1, int(torch.multinomial(tp[1], 1, generator=g))

    good = emitted(speculative_verify)
    bad = emitted(always_accept)
    assert (good - p).abs().sum() / 2 < 0.02  # total variation
    assert (bad - p).abs().sum() / 2 > 0.2


class _CharTok:
    """Minimal tokenizer: token i is chr(ord('a') + i)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_stop_checker_rules():
    tok = _CharTok()
    c = StopChecker(GenerationConfig(max_new_tokens=10, stop_strings=("cd",)), tok)
    assert not c.extend([0, 1])
    assert c.extend([2, 3, 4])  # "abcde": stop completes at token 3, token 4 is dropped
    g = c.result(__import__("tidar_bench.decoding", fromlist=["DecodeStats"]).DecodeStats())
    assert g.tokens == [0, 1, 2, 3] and g.text == "ab" and g.finish_reason == "stop_string"
    c = StopChecker(GenerationConfig(max_new_tokens=10, stop_token_ids=(7,)), tok)
    assert c.extend([1, 7, 2]) and c.tokens == [1] and c.finish_reason == "stop_token"
    c = StopChecker(GenerationConfig(max_new_tokens=3), tok)
    assert c.extend([1, 2, 3, 4]) and c.tokens == [1, 2, 3] and c.finish_reason == "length"


def test_ar_greedy_equals_hf_greedy(hf_checkpoint):
    _, d = hf_checkpoint
    ctx = DecoderContext(d, "cpu", "float32")
    ar, hf = build_decoder("ar", ctx), build_decoder("hf", ctx)
    g = torch.Generator().manual_seed(0)
    V = ctx.model.config.vocab_size
    for n in range(6):
        prompt = torch.randint(0, V - 1, (3 + 4 * n,), generator=g).tolist()
        cfg = GenerationConfig(max_new_tokens=30, stop_token_ids=(V - 1,))
        a, h = ar.generate(prompt, cfg), hf.generate(prompt, cfg)
        assert a.tokens == h.tokens
        assert a.stats.nfe == len(a.tokens) or a.finish_reason != "length"


def test_ar_sampling_is_seeded_and_follows_warps(tiny_llama):
    ctx = DecoderContext(tiny_llama, "cpu", "float32")
    ar = build_decoder("ar", ctx)
    sp = SamplingParams(temperature=1.0, top_k=3, seed=7)
    cfg = GenerationConfig(max_new_tokens=12, sampling=sp)
    a, b = ar.generate([1, 2, 3], cfg), ar.generate([1, 2, 3], cfg)
    assert a.tokens == b.tokens
    # each sampled token is among the top-3 of the model's logits at its position
    seq = [1, 2, 3] + a.tokens
    logits = ctx.model(torch.tensor([seq])).logits[0]
    for i, t in enumerate(a.tokens):
        assert t in logits[2 + i].topk(3).indices.tolist()


def test_registry_errors(tiny_llama):
    ctx = DecoderContext(tiny_llama, "cpu", "float32")
    with pytest.raises(UserError, match="unknown decoder 'nope'; valid: .*ar"):
        build_decoder("nope", ctx)
    with pytest.raises(UserError, match="has no option"):
        build_decoder("ar", ctx, {"block_size": "4"})


def test_stop_strings_found_incrementally_as_by_full_decoding():
    """StopChecker decodes a short window per token (not the whole output): it must stop at the same
    token as the rule 'first prefix whose full decoded text contains a stop string', also for
    stop strings spanning several tokens and multi-byte characters split across byte tokens."""
    from pathlib import Path

    from tidar_bench.registry import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "tidar_bench" / "embedded" / "base")
    text = "Tom has 3 boxes. Each box holds 12 pens.\nSo 3 × 12 = 36 pens — naïve café ✓\n\n#### 36"
    ids = tok.encode(text, add_special_tokens=False)
    stops_list = [("\n\n",), ("12 pens",), ("café",), ("✓",), ("####",), ("s. E", "= 3"), ("absent",)]
    for stops in stops_list:
        sc = StopChecker(GenerationConfig(max_new_tokens=len(ids) + 1, stop_strings=stops), tok)
        n = next((i for i, _ in enumerate(ids) if sc.extend([ids[i]])), None)
        want = next((i for i in range(len(ids)) if any(s in tok.decode(ids[: i + 1]) for s in stops)), None)
        assert n == want, stops
        if want is not None:
            assert sc.finish_reason == "stop_string" and sc.tokens == ids[: want + 1]
            assert sc.text() == tok.decode(ids[: want + 1])[: min(tok.decode(ids[: want + 1]).find(s)
                                                                  for s in stops if s in tok.decode(ids[: want + 1]))]


def test_decoder_settings_parse_and_label():
    from tidar_bench.registry import parse_settings

    s = parse_settings("ar, ar(compile=false),tidar(block_size=4, max_blocks=3),hf")
    assert [x.label for x in s] == ["ar", "ar(compile=false)", "tidar(block_size=4,max_blocks=3)", "hf"]
    assert s[2].name == "tidar" and dict(s[2].options) == {"block_size": "4", "max_blocks": "3"}
    for bad, msg in [("ar,ar", "twice"), ("tidar(block_size=4", "unbalanced"), ("tidar(block_size)", "key=value"),
                     ("tidar(nope=1)", "no option"), ("tidar(block_size=x)", "not a valid"), ("", "empty"),
                     ("zzz", "unknown decoder")]:
        with pytest.raises(UserError, match=msg):
            parse_settings(bad)


def test_chi2_pvalue_pools_small_cells_by_expectation_and_refuses_a_test_that_cannot_fail():
    """Every cell expecting under 5 counts (400 draws over 256 cells): the cells are pooled into
    bins of >= 5 expected, so the right distribution passes and a wrong one fails; 6 draws leave one
    bin (df 0), which is an error, not a p-value."""
    g = torch.Generator().manual_seed(0)
    probs = torch.full((256,), 1 / 256)
    wrong = probs.clone()
    wrong[:128] *= 1.8
    wrong[128:] *= 0.2

    def draw(p, n):
        return torch.bincount(torch.multinomial(p, n, replacement=True, generator=g), minlength=256).float()

    assert chi2_pvalue(draw(probs, 400), probs) > 1e-3
    assert chi2_pvalue(draw(wrong, 400), probs) < 1e-6
    with pytest.raises(ValueError, match="df 0"):
        chi2_pvalue(draw(probs, 6), probs)
