"""profile-latency: outputs, knee detection, speedup prediction, the TiDAR mask is the decoder's."""

import csv
import json

import pytest
import torch

from tidar_bench import masks
from tidar_bench import profiling as prof
from tidar_bench.checkpoint import TidarConfig
from tidar_bench.cli import main
from tidar_bench.cli.profile import parse_ints
from tidar_bench.decoding import GenerationConfig
from tidar_bench.errors import UserError
from tidar_bench.registry import DecoderContext, build_decoder


def test_profile_writes_csv_json_and_images(tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["profile-latency", "--config", "tiny", "--context", "16,64", "--slots", "2,4,8", "--block-size", "2",
            "--repeats", "3", "--warmup", "1", "--tnfe", "2=1.5,3=2.0", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out  # a progress line per measured point, as it is measured
    assert "[1/12] batch 1, context 16, 1 slots: " in printed and "[12/12] batch 1, context 64, TiDAR k=3 (12 slots): " in printed
    rows = list(csv.DictReader((out / "latency.csv").open()))
    assert list(rows[0])[:7] == ["context", "slots", "median_ms", "q1_ms", "q3_ms", "repeats", "mask"]
    # slots 1 is always added; k=3 comes from --tnfe and is measured, not interpolated
    assert len(rows) == 2 * (4 + 2)
    tidar_rows = [r for r in rows if r["mask"] == "tidar"]
    assert sorted((int(r["block_size"]), int(r["slots"])) for r in tidar_rows) == [(2, 6), (2, 6), (3, 12), (3, 12)]
    for r in rows:
        assert float(r["q1_ms"]) <= float(r["median_ms"]) <= float(r["q3_ms"]) and int(r["repeats"]) == 3
    rec = json.loads((out / "latency.json").read_text())
    assert rec["label"] == "CPU" and "perf_counter" in rec["timer"] and rec["dtype"] == "float32"
    assert rec["cpu_compile_rule"] == "cpp-wrapper" and 0 < rec["params"] < 1e6
    assert rec["environment"]["threads"] >= 1 and rec["environment"]["device_name"].endswith("threads")
    assert rec["command"].startswith("tidar-bench profile-latency --config tiny --context 16,64")
    assert set(rec["knee"]) == {"16", "64"}
    for C in ("16", "64"):
        curve = {p["slots"]: p["median_ms"] for p in rec["points"] if p["context"] == int(C) and p["mask"] == "causal"}
        assert rec["knee"][C] == prof.knee(curve, 0.1)
        step = {p["block_size"]: p["median_ms"] for p in rec["points"] if p["context"] == int(C) and p["mask"] == "tidar"}
        want = {"2": 1.5 * curve[1] / step[2], "3": 2.0 * curve[1] / step[3]}
        assert rec["predicted_speedup"][C] == pytest.approx(want)
        assert rec["recommended_block_size"][C] == int(max(want, key=want.get))
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "latency.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real, non-blank picture
    svg = (out / "latency.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temp files


def test_causal_mode_measures_tidar_slot_counts(tmp_path):
    out = tmp_path / "lat"
    argv = ["profile-latency", "--config", "tiny", "--context", "8", "--slots", "1,2", "--mask", "causal",
            "--repeats", "1", "--warmup", "0", "--tnfe", "2=1.5", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rec = json.loads((out / "latency.json").read_text())
    assert sorted(p["slots"] for p in rec["points"]) == [1, 2, 6]  # k + k*k for k = 2 added to the sweep
    assert {p["mask"] for p in rec["points"]} == {"causal"}
    lat = {p["slots"]: p["median_ms"] for p in rec["points"]}
    assert rec["predicted_speedup"]["8"]["2"] == pytest.approx(1.5 * lat[1] / lat[6])


def test_knee_on_synthetic_curves():
    flat_then_linear = {n: (1.0 if n <= 32 else n / 32) for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert prof.knee(flat_then_linear, 0.1) == 32
    # within tolerance is flat: 64 costs 1.09 x lat(1) <= 1.1
    assert prof.knee({1: 1.0, 2: 1.0, 64: 1.09, 128: 1.5}, 0.1) == 64
    assert prof.knee({1: 1.0, 2: 1.05, 4: 1.3, 8: 1.0}, 0.1) == 2  # contiguous from 1: a late dip does not count
    assert prof.knee({1: 1.0, 2: 2.0, 4: 4.0}, 0.1) == 1  # never flat
    assert prof.knee({1: 1.0}, 0.1) == 1
    assert prof.knee({1: 1.0, 2: 1.19, 4: 1.21}, 0.2) == 2
    with pytest.raises(ValueError):
        prof.knee({2: 1.0}, 0.1)


def test_quartiles():
    assert prof.quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (3.0, 2.0, 4.0)
    assert prof.quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_speedup_prediction_picks_best_block_size():
    tnfe = {4: 3.0, 8: 5.0, 16: 6.0}
    step = {4: 1.1, 8: 1.3, 16: 3.0}  # latency(1) = 1.0
    pred = prof.predict_speedup(tnfe, 1.0, step)
    assert pred == pytest.approx({4: 3.0 / 1.1, 8: 5.0 / 1.3, 16: 2.0})
    assert prof.best_block_size(pred) == 8
    # more drafts per step are not worth it once the step is no longer free
    assert prof.best_block_size(prof.predict_speedup(tnfe, 1.0, {4: 1.0, 8: 2.0, 16: 3.0})) == 4
    assert prof.predict_speedup({4: 3.0, 8: 5.0}, 1.0, {4: 1.0}) == {4: 3.0}  # unmeasured k left out
    assert prof.best_block_size({}) is None


def test_parse_tnfe_forms(tmp_path, tiny_llama):
    assert prof.parse_tnfe("4=3.1,8=5.2") == {4: 3.1, 8: 5.2}
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("k,tidar_T_per_NFE,speedup_vs_ar\n2,1.7,1.2\n4,2.4,1.4\n")
    assert prof.parse_tnfe(str(sweep)) == {2: 1.7, 4: 2.4}
    run = tmp_path / "run"
    run.mkdir()
    run.joinpath("run.json").write_text(json.dumps({"identity": {"model": str(tiny_llama)}, "decoders": {
        "tidar": {"options": {"block_size": 8}, "tokens_per_nfe": 3.5}}}))
    assert prof.parse_tnfe(f"{run},2=1.5") == {8: 3.5, 2: 1.5}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    TidarConfig(mask_token_id=90, block_size=16).save(ckpt)
    run.joinpath("run.json").write_text(json.dumps({"identity": {"model": str(ckpt)}, "decoders": {
        "tidar": {"options": {"block_size": None}, "tokens_per_nfe": 4.0}}}))
    assert prof.parse_tnfe(str(run)) == {16: 4.0}  # block size from the checkpoint's tidar_config.json
    for bad in ("x=y", "4=0", str(tmp_path / "missing.csv"), str(tmp_path)):
        with pytest.raises(UserError):
            prof.parse_tnfe(bad)


def test_parse_ints_progressions():
    assert parse_ints("1,2,4,...,512", "--slots") == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert parse_ints("1,2,4,...,100", "--slots") == [1, 2, 4, 8, 16, 32, 64, 100]
    assert parse_ints("8,16,...,40", "--slots") == [8, 16, 32, 40]  # geometric x2
    assert parse_ints("3,5,...,11", "--slots") == [3, 5, 7, 9, 11]  # arithmetic +2
    assert parse_ints("512, 1024", "--context") == [512, 1024]
    for bad in ("1,...,8", "a,b", "4,2,...,1", "1,2,...", ""):
        with pytest.raises(UserError):
            parse_ints(bad, "--slots")


def test_causal_path_is_masks_causal(tiny_llama):
    """The causal curve feeds mask=None (the model's causal path, as the AR decoder does): it must
    be the same computation as the explicit masks.causal mask."""
    from tidar_bench.model import load_model

    model = load_model(tiny_llama, "float32", "cpu")
    cache = model.new_cache(64)
    model(torch.arange(20)[None], cache=cache)
    for n in (1, 5):
        f = prof.step_inputs("causal", 20, n)
        ids = torch.arange(30, 30 + n)[None]
        a = model(ids, f.positions, f.mask, cache).logits
        cache.crop(20)
        b = model(ids, f.positions, masks.causal(n, 20), cache).logits
        cache.crop(20)
        assert f.mask is None and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_tidar_mask_is_the_decoders_step_mask(tiny_llama, tmp_path, k):
    """Record the mask, positions and logits rows the TiDAR decoder feeds in a steady-state step
    (k-1 drafts, all k outcome blocks) and compare with what the profiler times for that cache length."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in tiny_llama.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    TidarConfig(mask_token_id=94, block_size=k).save(d)  # vocab 96, eos 95
    ctx = DecoderContext(d, "cpu", "float32")
    dec = build_decoder("tidar", ctx)
    seen = []
    forward = ctx.model.forward

    def spy(ids, pos=None, mask=None, cache=None, **kw):
        seen.append((cache.length, pos.clone(), mask.clone(), kw.get("logits_index")))
        return forward(ids, pos, mask, cache, **kw)

    ctx.model.forward = spy
    dec.generate([1, 2, 3, 4, 5], GenerationConfig(max_new_tokens=12))
    steady = [s for s in seen[1:] if s[2].shape[0] == prof.tidar_slots(k)]
    assert len(steady) >= 2, "no steady-state step observed"
    for P, pos, mask, rows in steady:
        f = prof.step_inputs("tidar", P, k)
        assert f.n == prof.tidar_slots(k) and f.block_size == k
        assert torch.equal(pos, f.positions) and torch.equal(mask, f.mask)
        assert torch.equal(torch.as_tensor(rows).cpu(), f.logits_index)


def test_profile_bad_input(tmp_path, tiny_llama, capsys):
    a = str(tmp_path / "a")
    cases = [
        ["profile-latency", "--config", "nope", "--out", a],
        ["profile-latency", "--out", a],
        ["profile-latency", "--config", "tiny", "--model", str(tiny_llama), "--out", a],
        ["profile-latency", "--config", "tiny", "--slots", "0,1", "--out", a],
        ["profile-latency", "--config", "tiny", "--block-size", "0", "--out", a],
        ["profile-latency", "--config", "tiny", "--context", "4090", "--slots", "1,64", "--out", a],
        ["profile-latency", "--config", "tiny", "--context", "4000", "--block-size", "16", "--slots", "1", "--out", a],
        ["profile-latency", "--model", str(tiny_llama), "--context", "4096", "--out", a],
        ["profile-latency", "--config", "tiny", "--mask", "weird", "--out", a],
        ["profile-latency", "--config", "tiny", "--tnfe", "x=y", "--out", a],
        ["profile-latency", "--config", "tiny", "--slots", "1,two", "--out", a],
        ["profile-latency", "--config", "tiny", "--device", "cpu", "--cuda-graphs", "--out", a],
    ]
    if not torch.cuda.is_available():
        cases.append(["profile-latency", "--config", "tiny", "--device", "cuda", "--out", a])
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)
    assert not (tmp_path / "a").exists()
    main(["profile-latency", "--config", "nope", "--out", a])
    err = capsys.readouterr().err
    assert all(n in err for n in ("qwen2.5-1.5b", "qwen3-4b", "qwen3-8b", "llama-3.1-8b", "tiny"))
    # an existing folder of something else is refused, not overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["profile-latency", "--config", "tiny", "--out", str(other)]) == 2


def test_bf16_on_cpu_is_allowed_and_noted(tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["profile-latency", "--config", "tiny", "--context", "8", "--slots", "1,4", "--mask", "causal",
            "--dtype", "bf16", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 0
    assert "bfloat16 on CPU" in capsys.readouterr().out
    rec = json.loads((out / "latency.json").read_text())
    assert rec["dtype"] == "bfloat16" and rec["notes"] and "bfloat16 on CPU" in rec["notes"][0]


def test_shipped_configs_have_the_public_shapes():
    """Spot-check the values that decide latency against the public HF config.json files."""
    want = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tie, max_pos, rope_theta
        "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 128, 151936, True, 131072, 1e6),
        "qwen3-4b": (2560, 9728, 36, 32, 8, 128, 151936, True, 40960, 1e6),
        "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936, False, 40960, 1e6),
        "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, False, 131072, 5e5),
    }
    from tidar_bench.model import ModelConfig

    for name, w in want.items():
        c = ModelConfig.from_dict(prof.shipped_config(name))
        got = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
               c.head_dim, c.vocab_size, c.tie_word_embeddings, c.max_position_embeddings, c.rope_theta)
        assert got == w, name
    llama = ModelConfig.from_dict(prof.shipped_config("llama-3.1-8b"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    assert ModelConfig.from_dict(prof.shipped_config("qwen3-8b")).qk_norm


def test_profile_batch_sizes(tmp_path):
    """--batch: every forward feeds B rows, knee and prediction per batch size against lat_B(1)."""
    out = tmp_path / "lat"
    argv = ["profile-latency", "--config", "tiny", "--context", "8,32", "--slots", "2,4", "--block-size", "2",
            "--batch", "1,3", "--repeats", "2", "--warmup", "0", "--tnfe", "2=1.5", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "latency.csv").open()))
    assert sorted({int(r["batch"]) for r in rows}) == [1, 3] and len(rows) == 2 * 2 * (3 + 1)
    rec = json.loads((out / "latency.json").read_text())
    assert rec["batch_sizes"] == [1, 3] and "--batch 1,3" in rec["command"]
    for B in (1, 3):
        here = [p for p in rec["points"] if p["batch"] == B]
        by = rec["by_batch"][str(B)]
        for C in (8, 32):
            curve = {p["slots"]: p["median_ms"] for p in here if p["context"] == C and p["mask"] == "causal"}
            step = {p["block_size"]: p["median_ms"] for p in here if p["context"] == C and p["mask"] == "tidar"}
            assert by["knee"][str(C)] == prof.knee(curve, 0.1)
            assert by["ar_tokens_per_s"][str(C)] == pytest.approx(1e3 * B / curve[1])
            assert by["predicted_speedup"][str(C)]["2"] == pytest.approx(1.5 * curve[1] / step[2])
    assert rec["knee"] == rec["by_batch"]["1"]["knee"]  # the top-level fields are the first batch size's
    import matplotlib.image as mpimg

    for name in ("latency.png", "latency_batch.png"):
        img = mpimg.imread(out / name)
        assert img.shape[0] > 100 and img.std() > 0
    assert (out / "latency_batch.svg").is_file()
    assert main(["profile-latency", "--config", "tiny", "--batch", "0,2", "--out", str(tmp_path / "b")]) == 2


def test_measure_feeds_every_row(tiny_llama):
    """A batch-B point times forwards of B rows over a B-row cache prefilled to the context."""
    from tidar_bench.model import load_model

    model = load_model(tiny_llama, "float32", "cpu")
    seen = []
    forward = model.forward

    def spy(ids, pos=None, mask=None, cache=None, **kw):
        seen.append((tuple(ids.shape), cache.length, cache.k[0].shape[0]))
        return forward(ids, pos, mask, cache, **kw)

    model.forward = spy
    points = prof.measure(model, [10], [1, 3], [2], repeats=1, warmup=0, batches=[4])
    assert {(p.batch, p.slots, p.mask) for p in points} == {(4, 1, "causal"), (4, 3, "causal"), (4, 6, "tidar")}
    timed = [s for s in seen if s[1] == 10]
    assert timed and all(s[0][0] == 4 and s[2] == 4 for s in timed)
    assert sum(s[0][1] for s in seen if s[1] < 10) == 10  # the prefill filled every row to the context
