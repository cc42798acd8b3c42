"""scripts/gpu_check.sh must never rot: its --quick --device cpu mode runs every step on tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick", "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + (out / "log.txt").read_text()[-3000:]
    commands = (out / "commands.txt").read_text().splitlines()
    assert any("profile-latency" in c for c in commands) and any(" speed " in c for c in commands)
    assert json.loads((out / "environment.json").read_text())["torch"]
    lat = json.loads((out / "latency" / "tiny" / "latency.json").read_text())
    assert lat["command"].startswith("tidar-bench profile-latency") and lat["points"]
    speed = json.loads((out / "speed_tiny_ar_vs_hf.json").read_text())
    assert set(speed["decoders"]) == {"ar", "hf(compile=false)"}  # hf(compile=true) joins on the GPU
    assert speed["decoders"]["hf(compile=false)"]["lossless_mismatches"] == 0
    for name in ("base", "tidar"):
        emb = json.loads((out / "embedded" / f"{name}.json").read_text())
        # every setting but the reference (its own check is `reference`) is checked and agrees
        assert all(d["lossless_mismatches"] == 0 for n, d in emb["decoders"].items() if n != emb["reference"])
