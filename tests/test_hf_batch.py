"""`hf` at B > 1 (baselines/hf.py generate_batch): transformers' generate over left-padded chunks equals
batch-1 `ar` of our model core row by row (prompts of different lengths, so the position ids generate
derives from the attention mask are exercised; fp32, eager), every row stops by its own stop string,
and on_done reports each row as it finishes."""

import pytest
import torch

from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.hf import HFDecoder
from tidar_bench.batched import generate_batch, supports_batch
from tidar_bench.decoding import GenerationConfig
from tidar_bench.errors import UserError
from tidar_bench.model import load_model
from tidar_bench.testing import CharTok


@pytest.fixture(scope="module")
def pair(tiny_llama):
    tok = CharTok()
    return ARDecoder(load_model(tiny_llama, "float32", "cpu"), tok), HFDecoder(tiny_llama, "cpu", "float32", tok,
                                                                                 compile="off")


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist() for i in range(6)]  # lengths 3..28


def test_hf_batch_equals_batch1_ar_with_per_row_stops(pair):
    ar, hf = pair
    prompts = _prompts(ar.model.config.vocab_size)
    free = [ar.generate(p, GenerationConfig(max_new_tokens=16)).tokens for p in prompts]
    # stop strings taken from three rows' own outputs at different offsets: rows stop at different steps
    stops = tuple(CharTok().decode(free[i][j : j + 2]) for i, j in ((0, 2), (2, 6), (5, 9)))
    cfg = GenerationConfig(max_new_tokens=16, stop_strings=stops)
    want = [ar.generate(p, cfg) for p in prompts]
    done: list[int] = []
    seen = []  # position ids of every forward: RoPE hides a constant shift per row, so check them directly
    hook = hf.model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        got = generate_batch(hf, prompts, cfg, 4, on_done=lambda i, g: done.append(i))  # dispatches to hf's own
    finally:
        hook.remove()
    width = max(map(len, prompts[:4]))
    assert seen[0].shape == (4, width) and seen[0][:, -1].tolist() == [len(p) - 1 for p in prompts[:4]]
    assert seen[1][:, 0].tolist() == [len(p) for p in prompts[:4]]  # the first decode step of each row
    for p, g, w in zip(prompts, got, want):
        assert (g.tokens, g.text, g.finish_reason) == (w.tokens, w.text, w.finish_reason)
        assert g.stats.nfe == w.stats.nfe and g.stats.tokens_fed == [len(p)] + [1] * (g.stats.nfe - 1)
        assert g.stats.accepted_lengths == [1] * (g.stats.nfe - 1) and g.stats.compile_s == 0.0
    assert len({len(g.tokens) for g in got[:4]}) >= 2 and sum(g.finish_reason == "stop_string" for g in got) >= 3
    # chunks of 4 in order; inside a chunk each row is reported at the step it stops
    assert done == sorted(range(6), key=lambda i: (i // 4, got[i].stats.nfe, i))
    first = sorted(got[:4], key=lambda g: g.stats.nfe)
    assert all(a.stats.wall_time_s <= b.stats.wall_time_s for a, b in zip(first, first[1:]))
    assert [g.tokens for g in hf.generate_batch(prompts, cfg, 8)] == [w.tokens for w in want]  # one short chunk


def test_hf_batch_is_supported_and_checks_input(pair):
    _, hf = pair
    assert supports_batch(hf) is None
    cfg = GenerationConfig(max_new_tokens=4)
    assert generate_batch(hf, [], cfg, 4) == []
    for prompts, b in (([[1, 2]], 0), ([[1, 2], []], 2)):
        with pytest.raises(UserError):
            generate_batch(hf, prompts, cfg, b)
