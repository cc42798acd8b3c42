"""scripts/qwen3_family.sh must never rot: its --replica mode runs every row of the family table on
tiny random checkpoints in each row's real layout (made at run time by
scripts/qwen3_family_replicas.py), on one real lm-eval task, one document: every decoder's rows exist,
the lossless ones (eagle with the AngelSlim head, dflash with the DSpark drafter, tidar with the
TiDAR-LM preset) emit ar's tokens, the lossy ones (SDAR as bd) are labelled and report mismatches."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"qwen3": {"ar", "eagle", "dflash"}, "sdar": {"ar", "bd", "bd(separate_commit=true)"}, "tidar": {"ar", "tidar"}}
LOSSLESS = {"eagle", "dflash", "tidar"}
FORMATS = {("qwen3", "eagle"): "angelslim-eagle3", ("qwen3", "dflash"): "speculators-dspark"}


def _rows(run):
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_qwen3_family_replica_cpu(tmp_path):
    out = tmp_path / "family"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "scripts/qwen3_family.sh", "--replica", "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + log[-3000:]
    commands = (out / "commands.txt").read_text().splitlines()
    assert [c.split("--out ")[1].split()[0] for c in commands] == [str(out / r) for r in ROWS]
    assert all("--tasks gsm8k_cot " in c for c in commands)
    assert json.loads((out / "environment.json").read_text())["torch"]
    for name, decoders in ROWS.items():
        rows, run = _rows(out / name), json.loads((out / name / "run.json").read_text())
        assert {r["task"] for r in rows} == {"tb_gsm8k_cot"} and {r["decoder"] for r in rows} == decoders, name
        for dec in decoders - {"ar"}:
            mine = [r for r in rows if r["decoder"] == dec]
            assert all(float(r["tokens_per_nfe"]) > 0 and r["speedup_vs_ar"] for r in mine), (name, dec)
            assert run["decoders"][dec]["lossless"] == (dec in LOSSLESS), (name, dec)
            if dec in LOSSLESS:  # compared with the row's own ar, document by document
                assert run["mismatches_vs_ar"][dec] == 0 and all(r["mismatches_vs_ar"] == "0" for r in mine), (name, dec)
            else:  # lossy: no lossless claim, its changed outputs counted
                assert run["mismatches_vs_ar"][dec] is None and all(r["mismatches_vs_ar"] == "" for r in mine)
                assert all(r["lossy_mismatches_vs_ar"] != "" for r in mine), (name, dec)
    opts = json.loads((out / "qwen3" / "run.json").read_text())["decoders"]
    for (name, dec), fmt in FORMATS.items():  # each draft loaded in its real layout, detected from its config
        assert fmt in json.dumps(opts[dec]), (dec, opts[dec])
    assert "tidar-lm" in json.dumps(json.loads((out / "tidar" / "run.json").read_text())["decoders"]["tidar"])
    # separate commit forwards (SDAR's schedule): the same outputs, more forwards, per document
    a, b = ([json.loads(x) for x in (out / "sdar" / f"samples_{d}_tb_gsm8k_cot.jsonl").read_text().splitlines()]
            for d in ("bd", "bd(separate_commit=true)"))
    assert len(a) == len(b) >= 1  # one row per document and filter
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert all(x["new_tokens"] == y["new_tokens"] and y["nfe"] > x["nfe"] for x, y in zip(a, b))


def test_drafts_resolve_hub_ids_like_model(tmp_path, monkeypatch, capsys):
    """--draft and dflash.draft= go through registry.resolve_model (the family script passes hub ids):
    offline, an uncached id is one error line naming the option, and nothing is written."""
    from types import SimpleNamespace

    import pytest

    from tidar_bench.baselines.dflash import build
    from tidar_bench.cli import main
    from tidar_bench.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    assert main(["run", "--model", str(tmp_path), "--draft", "org/no-such-head", "--decoders", "ar,eagle",
                 "--tasks", "gsm8k", "--limit", "1", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --draft org/no-such-head: not a local folder"), err
    assert not out.exists()
    with pytest.raises(UserError, match="^dflash.draft org/no-such-drafter: not a local folder"):
        build(SimpleNamespace(draft_path=None), draft="org/no-such-drafter")
