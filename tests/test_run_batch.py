"""`tidar-bench run --batch-size B` (issue 17): the embedded TiDAR checkpoint with `ar` and `tidar` on
the shipped mini_gsm task (--include-path tasks/: no index of lm-eval's builtin tasks) decodes, item
by item, the same tokens and outputs at batch 4 as at batch 1; the folder records the batch size
(run.json, summary.csv, cache records) and resumes without decoding."""

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch

from tidar_bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tidar_bench" / "embedded" / "tidar"


def _argv(out, *extra):
    return ["run", "--model", str(MODEL), "--decoders", "ar,tidar", "--tasks", "tb_mini_gsm", "--limit", "5",
            "--include-path", str(ROOT / "tasks"), "--device", "cpu", "--dtype", "float32",
            "--gen-kwargs", "max_gen_toks=24", "--decoder-arg", "tidar.max_blocks=3", "--out", str(out), *extra]


def _cache(out, decoder):
    return {r["item"]: r for r in map(json.loads, (out / "cache" / decoder / "tb_mini_gsm.jsonl").read_text().splitlines())}


def _samples(out, decoder):
    rows = map(json.loads, (out / f"samples_{decoder}_tb_mini_gsm.jsonl").read_text().splitlines())
    return [(x["doc_id"], x["output"], x["new_tokens"]) for x in rows]


def _summary(out):
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _one_thread():
    """A tiny model: one thread avoids OpenMP's per-op synchronisation, which costs more than the ops
    on a loaded 2-core machine (conftest sets 2 threads again per test)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)  # module fixtures run before the per-test ones
    root = tmp_path_factory.mktemp("run_batch")
    assert main(_argv(root / "b1")) == 0
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert main(_argv(root / "b4", "--batch-size", "4")) == 0  # 5 items, 4 slots: a finished row is refilled
    return root / "b1", root / "b4", table.getvalue()


def test_batch_4_equals_batch_1_item_by_item(runs):
    b1, b4, _ = runs
    for d in ("ar", "tidar"):
        one, four = _cache(b1, d), _cache(b4, d)
        assert len(one) == 5 and set(one) == set(four)
        for item, r in one.items():
            assert four[item]["tokens"] == r["tokens"] and four[item]["output"] == r["output"], (d, r["doc_id"])
            assert four[item]["prompt_tokens"] == r["prompt_tokens"] and four[item]["doc_id"] == r["doc_id"]
        assert _samples(b4, d) == _samples(b1, d)  # request order kept: lm-eval pairs answers by position
    # batch 1 records are unchanged: no batch fields
    assert all("batch_size" not in r for r in _cache(b1, "ar").values())


def test_batched_records_summary_and_run_json(runs):
    b1, b4, _ = runs
    for d in ("ar", "tidar"):
        recs = list(_cache(b4, d).values())
        for r in recs:
            assert r["batch_size"] == 4 and r["latency_s"] > 0 and r["batch_share_s"] >= 0 and not r["compiled"]
            assert r["batch_wall_s"] == pytest.approx(sum(x["batch_share_s"] for x in recs), rel=0.05)
            assert r["batch_tokens_per_s"] == pytest.approx(sum(x["new_tokens"] for x in recs) / r["batch_wall_s"])
    rows = {r["decoder"]: r for r in _summary(b4)}
    assert {r["batch_size"] for r in rows.values()} == {"4"}
    assert {r["batch_size"] for r in _summary(b1)} == {"1"}
    ar = list(_cache(b4, "ar").values())
    assert float(rows["ar"]["tokens_per_s"]) == pytest.approx(  # throughput over the batch
        sum(r["new_tokens"] for r in ar) / sum(r["batch_share_s"] for r in ar))
    assert float(rows["tidar"]["speedup_vs_ar"]) == pytest.approx(
        float(rows["tidar"]["tokens_per_s"]) / float(rows["ar"]["tokens_per_s"]))
    assert rows["tidar"]["mismatches_vs_ar"] == "0"
    info = json.loads((b4 / "run.json").read_text())
    assert info["batch_size"] == 4 and info["identity"]["batch_size"] == 4 and "--batch-size 4" in info["command"]
    table = runs[2]
    assert "(batch 4, seed 0" in table and "tok/s: throughput over the batch" in table
    info1 = json.loads((b1 / "run.json").read_text())
    assert info1["batch_size"] == 1 and "batch_size" not in info1["identity"]  # older batch-1 folders still resume


def test_batched_rerun_resumes_and_other_batch_size_is_refused(runs, monkeypatch, capsys):
    import tidar_bench.batched as batched

    _, b4, _ = runs
    before = _summary(b4)
    monkeypatch.setattr(batched, "generate_batch", lambda *a, **k: pytest.fail("decoded on a resumed run"))
    assert main(_argv(b4, "--batch-size", "4")) == 0
    assert _summary(b4) == before
    assert all(d["decoded_this_invocation"] == 0 for d in json.loads((b4 / "run.json").read_text())["decoders"].values())
    capsys.readouterr()
    assert main(_argv(b4, "--batch-size", "2")) == 2
    assert "differs in: batch_size" in capsys.readouterr().err
