"""The TiDAR authors' decoding rules as options of `tidar` (issue 22): they compose back to the exact
rule, the unverified first token is the prefill block's offset-0 argmax, the ratio test accepts with
frequency min(1, p/q) (and the check fails a wrong rule), the draft repetition penalty is transformers'
RepetitionPenaltyLogitsProcessor, and the lossy settings are labelled so and repeatable by seed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.checkpoint import TidarConfig
from tidar_bench.cli import main
from tidar_bench.harness.results import lossless_mismatches, lossy_mismatches, speed_stats
from tidar_bench.decoding import GenerationConfig, SamplingParams, ratio_verify, repetition_penalty
from tidar_bench.errors import UserError
from tidar_bench.masks import tidar_first_step, tidar_step
from tidar_bench.model import load_model
from tidar_bench.testing import make_hf_model
from tidar_bench.tidar import TidarDecoder
from tidar_bench.tidar_authors import penalised

V = 96
MASK = V - 2


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)  # tiny models: a second thread only waits on the shared 2-core machine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("authors")
    make_hf_model("qwen3", d, seed=1)
    TidarConfig(mask_token_id=MASK, block_size=4).save(d)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, "float32", "cpu")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_options_compose_back_to_the_exact_rule(model):
    """AR ratio 1, first token from AR, argmax-match (or ratio test at temperature 0, which is the
    same test), with either prefill: token for token the exact rule, i.e. AR greedy."""
    ar = ARDecoder(model)
    exact = TidarDecoder(model, mask_token_id=MASK, block_size=4)
    composed = [dict(rule="authors-greedy", first_token="ar"),
                dict(rule="authors", first_token="ar", ar_ratio=1.0, t0_as_t1=False),
                dict(prefill="two"), dict(accept="match", ar_ratio=1.0, draft_penalty=1.0)]
    decs = [TidarDecoder(model, mask_token_id=MASK, block_size=4, **o) for o in composed]
    assert decs[2].lossless and not decs[0].lossless  # prefill=two is timing only; the others are flagged
    for p in _prompts(3):
        cfg = GenerationConfig(max_new_tokens=13)
        ref = ar.generate(p, cfg).tokens
        assert exact.generate(p, cfg).tokens == ref
        for o, d in zip(composed, decs):
            g = d.generate(p, cfg)
            assert g.tokens == ref, o
            two = d.options()["prefill"] == "two"
            assert g.stats.prefill_forwards == g.stats.nfe - len(g.stats.accepted_lengths) == (2 if two else 1)
            assert g.stats.accept_length == pytest.approx(13 / (g.stats.nfe - (2 if two else 1)))
    assert max(a for p in _prompts(3) for a in exact.generate(p, GenerationConfig(max_new_tokens=13)).stats.accepted_lengths) > 1


def _block_offset0_argmax(model, prompt: list[int], k: int) -> int:
    """Independent of the decoder: prompt + k masks under the prefill mask, block row offset 0."""
    lay = tidar_first_step(len(prompt), k)
    ids = torch.tensor([prompt + [MASK] * k])
    out = model(ids, lay.positions(), tidar_step(lay))
    return int(out.logits[0, len(prompt)].argmax())


def test_first_token_from_diffusion_is_the_prefill_block_offset0(model):
    ar = ARDecoder(model)
    differ = 0
    for p in _prompts(4, seed=1):
        want = _block_offset0_argmax(model, p, 4)
        for opts in (dict(first_token="diffusion"), dict(rule="authors-greedy"), dict(rule="authors", seed=3)):
            d = TidarDecoder(model, mask_token_id=MASK, block_size=4, **opts)
            g = d.generate(p, GenerationConfig(max_new_tokens=6))
            assert g.tokens[0] == want, opts
            assert not d.lossless and d.options()["lossless"] is False
        differ += want != ar.generate(p, GenerationConfig(max_new_tokens=1)).tokens[0]
    assert differ > 0  # on a random model the unverified first token is visibly not AR's


def test_authors_rule_is_seeded_and_reports_its_options(model, tmp_path):
    make_hf_model("llama", tmp_path, seed=3, vocab_size=8)  # flat distributions: the ratio test rejects often
    tiny = load_model(tmp_path, "float32", "cpu")
    cfg = GenerationConfig(max_new_tokens=16)
    def run(seed):
        # ar_ratio=1: the AR rows at temperature 1 against the diffusion q (r = 0 accepts everything here)
        g = TidarDecoder(tiny, mask_token_id=6, block_size=3, rule="authors", ar_ratio=1.0, seed=seed).generate([1, 2], cfg)
        return tuple(g.tokens), tuple(g.stats.accepted_lengths)

    runs = {s: run(s) for s in (0, 1, 2)}
    assert run(1) == runs[1]
    assert len(set(runs.values())) > 1  # temperature 0 runs as temperature 1: the ratio test depends on the seed
    o = TidarDecoder(model, mask_token_id=MASK, block_size=4, rule="authors", draft_penalty=1.2).options()
    assert (o["rule"], o["first_token"], o["prefill"], o["ar_ratio"], o["accept"], o["draft_penalty"],
            o["t0_as_t1"], o["lossless"]) == ("authors", "diffusion", "two", 0.0, "ratio", 1.2, True, False)
    with pytest.raises(UserError):
        TidarDecoder(model, mask_token_id=MASK, block_size=4, rule="authors", max_blocks=2)
    with pytest.raises(UserError):
        TidarDecoder(model, mask_token_id=MASK, block_size=4, rule="sglang")
    with pytest.raises(UserError):
        TidarDecoder(model, mask_token_id=MASK, block_size=4, ar_ratio=0.5, beta=0.5)


def _binomial_ok(hits: int, n: int, prob: float) -> bool:
    """Within 4.5 standard deviations (a correct rule fails with probability < 1e-5)."""
    return abs(hits - n * prob) <= 4.5 * math.sqrt(n * prob * (1 - prob)) + 1e-9


def test_ratio_test_accepts_with_min_1_p_over_q():
    """Two drafts: d_1 with p/q = 0.2/0.5, d_2 with p/q = 0.9/0.6 (always accepted once reached):
    P(n >= 1) = 0.4, P(n = 2) = 0.4. A rule accepting with probability p (no division) fails."""
    drafts = torch.tensor([1, 2])
    q = torch.tensor([0.5, 0.6])
    p = torch.zeros(3, 4)
    p[0, 1], p[1, 2] = 0.2, 0.9
    g = torch.Generator().manual_seed(0)
    N = 6000
    ns = [ratio_verify(drafts, q, p, g) for _ in range(N)]
    assert _binomial_ok(sum(n >= 1 for n in ns), N, 0.4)
    assert sum(n == 2 for n in ns) == sum(n >= 1 for n in ns)  # p/q >= 1: accepted whenever reached
    assert ratio_verify(drafts[:0], q[:0], p, g) == 0
    wrong = [int(torch.rand(1, generator=g) < 0.2) for _ in range(N)]  # accept iff u < p
    assert not _binomial_ok(sum(wrong), N, 0.4)


def test_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 3
    proc = RepetitionPenaltyLogitsProcessor(1.2)
    for ctx in ([3], [3, 3, 17], [0, 49, 5, 5, 12]):
        ids = torch.tensor(ctx)
        assert torch.equal(repetition_penalty(logits[0], ids, 1.2), proc(ids[None], logits[:1].clone())[0])
    # the block-sequential use (variant C): row o penalised for the offset-0 token + earlier picks
    got = penalised(logits, first=9, penalty=1.2)
    ctx = [9]
    for o in range(logits.shape[0]):
        want = proc(torch.tensor([ctx]), logits[o : o + 1].clone())[0]
        assert torch.equal(got[o], want)
        ctx.append(int(want.argmax()))


def test_speed_reports_conventions_and_lossy_mismatches(ckpt, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "--model", str(ckpt), "--decoders", "ar,tidar,tidar(rule=authors-greedy)", "--prompts", "3",
                 "--prompt-len", "5", "--max-new-tokens", "10", "--device", "cpu", "--compile", "off",
                 "--out", str(out)]) == 0  # a lossy decoder's mismatches are no failure
    text = capsys.readouterr().out
    assert "acc.len" in text and "τ" in text and "lossy" in text
    decs = json.loads(out.read_text())["decoders"]
    exact, authors = decs["tidar"], decs["tidar(rule=authors-greedy)"]
    assert exact["lossless"] and exact["lossless_mismatches"] == 0 and exact["lossy_mismatches"] is None
    assert not authors["lossless"] and authors["lossless_mismatches"] is None and authors["lossy_mismatches"] >= 1
    assert authors["options"]["first_token"] == "diffusion" and authors["options"]["prefill"] == "two"
    for d in (exact, authors):
        assert d["tokens_per_nfe"] == pytest.approx(d["tokens"] / d["nfe"])
        assert d["accept_length"] == pytest.approx(d["tokens"] / d["decode_forwards"])
        assert d["decode_forwards"] == d["nfe"] - 3 * d["options"]["prefill"].count("two") - 3  # 1 or 2 per prompt
        assert len(d["e2e_latency_s"]) == len(d["tpot_s"]) == 3


def test_run_records_count_the_conventions_and_lossy_mismatches():
    def rec(item, tokens, lossless, prefill=1, acc=(3, 2)):
        return {"item": item, "tokens": tokens, "greedy": True, "lossless": lossless, "new_tokens": len(tokens),
                "nfe": prefill + len(acc), "accepted_lengths": list(acc), "latency_s": 1.0, "prefill_forwards": prefill}

    ar = [rec("a", [1, 2, 3, 4, 5, 6], True), rec("b", [1, 2, 3, 4, 5, 6], True)]
    lossy = [rec("a", [1, 2, 3, 4, 5, 6], False, 2), rec("b", [1, 2, 3, 4, 5, 9], False, 2)]
    assert lossy_mismatches(lossy, ar) == 1 and lossless_mismatches(lossy, ar) is None
    assert lossy_mismatches(ar, ar) is None and lossless_mismatches(ar, ar) == 0
    st = speed_stats(lossy)
    # 12 tokens; 8 forwards of which 4 prefill; 4 decoding steps committing 3, 2, 3, 2
    assert (st["tokens_per_nfe"], st["accept_length"], st["mean_accepted_length"]) == (1.5, 3.0, 2.5)


def test_generate_ignore_eos(ckpt, capsys):
    """The checkpoint's EOS (generation_config.json eos_token_id) set to the first token AR emits: it stops at once,
    unless --ignore-eos."""
    import shutil

    cfg = json.loads((ckpt / "config.json").read_text())
    first = ARDecoder(load_model(ckpt, "float32", "cpu")).generate([1, 2, 3], GenerationConfig(max_new_tokens=1)).tokens[0]
    d = ckpt.parent / "eos"
    shutil.copytree(ckpt, d, dirs_exist_ok=True)
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": first}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    for extra, n in (([], 0), (["--ignore-eos"], 6)):
        assert main(["generate", "--model", str(d), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--device", "cpu",
                     "--json", *extra]) == 0
        assert len(json.loads(capsys.readouterr().out)["tokens"]) == n


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from tidar_bench.testing import make_tidar_lm_replica

    return make_tidar_lm_replica(tmp_path_factory.mktemp("tidar_lm"), tied=False)


def test_tidar_lm_replica_loads_with_the_preset_and_decodes_exactly(replica, capsys):
    from tidar_bench.registry import DecoderContext, build_decoder
    from tidar_bench.training.tidar import TidarObjective

    assert not (replica / "tidar_config.json").exists()
    ctx = DecoderContext(replica, device="cpu", dtype="float32")
    td = build_decoder("tidar", ctx, {"block_size": "3"})  # k = 16 is the preset's; 3 keeps 151936-wide rows cheap
    o = td.options()
    assert (o["mask_token_id"], o["block_size"], o["lossless"]) == (151662, 3, True)
    assert o["config_source"] == "preset tidar-lm (recognised from architectures TiDARForCausalLM)"
    assert o["convention_check"]["prompts"] == 4 and o["convention_check"]["verdict"] in ("unshifted",
                                                                                        "looks shifted by one position")
    assert "from preset tidar-lm" in capsys.readouterr().err
    ar = build_decoder("ar", ctx, {})
    for p in ([1, 2, 3], [500, 151000, 7]):
        cfg = GenerationConfig(max_new_tokens=8)
        assert td.generate(p, cfg).tokens == ar.generate(p, cfg).tokens
    chosen = build_decoder("tidar", ctx, {"preset": "tidar-lm", "block_size": "2"}).options()["config_source"]
    assert chosen == "preset tidar-lm (chosen explicitly)"
    with pytest.raises(UserError):
        build_decoder("tidar", ctx, {"preset": "nope"})
    # `train tidar --base` on it continues in the preset: its mask token (no new one) and k = 16
    obj = TidarObjective.from_checkpoint(replica, None, "cpu")
    assert (obj.mask_id, obj.block_size, obj.module().config.vocab_size) == (151662, 16, 151936)


def _naive_authors_greedy(model, prompt: list[int], k: int, max_new: int) -> list[int]:
    """Variant A (tidar-official.md 4.2) written from the reading of the authors' worker, with no
    cache and a hand-built mask: every step re-reads the whole sequence + their fed layout
    [d_0..d_{k-1} | k blocks of k masks, block j at P+j.. seeing d_0..d_{j-1}]."""
    L = len(prompt)
    n = L + k
    m = torch.zeros(n, n, dtype=torch.bool)
    m[:L, :L] = torch.ones(L, L).tril().bool()
    m[L:, :] = True  # the prefill block sees the whole prompt and itself
    pos = torch.cat([torch.arange(L), torch.arange(L, L + k)])
    d = model(torch.tensor([prompt + [MASK] * k]), pos, m).logits[0, L:].argmax(-1).tolist()
    seq, out = list(prompt), []
    while len(out) < max_new:
        P = len(seq)
        n = P + k + k * k
        m = torch.zeros(n, n, dtype=torch.bool)
        m[: P + k, : P + k] = torch.ones(P + k, P + k).tril().bool()
        pos = list(range(P + k))
        for j in range(1, k + 1):
            s = P + k + (j - 1) * k
            m[s : s + k, :P + j] = True
            m[s : s + k, s : s + k] = True
            pos += range(P + j, P + j + k)
        logits = model(torch.tensor([seq + d + [MASK] * (k * k)]), torch.tensor(pos), m).logits[0]
        ar = logits[P : P + k].argmax(-1).tolist()
        a = 1
        while a < k and ar[a - 1] == d[a]:
            a += 1
        seq += d[:a]
        out += d[:a]
        s = P + k + (a - 1) * k
        d = logits[s : s + k].argmax(-1).tolist()
    return out[:max_new]


def test_authors_greedy_equals_a_naive_reading_of_their_worker(model):
    for k in (2, 4):
        td = TidarDecoder(model, mask_token_id=MASK, block_size=k, rule="authors-greedy")
        for p in _prompts(3, seed=4):
            assert td.generate(p, GenerationConfig(max_new_tokens=12)).tokens == _naive_authors_greedy(model, p, k, 12)


def test_tidar_lm_check_script_replica_mode(tmp_path):
    """scripts/tidar_lm_check.sh must never rot: its REPLICA=1 mode runs every step on a tiny random
    checkpoint in the exact TiDAR-LM layout (vocab 151936, TiDARForCausalLM, no side file)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "tidar-lm"
    env = {**os.environ, "PYTHON": sys.executable, "REPLICA": "1", "OUT": str(out), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "scripts/tidar_lm_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=1500)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + log[-3000:]
    replica = json.loads((out / "TiDAR-replica" / "config.json").read_text())
    assert replica["architectures"] == ["TiDARForCausalLM"] and replica["vocab_size"] == 151936
    assert not (out / "TiDAR-replica" / "tidar_config.json").exists()
    opts = json.loads((out / "tidar_options.json").read_text())
    assert (opts["mask_token_id"], opts["block_size"]) == (151662, 16) and opts["convention_check"]["prompts"] == 4
    speed = json.loads((out / "speed_authors_workload.json").read_text())
    assert speed["ignore_eos"] and speed["n_prompts"] == 4
    assert set(speed["decoders"]) == {"ar", "tidar", "tidar(rule=authors)", "tidar(rule=authors-greedy)"}
    assert speed["decoders"]["tidar"]["lossless_mismatches"] == 0
    assert all(d["tokens"] == 4 * 6 for d in speed["decoders"].values())  # EOS ignored: exactly 6 tokens each
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["mismatches_vs_ar"]["tidar"] == 0
    assert run["decoders"]["tidar(rule=authors)"]["resolved"]["config_source"].startswith("preset tidar-lm")
    commands = (out / "commands.txt").read_text()
    assert commands.count("tidar_bench.cli speed") == 1 and commands.count("tidar_bench.cli run") == 1


def test_authors_workload_draws_as_the_authors_do():
    """HumanEval 0-shot: the context is the document's prompt; the whole file is shuffled with
    random.seed(227) and the first N taken (bench_serving's sharegpt sampling)."""
    import random

    from tidar_bench.harness.tasks import load_splits
    from tidar_bench.harness.workload import authors_prompts

    got = authors_prompts(per_task=3, tasks=("tb_humaneval",))["tb_humaneval"]
    docs = load_splits("humaneval")["test"]
    idx = list(range(len(docs)))
    random.seed(227)
    random.shuffle(idx)
    assert got == [docs[i]["prompt"] for i in idx[:3]]


class _ConventionStub:
    """A stand-in model for `convention_check`: the AR row of the prompt's last position predicts 3, the
    AR row one position later predicts 5, and the prefill block's offset 0 predicts 3 (our convention:
    a mask predicts its own position) or 5 (shifted by one)."""

    device = torch.device("cpu")

    def __init__(self, shifted: bool):
        self.shifted = shifted

    def __call__(self, ids, positions=None, mask=None, *args, **kwargs):
        from types import SimpleNamespace

        logits = torch.zeros(1, ids.shape[1], V)
        if mask is None:  # the prompt + its AR token: the next position's AR prediction
            logits[0, -1, 5] = 1
        else:  # the prefill: prompt + k masks
            L = int((ids[0] != MASK).sum())
            logits[0, L - 1, 3] = 1
            logits[0, L, 5 if self.shifted else 3] = 1
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("shifted", [False, True])
def test_convention_check_tells_a_shifted_checkpoint(shifted):
    from tidar_bench.checkpoint import convention_check

    out = convention_check(_ConventionStub(shifted), MASK, 4, _prompts(3))
    assert out["verdict"] == ("looks shifted by one position" if shifted else "unshifted")
    assert out["offset0_agrees_with_ar_next_position"] == (1.0 if shifted else 0.0)
    assert out["offset0_agrees_with_ar_same_position"] == (0.0 if shifted else 1.0)
