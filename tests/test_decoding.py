"""Shared decoding rules: warps, verification, stopping; the AR decoder against transformers."""

import pytest
import torch

from tidar_bench.decoding import (GenerationConfig, SamplingParams, StopChecker, sample, stack_rows,
                                  verify_chain, warp_probs)
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


def _one_hot_logits(tokens: list[int], V: int = 6) -> torch.Tensor:
    """[len(tokens), V] logits whose argmax row i is tokens[i]."""
    logits = torch.full((len(tokens), V), -1.0)
    for i, t in enumerate(tokens):
        logits[i, t] = 1.0 + 0.1 * i
    return logits


def _greedy_reference(drafts: list[int], argmax: list[int]) -> tuple[int, int]:
    n = 0
    while n < len(drafts) and drafts[n] == argmax[n]:
        n += 1
    return n, argmax[n]


def test_verify_chain_greedy_rule():
    """The greedy rule, exactly: the longest prefix of drafts equal to the target argmax, then the
    target argmax at the first mismatch or at the bonus position."""
    target = _one_hot_logits([3, 1, 4, 2])[None]  # argmax 3 1 4 | bonus 2

    def one(drafts):
        n, t = verify_chain(torch.tensor([drafts]), target)
        return int(n[0]), int(t[0])

    assert one([3, 1, 4]) == (3, 2)  # all accepted + bonus
    assert one([3, 0, 4]) == (1, 1)  # partial: first mismatch at 1 (the later match does not count)
    assert one([0, 1, 4]) == (0, 3)  # none accepted
    assert verify_chain(torch.zeros(1, 0, dtype=torch.long), target[:, :1])[0].tolist() == [0]  # k = 0
    assert verify_chain(torch.zeros(1, 0, dtype=torch.long), target[:, :1])[1].tolist() == [3]
    # probabilities instead of logits: the same argmax, the same verdict
    n, t = verify_chain(torch.tensor([[3, 0, 4]]), target.softmax(-1))
    assert (n.tolist(), t.tolist()) == ([1], [1])


def test_verify_chain_greedy_rows_with_different_valid_draft_counts():
    """Rows of one call with their own number of real drafts (padding after them is never
    accepted, even where it equals the argmax; the bonus is the row after the last real draft);
    every row equals the host reference; results are device tensors [B]."""
    argmax = [[3, 1, 4, 2], [3, 1, 4, 2], [5, 5, 5, 5], [0, 2, 2, 1], [3, 1, 4, 2]]
    drafts = [[3, 1, 4], [3, 1, 4], [5, 0, 5], [0, 2, 2], [1, 1, 4]]
    n_valid = [3, 1, 2, 0, 3]
    target = torch.stack([_one_hot_logits(a) for a in argmax])
    n, t = verify_chain(torch.tensor(drafts), target, n_valid=n_valid)
    assert n.shape == t.shape == (5,) and n.dtype == t.dtype == torch.long
    want = [_greedy_reference(d[:v], a[: v + 1]) for d, a, v in zip(drafts, argmax, n_valid)]
    assert list(zip(n.tolist(), t.tolist())) == want == [(3, 2), (1, 1), (1, 5), (0, 0), (0, 3)]
    # random rows against the reference: drafts mostly equal to the argmax, so every n occurs
    g = torch.Generator().manual_seed(0)
    B, k, V = 64, 5, 7
    logits = torch.randn(B, k + 1, V, generator=g)
    am = logits.argmax(-1)
    noise = torch.randint(0, V, (B, k), generator=g)
    d = torch.where(torch.rand(B, k, generator=g) < 0.8, am[:, :k], noise)
    nv = torch.randint(0, k + 1, (B,), generator=g).tolist()
    n, t = verify_chain(d, logits, n_valid=nv)
    want = [_greedy_reference(d[b, : nv[b]].tolist(), am[b, : nv[b] + 1].tolist()) for b in range(B)]
    assert list(zip(n.tolist(), t.tolist())) == want
    assert len(set(n.tolist())) == k + 1
    with pytest.raises(ValueError):
        verify_chain(d, logits, n_valid=[k + 1] * B)
    with pytest.raises(ValueError):
        verify_chain(d, logits[:, :k])


def test_verify_chain_sampling_at_temperature_0_is_the_greedy_rule():
    """One-hot targets (temperature 0) and argmax drafts as point masses: speculative sampling
    gives exactly the greedy verdicts."""
    g = torch.Generator().manual_seed(1)
    B, k, V = 32, 4, 5
    logits = torch.randn(B, k + 1, V, generator=g)
    am = logits.argmax(-1)
    d = torch.where(torch.rand(B, k, generator=g) < 0.7, am[:, :k], torch.randint(0, V, (B, k), generator=g))
    nv = torch.randint(0, k + 1, (B,), generator=g).tolist()
    greedy = verify_chain(d, logits, n_valid=nv)
    p = warp_probs(logits, SamplingParams(temperature=0.0))
    q = torch.nn.functional.one_hot(d, V).float()
    sampled = verify_chain(d, p, q, n_valid=nv, generators=g)
    assert [x.tolist() for x in sampled] == [x.tolist() for x in greedy]


def test_verify_chain_sampling_rows_draw_from_their_own_generators():
    """Per-row generators: a row's verdict in a batch equals its verdict alone (same seed), a
    None entry (empty slot) draws nothing, and with no drafts the token is torch.multinomial's draw."""
    gt = torch.Generator().manual_seed(2)
    B, k, V = 4, 3, 9
    p = torch.rand(B, k + 1, V, generator=gt).softmax(-1)
    q = torch.rand(B, k, V, generator=gt).softmax(-1)
    d = torch.multinomial(q.view(-1, V), 1, generator=gt).view(B, k)
    nv = [3, 2, 0, 3]
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 10 + b) for b in range(B)]
        n, t = verify_chain(d, p, q, n_valid=nv, generators=gens)
        for b in range(B):
            nb, tb = verify_chain(d[b : b + 1], p[b : b + 1], q[b : b + 1], n_valid=nv[b : b + 1],
                                  generators=[torch.Generator().manual_seed(seed * 10 + b)])
            assert (int(n[b]), int(t[b])) == (int(nb[0]), int(tb[0]))
        empty = [None, gens[1], None, None]
        before = gens[1].get_state()
        verify_chain(d, p, q, n_valid=nv, generators=empty)
        assert not torch.equal(before, gens[1].get_state())  # row 1 drew, the empty slots did not fail
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, t = verify_chain(d[:1, :0], p[:1, :1], q[:1, :0], generators=[g1])
    assert int(t[0]) == int(torch.multinomial(p[0, 0], 1, generator=g2))


def test_stack_rows_pads_ragged_rows_and_empty_slots():
    a, b = torch.rand(3, 5), torch.rand(1, 5)
    assert stack_rows([a], 3).data_ptr() == a.data_ptr()  # one full row: a view
    assert torch.equal(stack_rows([a, a], 3), torch.stack([a, a]))
    got = stack_rows([b, None, a], 3)
    assert got.shape == (3, 3, 5) and torch.equal(got[2], a) and torch.equal(got[0, :1], b)
    assert not got[0, 1:].any() and not got[1].any()


def _emitted_pairs(rule, p: torch.Tensor, q: torch.Tensor, n_calls: int, seed: int = 0) -> torch.Tensor:
    """Counts [V, V] of the first two tokens a chain of 2 drafts (drawn from q) verified by `rule`
    emits, the second one drawn from the target row 1 when the step emitted only one. The target
    rows do not depend on the tokens before them, so those two tokens must follow p[0] x p[1]. Four
    rows per call with 2, 2, 1 and 0 real drafts."""
    V = p.shape[-1]
    nv = [2, 2, 1, 0]
    B = len(nv)
    gens = [torch.Generator().manual_seed(seed * 100 + b) for b in range(B)]
    counts = torch.zeros(V, V)
    P, Q = p.expand(B, -1, -1), q.expand(B, -1, -1)
    for _ in range(n_calls):
        d = torch.stack([torch.stack([sample(q[i], gens[b]) for i in range(2)]) for b in range(B)])
        n, t = rule(d, P, Q, nv, gens)
        for b in range(B):
            toks = d[b, : int(n[b])].tolist() + [int(t[b])]
            if len(toks) < 2:
                toks.append(int(sample(p[1], gens[b])))
            counts[toks[0], toks[1]] += 1
    return counts


def test_verify_chain_sampling_keeps_target_distribution_and_a_rule_without_residual_fails():
    """Chi-square of the emitted (token 1, token 2) against the exact target distribution, with a
    draft distribution deliberately unlike the target's: exact speculative sampling passes; the same
    acceptance test followed by a draw from p instead of the residual max(p - q, 0) fails, and so
    does accepting every draft."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.6, 0.2, 0.1, 0.1]])
    exact = (p[0][:, None] * p[1][None, :]).flatten()

    def right(d, P, Q, nv, gens):
        return verify_chain(d, P, Q, n_valid=nv, generators=gens)

    def no_residual(d, P, Q, nv, gens):  # WRONG: the token at a rejection is drawn from p itself
        n, _ = verify_chain(d, P, Q, n_valid=nv, generators=gens)
        return n, torch.stack([sample(P[b, int(n[b])], g) for b, g in enumerate(gens)])

    def always_accept(d, P, Q, nv, gens):  # WRONG: no rejection at all
        return torch.tensor(nv), torch.stack([sample(P[b, v], g) for b, (v, g) in enumerate(zip(nv, gens))])

    good = _emitted_pairs(right, p, q, 1000)
    assert chi2_pvalue(good.flatten(), exact) > 1e-3
    assert chi2_pvalue(_emitted_pairs(no_residual, p, q, 1000).flatten(), exact) < 1e-6
    assert chi2_pvalue(_emitted_pairs(always_accept, p, q, 1000).flatten(), exact) < 1e-6
    # the first token alone, too (a token-1 error is not hidden by the pairs)
    assert chi2_pvalue(good.sum(1), p[0]) > 1e-3


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
