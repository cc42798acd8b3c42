"""profile-latency: outputs, knee detection, speedup prediction, the TiDAR mask is the decoder's."""

import csv
import json

import pytest
import torch

from tidar_bench import profiling as prof
from tidar_bench.checkpoint import TidarConfig
from tidar_bench.cli import main
from tidar_bench.decoding import GenerationConfig
from tidar_bench.registry import DecoderContext, build_decoder


def test_profile_writes_csv_json_and_images(tmp_path):
    out = tmp_path / "lat"
    argv = ["profile-latency", "--config", "tiny", "--context", "16,64", "--slots", "1,2,4,8", "--block-size", "2,3",
            "--repeats", "3", "--warmup", "1", "--tnfe", "2=1.5,3=2.0", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "latency.csv").open()))
    assert len(rows) == 2 * (4 + 2)
    assert {r["mask"] for r in rows} == {"causal", "tidar"}
    tidar_rows = [r for r in rows if r["mask"] == "tidar"]
    assert sorted(int(r["slots"]) for r in tidar_rows) == [6, 6, 12, 12]  # k + k*k
    rec = json.loads((out / "latency.json").read_text())
    assert rec["label"] == "CPU" and set(rec["knee"]) == {"16", "64"}
    assert set(rec["predicted_speedup"]["16"]) == {"2", "3"} and rec["recommended_block_size"]["16"] in (2, 3)
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "latency.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real, non-blank picture
    assert (out / "latency.svg").read_text().lstrip().startswith("<?xml")


def test_knee_on_synthetic_curves():
    flat_then_linear = {n: (1.0 if n <= 32 else n / 32) for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert prof.knee(flat_then_linear, 0.1) == 32
    assert prof.knee({1: 1.0, 2: 1.05, 4: 1.3, 8: 1.0}, 0.1) == 2  # contiguous from 1: a late dip does not count
    assert prof.knee({1: 1.0, 2: 2.0, 4: 4.0}, 0.1) == 1  # never flat
    assert prof.knee({1: 1.0, 2: 1.19, 4: 1.21}, 0.2) == 2
    with pytest.raises(ValueError):
        prof.knee({2: 1.0}, 0.1)


def test_speedup_prediction_picks_best_block_size():
    tnfe = {4: 3.0, 8: 5.0, 16: 6.0}
    step = {4: 1.1, 8: 1.3, 16: 3.0}  # latency(1) = 1.0
    pred = prof.predict_speedup(tnfe, 1.0, step)
    assert pred == pytest.approx({4: 3.0 / 1.1, 8: 5.0 / 1.3, 16: 2.0})
    assert max(pred, key=pred.get) == 8
    assert prof.interpolate({1: 1.0, 8: 2.0}, 4) == pytest.approx(1.0 + 3 / 7)
    assert prof.parse_tnfe("4=3.1,8=5.2") == {4: 3.1, 8: 5.2}


@pytest.mark.parametrize("k", [2, 4])
def test_tidar_mask_is_the_decoders_step_mask(tiny_llama, tmp_path, k):
    """Record the mask and positions the TiDAR decoder feeds in a steady-state step (k-1 drafts,
    all k outcome blocks) and compare with what the profiler times for the same cache length."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in tiny_llama.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    TidarConfig(mask_token_id=90, block_size=k).save(d)
    ctx = DecoderContext(d, "cpu", "float32")
    dec = build_decoder("tidar", ctx)
    seen = []
    forward = ctx.model.forward

    def spy(ids, pos=None, mask=None, cache=None, **kw):
        seen.append((cache.length, pos.clone(), mask.clone()))
        return forward(ids, pos, mask, cache, **kw)

    ctx.model.forward = spy
    dec.generate([1, 2, 3, 4, 5], GenerationConfig(max_new_tokens=12))
    steady = [s for s in seen[1:] if s[2].shape[0] == prof.tidar_slots(k)]
    assert steady, "no steady-state step observed"
    for P, pos, mask in steady:
        want_pos, want_mask = prof.step_inputs("tidar", P, k, "cpu")
        assert torch.equal(pos, want_pos) and torch.equal(mask, want_mask)


def test_profile_bad_input(tmp_path, tiny_llama, capsys):
    cases = [
        ["profile-latency", "--config", "nope", "--out", str(tmp_path / "a")],
        ["profile-latency", "--out", str(tmp_path / "a")],
        ["profile-latency", "--config", "tiny", "--model", str(tiny_llama), "--out", str(tmp_path / "a")],
        ["profile-latency", "--config", "tiny", "--slots", "0,1", "--out", str(tmp_path / "a")],
        ["profile-latency", "--config", "tiny", "--context", "4090", "--slots", "1,64", "--out", str(tmp_path / "a")],
        ["profile-latency", "--config", "tiny", "--mask", "weird", "--out", str(tmp_path / "a")],
        ["profile-latency", "--config", "tiny", "--tnfe", "x=y", "--out", str(tmp_path / "a")],
    ]
    if not torch.cuda.is_available():
        cases.append(["profile-latency", "--config", "tiny", "--device", "cuda", "--out", str(tmp_path / "a")])
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)
    assert not (tmp_path / "a").exists()
    capsys.readouterr()
    main(["profile-latency", "--config", "nope", "--out", str(tmp_path / "a")])
    assert "qwen2.5-1.5b" in capsys.readouterr().err
