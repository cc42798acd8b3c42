"""scripts/qwen3_family.sh must never rot: its --replica mode runs every row of the family table on
tiny random checkpoints in each row's real layout (made at run time by
scripts/qwen3_family_replicas.py), on two of the real lm-eval tasks (one math, one code), one
document each."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(run):
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_qwen3_family_replica_cpu(tmp_path):
    out = tmp_path / "family"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "scripts/qwen3_family.sh", "--replica", "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + (out / "log.txt").read_text()[-3000:]
    commands = (out / "commands.txt").read_text().splitlines()
    assert [c.split("--out ")[1].split()[0] for c in commands] == [str(out / "qwen3"), str(out / "sdar")]
    assert all("--tasks gsm8k_cot,humaneval " in c for c in commands)
    assert json.loads((out / "environment.json").read_text())["torch"]
    tasks = {"tb_gsm8k_cot", "tb_humaneval"}
    q = _rows(out / "qwen3")
    assert {r["task"] for r in q} == tasks and {r["decoder"] for r in q} == {"ar"}
    s = _rows(out / "sdar")
    assert {r["task"] for r in s} == tasks
    assert {r["decoder"] for r in s} == {"ar", "bd", "bd(separate_commit=true)"}
    assert all(float(r["tokens_per_nfe"]) > 0 and r["speedup_vs_ar"] for r in s if r["decoder"] != "ar")
    # separate commit forwards (SDAR's schedule): the same outputs, more forwards, per document
    for task in tasks:
        a, b = ([json.loads(x) for x in (out / "sdar" / f"samples_{d}_{task}.jsonl").read_text().splitlines()]
                for d in ("bd", "bd(separate_commit=true)"))
        assert len(a) == len(b) >= 1  # one row per document and filter
        assert [r["output"] for r in a] == [r["output"] for r in b]
        assert all(x["new_tokens"] == y["new_tokens"] and y["nfe"] > x["nfe"] for x, y in zip(a, b))
