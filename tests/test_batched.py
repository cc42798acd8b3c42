"""Batched decoding (tidar_bench/batched.py): row by row, the greedy tokens of every batched lossless
decoder equal batch-1 `ar` on that prompt (fp32, the embedded trained models, prompts of different
lengths, more prompts than slots so finished rows are refilled), batched bd equals batch-1 bd for every
option, greedy, sampled and compiled, and a row that stops early changes nobody."""

import json
from pathlib import Path

import pytest
import torch
from tidar_bench.batched import generate_batch, supports_batch
from tidar_bench.compiled import unavailable_reason
from tidar_bench.decoding import GenerationConfig, SamplingParams
from tidar_bench.errors import UserError
from tidar_bench.registry import DecoderContext, build_decoder

EMBEDDED = Path(__file__).resolve().parents[1] / "tidar_bench" / "embedded"
GSM = Path(__file__).resolve().parents[1] / "tasks" / "data" / "mini" / "gsm.jsonl"


@pytest.fixture(scope="module")
def tidar_ctx():
    return DecoderContext(EMBEDDED / "tidar", "cpu", "float32")


@pytest.fixture(scope="module")
def base_ctx():
    """The embedded AR base with its EAGLE-3 head as the draft."""
    return DecoderContext(EMBEDDED / "base", "cpu", "float32", EMBEDDED / "eagle")


CHAIN = {"tree": "False", "chain_length": "4"}


def prompts_of(tok, n=6):
    """n real prompts of different lengths (some cut short, so rows start at different offsets)."""
    texts = [json.loads(line)["prompt"] for line in GSM.read_text().splitlines()[:n]]
    ids = [tok.encode(t) for t in texts]
    ids = [p[: max(2, len(p) - 4 * i)] for i, p in enumerate(ids)]
    assert len({len(p) for p in ids}) >= n - 1
    return ids


_REFERENCE: dict = {}
_RUNS: dict = {}


def batch1_runs(dec, prompts, cfg):
    """Batch-1 Generations of a decoder setting (cached per options, model, prompts and config)."""
    key = (dec.name, tuple(sorted((k, str(v)) for k, v in dec.options().items() if k != "compile")), id(dec.model),
           tuple(map(tuple, prompts)), cfg)
    if key not in _RUNS:
        _RUNS[key] = [dec.generate(p, cfg) for p in prompts]
    return _RUNS[key]


def batch1(dec, prompts, cfg):
    """Batch-1 tokens (cached per decoder kind, model, prompts and config: shared by tests)."""
    key = (dec.name, id(dec.model), tuple(map(tuple, prompts)), cfg)
    if key not in _REFERENCE:
        _REFERENCE[key] = [dec.generate(p, cfg).tokens for p in prompts]
    return _REFERENCE[key]


@pytest.mark.parametrize("name,options", [("ar", {}), ("tidar", {}), ("tidar", {"max_blocks": "2"}),
                                          ("tidar", {"block_size": "4"})])
def test_batched_rows_equal_batch1_ar(tidar_ctx, name, options):
    ar = build_decoder("ar", tidar_ctx, {"compile": "off"})
    dec = build_decoder(name, tidar_ctx, options)
    tok = tidar_ctx.tokenizer
    prompts = prompts_of(tok)
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=(tok.eos_token_id,))
    want = batch1(ar, prompts, cfg)
    done = []
    got = generate_batch(dec, prompts, cfg, 4, on_done=lambda i, g: done.append(i))
    assert [g.tokens for g in got] == want
    assert sorted(done) == list(range(len(prompts)))
    for g, p in zip(got, prompts):
        s = g.stats
        assert s.new_tokens == len(g.tokens) and s.nfe == len(s.tokens_fed) == len(s.accepted_lengths) + 1
        assert s.wall_time_s >= s.prefill_time_s > 0
        if name == "tidar":
            k = dec.k
            assert s.tokens_fed[0] == len(p) + k and all(n <= k + k * k for n in s.tokens_fed[1:])
            assert max(s.accepted_lengths) <= k
    if name == "tidar":  # drafting pays off per row: fewer forwards than tokens
        assert sum(g.stats.nfe for g in got) < sum(len(g.tokens) for g in got)


@pytest.mark.parametrize("name", ["tidar", "eagle"])
def test_a_row_stopping_early_changes_nobody(tidar_ctx, base_ctx, name):
    ctx = tidar_ctx if name == "tidar" else base_ctx
    ar = build_decoder("ar", ctx, {"compile": "off"})
    dec = build_decoder(name, ctx, {})  # eagle: its default dynamic tree
    prompts = prompts_of(ctx.tokenizer, 4)
    free = GenerationConfig(max_new_tokens=24)
    full = batch1(ar, prompts, free)
    # a stop id that row 0 produces early and no other row produces at all
    others = set().union(*map(set, full[1:]))
    stop_id = next((t for t in full[0][1:12] if t not in others), None)
    assert stop_id is not None, "no token unique to row 0: pick other prompts"
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=(stop_id,))
    for d in (ar, dec):
        got = generate_batch(d, prompts, cfg, 4)
        assert got[0].finish_reason == "stop_token" and len(got[0].tokens) < 12
        assert got[0].tokens == full[0][: full[0].index(stop_id)]
        assert [g.tokens for g in got[1:]] == full[1:]  # the others run on, untouched


@pytest.mark.parametrize("name", ["ar", "tidar"])
def test_an_empty_slot_at_the_end_stays_inert(tidar_ctx, name):
    """More slots than prompts left: after two long rows finish together, the last (short) prompt runs
    alone for as many steps while the other slot stays empty. The empty slot must not drift past the
    cache or the attention window (it did in `ar`: its position kept advancing, and a compiled batch-8
    SmolLM2 distill aborted with an inductor index-out-of-bounds at the end of its prompts)."""
    ar = build_decoder("ar", tidar_ctx, {"compile": "off"})
    dec = build_decoder(name, tidar_ctx, {"compile": "off"})
    long_ = prompts_of(tidar_ctx.tokenizer, 2)
    prompts = [long_[0], long_[0][:-1], long_[1][:3]]
    cfg = GenerationConfig(max_new_tokens=150)  # no stop id: both long rows finish at the same step
    want = batch1(ar, prompts, cfg)
    assert [g.tokens for g in generate_batch(dec, prompts, cfg, 2)] == want


TREE = {"depth": "4", "top_k": "3", "total_tokens": "10"}


@pytest.mark.parametrize("options", [{}, TREE, CHAIN, {"tree": "False", "chain_length": "1"}])
def test_batched_eagle_rows_equal_batch1_ar(base_ctx, options):
    """EAGLE trees (the default dynamic tree and a smaller one) and chains at B = 4 (6 prompts: refill):
    every row == batch-1 ar, and == batch-1 eagle step by step (same accepted lengths)."""
    ar = build_decoder("ar", base_ctx, {"compile": "off"})
    dec = build_decoder("eagle", base_ctx, {"compile": "off", **options})
    tok = base_ctx.tokenizer
    prompts = prompts_of(tok)
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=(tok.eos_token_id,))
    want = batch1(ar, prompts, cfg)
    got = generate_batch(dec, prompts, cfg, 4)
    assert [g.tokens for g in got] == want
    assert [g.stats.accepted_lengths for g in got] == [dec.generate(p, cfg).stats.accepted_lengths for p in prompts]
    D = dec.depth
    for g in got:
        s = g.stats
        assert s.tokens_fed[1:] == [dec.total_tokens] * (s.nfe - 1) and max(s.accepted_lengths, default=1) <= D + 1
        assert s.draft_forwards == max(1, D * (s.nfe - 1))  # the prompt's pairs in the prefill, then D per step
    if D > 1:
        assert sum(g.stats.nfe for g in got) < sum(len(g.tokens) for g in got)
        assert max(max(g.stats.accepted_lengths) for g in got) > 2


NO_SHIFT = {"token_shift": "False"}
BD_SETTINGS = [{}, NO_SHIFT, {**NO_SHIFT, "steps": "4", "remasking": "random"}, {"block_cache": "False"},
               {**NO_SHIFT, "block_cache": "False", "sub_block": "4", "threshold": "0.5"},
               {**NO_SHIFT, "remasking": "low_confidence_dynamic", "threshold": "0.5", "separate_commit": "True"},
               {**NO_SHIFT, "remasking": "low_confidence_static", "steps": "4"},
               {**NO_SHIFT, "remasking": "sequential", "steps": "2"}]


@pytest.fixture(scope="module")
def bd_ctx():
    return DecoderContext(EMBEDDED / "bd", "cpu", "float32")


def _same_rows(got, want):
    assert [g.tokens for g in got] == [w.tokens for w in want]
    for g, w in zip(got, want):
        assert (g.stats.nfe, g.stats.tokens_fed, g.stats.accepted_lengths, g.finish_reason) == \
            (w.stats.nfe, w.stats.tokens_fed, w.stats.accepted_lengths, w.finish_reason)


@pytest.mark.parametrize("options", BD_SETTINGS)
def test_batched_bd_rows_equal_batch1_bd(bd_ctx, options):
    """bd is lossy, so the reference is batch-1 bd itself: the same tokens, forwards, tokens fed and
    tokens finalised per forward, row by row, for every option (token shift or not, with or without
    the block cache, SDAR's rules and separate commits), rows of mixed widths and phases in a step."""
    dec = build_decoder("bd", bd_ctx, {"compile": "off", **options})
    tok = bd_ctx.tokenizer
    prompts = prompts_of(tok, 5)
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=(tok.eos_token_id,))
    want = batch1_runs(dec, prompts, cfg)
    done = []
    got = generate_batch(dec, prompts, cfg, 4, on_done=lambda i, g: done.append(i))
    _same_rows(got, want)
    assert sorted(done) == list(range(len(prompts))) and len({len(g.stats.tokens_fed) for g in got}) > 1


@pytest.mark.parametrize("options", [{}, {**NO_SHIFT, "steps": "4", "remasking": "random"}])
def test_batched_bd_sampling_rows_equal_their_batch1_runs(bd_ctx, options):
    """Sampling at B = 4: every row draws from its own generator, seeded as it would be alone, so
    each row equals its own batch-1 sampled run with the same seed (and a different seed differs)."""
    dec = build_decoder("bd", bd_ctx, {"compile": "off", **options})
    prompts = prompts_of(bd_ctx.tokenizer, 5)
    cfg = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=1.0, seed=11))
    want = [dec.generate(p, cfg) for p in prompts]
    _same_rows(generate_batch(dec, prompts, cfg, 4), want)
    greedy = batch1_runs(dec, prompts, GenerationConfig(max_new_tokens=20))
    other = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=1.0, seed=12))
    assert [w.tokens for w in want] != [g.tokens for g in greedy]
    assert [g.tokens for g in generate_batch(dec, prompts, other, 4)] != [w.tokens for w in want]


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="torch.compile unavailable on CPU here")
def test_compiled_batched_bd_rows_equal_batch1_bd(bd_ctx):
    """Compiled block steps at B = 4 (one graph per width: B or 2B tokens per row, here both, mixed
    in one step; padded rows and empty slots inert) give the eager batch-1 rows. (Token shift's
    commit steps are B wide too: the eager tests cover their layouts.)"""
    eager = build_decoder("bd", bd_ctx, {"compile": "off", **NO_SHIFT})
    comp = build_decoder("bd", bd_ctx, {"compile": "on", **NO_SHIFT})
    tok = bd_ctx.tokenizer
    prompts = prompts_of(tok, 5)
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=(tok.eos_token_id,))
    _same_rows(generate_batch(comp, prompts, cfg, 4), batch1_runs(eager, prompts, cfg))
    assert comp.runner.compiled and comp.runner.compile_s > 0


def test_batch_of_one_and_more_slots_than_prompts(tidar_ctx):
    ar = build_decoder("ar", tidar_ctx, {"compile": "off"})
    dec = build_decoder("tidar", tidar_ctx, {})
    prompts = prompts_of(tidar_ctx.tokenizer, 3)
    cfg = GenerationConfig(max_new_tokens=16)
    want = batch1(ar, prompts, cfg)
    assert [g.tokens for g in generate_batch(dec, prompts, cfg, 1)] == want
    assert [g.tokens for g in generate_batch(dec, prompts, cfg, 8)] == want
    assert generate_batch(dec, [], cfg, 4) == []


def test_batched_bad_input(tidar_ctx):
    dec = build_decoder("tidar", tidar_ctx, {})
    cfg = GenerationConfig(max_new_tokens=4)
    with pytest.raises(UserError):
        generate_batch(dec, [[1, 2], []], cfg, 2)
    with pytest.raises(UserError):
        generate_batch(dec, [[1, 2]], cfg, 0)
    lossy = build_decoder("tidar", tidar_ctx, {"beta": "0.5"})  # tidar runs every option at B > 1 (test_tidar_rows.py)
    assert supports_batch(lossy) is None
    hf = build_decoder("hf", tidar_ctx, {})
    assert supports_batch(hf) is None  # hf batches itself (baselines/hf.py generate_batch, tests/test_hf_batch.py)


def test_eagle_trees_and_sampling_are_accepted(base_ctx):
    assert supports_batch(build_decoder("eagle", base_ctx, {})) is None


def test_speed_batch_size_writes_the_plot_format(tmp_path, capsys):
    """speed --batch-size: per (batch size, decoder) tokens/s, speedup vs the first decoder at the same
    batch size, paired ratios per round, no lossless mismatch; `plot` draws it."""
    from tidar_bench.cli import main
    from tidar_bench.report import read_speed_batch

    out = tmp_path / "speed.json"
    argv = ["speed", "--model", str(EMBEDDED / "tidar"), "--decoders", "ar,tidar", "--prompts-file", str(GSM),
            "--prompts", "3", "--max-new-tokens", "8", "--batch-size", "1,2", "--rounds", "2", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    rec = read_speed_batch(out)
    assert rec["batch_sizes"] == [1, 2] and rec["reference"] == "ar" and rec["command"].startswith("tidar-bench")
    for b in ("1", "2"):
        ar, td = rec["batch"][b]["ar"], rec["batch"][b]["tidar"]
        assert ar["speedup_vs_reference"] == 1.0 and len(td["paired_ratios"]) == 2
        assert td["speedup_vs_reference"] == pytest.approx(td["tokens_per_s"] / ar["tokens_per_s"])
        assert td["lossless_mismatches"] == 0 and ar["lossless_mismatches"] == 0
        assert td["tokens"] == ar["tokens"] and td["tokens_per_nfe"] > ar["tokens_per_nfe"]
        lat = td["per_sequence_latency_s"]
        assert 0 < lat["q1"] <= lat["median"] <= lat["q3"]
    assert main(["plot", str(out), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "speed_batch_speed.png").is_file()
    capsys.readouterr()
    bad = [argv[:-2] + ["--batch-size", "0,2"], [*argv[:4], "ar,dflash", *argv[5:-2]]]
    for a in bad:
        assert main(a) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err


def test_speed_batch_leaves_compilation_inside_a_round_out_of_decode_time():
    """A step shape first met inside a timed round compiles there (e.g. an EAGLE tree width the
    warm-up did not reach): speed_batch subtracts the compile seconds the decoder's runners report."""
    import time
    from types import SimpleNamespace

    from tidar_bench.batched import speed_batch
    from tidar_bench.decoding import DecodeStats, Generation, GenerationConfig

    class Fake:
        lossless = True
        model = SimpleNamespace(device=torch.device("cpu"))

        def __init__(self, compile_in_call: int | None):
            self.runner, self.calls, self.compile_in_call = SimpleNamespace(compile_s=0.0), 0, compile_in_call

        def runners(self):
            return [self.runner]

        def generate_batch(self, prompts, config, batch_size, on_done=None):
            self.calls += 1
            if self.calls == self.compile_in_call:  # "compiles" 0.3 s, then decodes
                time.sleep(0.3)
                self.runner.compile_s += 0.3
            time.sleep(0.01)
            return [Generation(list(p), None, DecodeStats(nfe=1), "length") for p in prompts]

    ref, late = Fake(None), Fake(2)  # call 1 is the warm-up: call 2 is the first timed round
    cell = speed_batch({"ref": ref, "late": late}, [[1, 2]], GenerationConfig(max_new_tokens=2), [1], rounds=2)["batch"]["1"]
    assert cell["late"]["compile_s_excluded"] == pytest.approx(0.3) and cell["ref"]["compile_s_excluded"] == 0.0
    assert cell["late"]["decode_s"] < 0.2  # two rounds of ~0.01 s, the 0.3 s compile left out
