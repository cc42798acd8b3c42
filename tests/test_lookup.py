"""Prompt-lookup decoding (baselines/lookup.py): the n-gram proposal, lossless greedy decoding with
accepted drafts, batched rows equal batch 1, compiled equals eager, and sampling that keeps the AR
distribution (a rule that always accepts must fail)."""

from __future__ import annotations

import itertools

import pytest
import torch

import tidar_bench.baselines.lookup as lookup_mod
from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.lookup import LookupDecoder, propose
from tidar_bench.compiled import unavailable_reason
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.model import load_model
from tidar_bench.registry import decoders
from tidar_bench.testing import chi2_pvalue, make_hf_model, always_accept_chain

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [3, 9, 3, 9, 3, 9, 3], [11, 12, 13, 14, 15, 11, 12], [1, 2, 3, 4], [7],
           [4, 4, 4, 4, 4, 4]]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("lookup_llama")
    make_hf_model("llama", d, seed=2, vocab_size=32, num_hidden_layers=2)
    return load_model(d, "float32", "cpu")


def test_propose_takes_the_longest_most_recent_match():
    h = [1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 2, 3]
    assert propose(h, 2, 3, 1) == [7, 8]  # "2 3" last seen at 5..6 (3-gram "4 2 3" never occurs)
    assert propose(h, 4, 1, 1) == [7, 8, 4, 2]  # "3": its most recent earlier occurrence
    assert propose([1, 2, 3], 4, 3, 1) == [] and propose([5], 4, 3, 1) == []
    assert propose([1, 2, 1], 4, 3, 2) == []  # no 2-gram repeats; unigrams are below min_ngram
    assert "lookup" in decoders()


def test_greedy_equals_ar_and_drafts_are_accepted(model):
    ar, dec = ARDecoder(model), LookupDecoder(model, num_draft_tokens=4)
    cfg = GenerationConfig(max_new_tokens=24)
    best = 0.0
    for p in PROMPTS:
        g = dec.generate(p, cfg)
        assert g.tokens == ar.generate(p, cfg).tokens, p
        s = g.stats
        assert s.nfe == len(s.tokens_fed) == len(s.accepted_lengths) + 1 and s.prefill_forwards == 1
        assert sum(s.accepted_lengths) + 1 >= len(g.tokens)
        best = max(best, s.tokens_per_nfe)
    assert best > 1.0  # repetitive text: some steps committed several tokens


def test_batched_rows_equal_batch1(model):
    dec = LookupDecoder(model, num_draft_tokens=3, max_ngram=2)
    for sp in (SamplingParams(), SamplingParams(temperature=1.0, seed=4)):
        cfg = GenerationConfig(max_new_tokens=16, sampling=sp)
        one = [dec.generate(p, cfg) for p in PROMPTS]
        for B in (2, 4):
            rows = dec.generate_batch(PROMPTS, cfg, B)
            assert [g.tokens for g in rows] == [g.tokens for g in one], (sp, B)
            assert [g.stats.accepted_lengths for g in rows] == [g.stats.accepted_lengths for g in one]


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="torch.compile unavailable")
def test_compiled_equals_eager(model):
    cfg = GenerationConfig(max_new_tokens=12)
    eager, comp = LookupDecoder(model, num_draft_tokens=3), LookupDecoder(model, num_draft_tokens=3, compile="on")
    assert comp.options()["compile"] is True
    for p in PROMPTS[:3]:
        ge, gc = eager.generate(p, cfg), comp.generate(p, cfg)
        assert gc.tokens == ge.tokens and gc.stats.accepted_lengths == ge.stats.accepted_lengths


def test_sampling_preserves_ar_distribution(tmp_path, monkeypatch):
    """New tokens 2 and 3 (decided by the first verification when its drafts are accepted) vs the
    exact AR distribution (8 x 8 cells); always accepting the drafts must fail the test."""
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8, num_hidden_layers=2)
    m = load_model(tmp_path, "float32", "cpu")
    prompt, T = [1, 4, 2, 1, 4, 2, 3, 5], 1.0
    seqs = torch.tensor(list(itertools.product(range(8), repeat=3)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = (m(ids).logits[:, len(prompt) - 1: -1] / T).log_softmax(-1)
    exact = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp().view(8, 64).sum(0)

    def run(n):
        dec, counts, multi = LookupDecoder(m, num_draft_tokens=2), torch.zeros(64), 0
        for s in range(n):
            g = dec.generate(prompt, GenerationConfig(max_new_tokens=3, sampling=SamplingParams(temperature=T, seed=s)))
            counts[g.tokens[1] * 8 + g.tokens[2]] += 1
            multi += g.stats.accepted_lengths[0] > 1
        return chi2_pvalue(counts, exact), multi / n

    p, accept_rate = run(400)
    assert accept_rate > 0.02  # drafts were accepted: the rejection rule ran
    assert p > 1e-3

    always_accept = always_accept_chain  # WRONG: no rejection (tidar_bench.testing)

    monkeypatch.setattr(lookup_mod, "verify_chain", always_accept)
    assert run(300)[0] < 1e-3
