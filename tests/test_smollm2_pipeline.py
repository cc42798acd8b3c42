"""scripts/smollm2_pipeline.sh refuses a mistyped stage or option with one `error:` line before it does
anything (the pipeline itself runs for hours; its --smoke run is recorded in results/smollm2/smoke/)."""

import subprocess
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
