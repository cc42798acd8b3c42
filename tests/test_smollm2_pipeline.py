"""scripts/smollm2_pipeline.sh refuses a mistyped stage or option with one `error:` line before it does
anything (the pipeline itself runs for hours; its --smoke run is recorded in results/smollm2/smoke/)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "smollm2_pipeline.sh"


def test_pipeline_refuses_bad_arguments(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TIDAR_BENCH_CACHE": str(tmp_path / "cache")}
    for args, msg in ((["--stage", "trian"], "unknown stage trian"), (["--from", "x"], "unknown stage x"),
                      (["--fast"], "unknown option --fast")):
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr
        assert len(r.stderr.splitlines()) == 1 and not r.stdout
    assert not (tmp_path / "cache").exists()  # nothing written
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0 and "--resume" in r.stdout and "--smoke" in r.stdout


def _write_run(run: Path, decoders: dict, samples: dict, lossless: dict):
    """A minimal run folder: summary.csv rows, run.json, one samples file per decoder."""
    import csv
    import json

    run.mkdir(parents=True)
    cols = ["task", "decoder", "metric", "filter", "score", "stderr", "tokens_per_s", "tokens_per_nfe",
            "mean_accepted_length", "speedup_vs_ar", "ar_tokens_per_s", "compiled", "ar_compiled", "n",
            "mismatches_vs_ar", "batch_size", "lossy_mismatches_vs_ar"]
    with open(run / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for d, row in decoders.items():
            w.writerow({"task": "tb_gsm8k", "decoder": d, "metric": "exact_match,strict-match", "filter": "strict-match",
                        "stderr": "", "compiled": "True", "ar_compiled": "True", "n": 4, "batch_size": 1, **row})
    env = {"cpu": "cpu", "cpu_count": 2, "torch": "2.x", "torch_threads": 2, "transformers": "5", "lm_eval": "0.4",
           "git_commit": "abc"}
    (run / "run.json").write_text(json.dumps({"command": "tidar-bench run ...", "environment": env, "seed": 0,
                                              "batch_size": 1, "limit": 4,
                                              "decoders": {d: {"lossless": lossless[d]} for d in decoders}}))
    for d, recs in samples.items():
        with open(run / f"samples_{d}_tb_gsm8k.jsonl", "w") as f:
            for i, (out, score, tokens, lat) in enumerate(recs):
                for filt in ("strict-match", "flexible-extract"):  # lm-eval: one record per filter
                    f.write(json.dumps({"doc_id": i, "output": [out], "filter": filt, "metrics": {"exact_match": score},
                                        "new_tokens": tokens, "latency_s": lat}) + "\n")


def test_report_tables_come_from_the_stored_files(tmp_path):
    """smollm2_report.py: per-item paired speedups, the AR-mode item comparison and acceptance against
    tokens seen are computed from the run folders and training logs (values checked by hand here)."""
    import json

    res = tmp_path / "res"
    ar = [("a", 1.0, 10, 1.0), ("b", 0.0, 10, 1.0), ("c", 1.0, 10, 2.0), ("d", 0.0, 10, 1.0)]
    _write_run(res / "runs" / "gsm8k_base", {"ar": {"score": 0.5, "tokens_per_s": 8.0, "speedup_vs_ar": 1.0,
                                                    "ar_tokens_per_s": 8.0, "tokens_per_nfe": 1, "mean_accepted_length": 1},
                                             "eagle": {"score": 0.5, "tokens_per_s": 10.0, "speedup_vs_ar": 1.25,
                                                       "ar_tokens_per_s": 8.0, "tokens_per_nfe": 1.5,
                                                       "mean_accepted_length": 1.6, "mismatches_vs_ar": 0}},
               {"ar": ar, "eagle": [(o, s, t, lat / r) for (o, s, t, lat), r in zip(ar, (1.0, 2.0, 0.5, 1.0))]},
               {"ar": True, "eagle": True})
    _write_run(res / "runs" / "gsm8k_tidar", {"ar": {"score": 0.5, "tokens_per_s": 8.0, "speedup_vs_ar": 1.0,
                                                     "ar_tokens_per_s": 8.0, "tokens_per_nfe": 1, "mean_accepted_length": 1}},
               {"ar": [("a", 1.0, 10, 1.0), ("x", 1.0, 10, 1.0), ("c", 0.0, 10, 1.0), ("y", 0.0, 10, 1.0)]},
               {"ar": True})
    (res / "runs" / "gsm8k_bd").mkdir()  # a run still in progress
    tr = res / "training" / "eagle"
    tr.mkdir(parents=True)
    (tr / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 2048 * (s + 1), "loss": 9.0 - s})
                                                + "\n" for s in (0, 10, 19)))  # sparse, as --log-every writes
    (tr / "eval_log.jsonl").write_text(json.dumps({"step": 9, "eval_mean_accepted_length": 1.37}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2_report.py"), "--res", str(res)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    md = (res / "results.md").read_text()
    assert "| eagle | 0.500 ± – (n 4) | 10.00 | 1.25x | 1.00 [0.88–1.25] | 8.00 (yes) | 1.50 | 1.60 | 0 |" in md
    # tidar's ar against the original: items 0 (both right), 1 (only tidar), 2 (only original), 3 (neither)
    assert "| gsm8k | tidar | 0.500 | 0.500 | 1 | 1 | 1 | 2 | 4 |" in md
    assert "`gsm8k_bd`: not finished" in md
    assert "| eagle | tau | 10: 20,480 → 1.37 | -10.000 (step 20, 40,960 tokens) |" in md


def test_finished_runs_are_reused_only_for_the_same_weights(tmp_path):
    """A fresh machine has no cache: `run` copies a committed run folder's per-item cache back only when
    the checkpoints it measured have the sha256 recorded beside it; otherwise it measures again. A fake
    `tidar-bench` records whether the cache was there when it was called."""
    import os

    cache, res = tmp_path / "cache", tmp_path / "res"
    tidar = cache / "smollm2-pipeline" / "tidar"
    tidar.mkdir(parents=True)
    (tidar / "model.safetensors").write_bytes(b"weights-1")
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "tidar-bench"
    fake.write_text(f"""#!/bin/bash
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
# as tidar-bench run: a non-empty --out must be a run folder (run_spec.json)
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/run_spec.json" ]; then echo "error: not a run folder" >&2; exit 2; fi
if [ -d "$out/cache" ]; then echo cached >> {calls}; else echo decoded >> {calls}; fi
mkdir -p "$out/cache/ar" && echo '{{"key": "k"}}' > "$out/cache/ar/gsm8k.jsonl"
echo 'task,decoder' > "$out/summary.csv" && echo '{{}}' > "$out/run.json" && echo '{{}}' > "$out/run_spec.json"
""")
    fake.chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "TIDAR_BENCH_CACHE": str(cache), "SMOLLM2_RESULTS": str(res),
           "TB": str(fake), "PY": sys.executable}

    def run_stage():
        r = subprocess.run(["bash", str(SCRIPT), "--stage", "run", "--runs", "gsm8k_tidar"], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stderr

    run_stage()  # first machine: decodes, keeps the finished folder with its cache and the weights' sha256
    kept = res / "runs" / "gsm8k_tidar"
    assert (kept / "cache" / "ar" / "gsm8k.jsonl").exists() and (kept / "summary.csv").exists()
    assert (kept / "checkpoints.sha256").read_text().split()[1] == "tidar"
    import shutil

    shutil.rmtree(cache / "smollm2-pipeline" / "runs")  # a fresh machine, the same weights: reused
    assert "its cache reused" in run_stage()
    shutil.rmtree(cache / "smollm2-pipeline" / "runs")  # other weights: measured again
    (tidar / "model.safetensors").write_bytes(b"weights-2")
    assert "measuring again" in run_stage()
    assert calls.read_text().split() == ["decoded", "cached", "decoded"]
    assert [p.name for p in (res / "runs").iterdir()] == ["gsm8k_tidar"]  # --runs: no other run was started
