"""Run the reference-equivalence checks of tests/test_reference_formats.py (our loaders vs the formats'
authors' own code: vLLM speculators EAGLE-3 / DFlash / DSpark, z-lab dflash) and store every max |Δ|
of the draft logits with the versions, machine and command in results/reference/equivalence.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reference_equivalence.py [--out PATH]

(results/reference/equivalence_transformers519.json: the same run in a venv with speculators' own
dependency set, transformers 5.19.0, torchvision/torchaudio removed.)

A check whose package is not installed is recorded as skipped with the reason (speculators:
scripts/install_references.sh). Each check also asserts that greedy eagle / dflash == ar."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CASES = [  # (name, package, check, kwargs): the same cases as the tests
    ("speculators-eagle3 Vd=48 norm_before_residual", "speculators", "check_speculators_eagle3",
     dict(vocab=48, norm_before_residual=True)),
    ("speculators-eagle3 full vocab", "speculators", "check_speculators_eagle3", dict(vocab=None, norm_before_residual=False)),
    ("speculators-dflash Vd=48 sliding window 3", "speculators", "check_speculators_dflash",
     dict(kind="dflash", vocab=48, sliding=3)),
    ("speculators-dflash full vocab", "speculators", "check_speculators_dflash", dict(kind="dflash", vocab=None, sliding=None)),
    ("speculators-dspark sliding window 3 (anchor-first)", "speculators", "check_speculators_dflash",
     dict(kind="dspark", vocab=None, sliding=3)),
    ("speculators-dspark Vd=48 sample_from_anchor=false", "speculators", "check_speculators_dflash",
     dict(kind="dspark", vocab=48, sliding=None, sample_from_anchor=False)),
    ("zlab-dflash", "dflash", "check_zlab_dflash", {}),
]


def version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "reference" / "equivalence.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import test_reference_formats as t

    rows = []
    for name, pkg, fn, kw in CASES:
        if version(pkg) is None:
            rows.append({"case": name, "skipped": f"{pkg} not installed"})
            continue
        with tempfile.TemporaryDirectory() as d:
            r = getattr(t, fn)(Path(d), **kw)
        r.update(case=name, reference=f"{pkg} {version(pkg)}", passed=r["max_abs_logits"] <= t.TOL, lossless=True)
        rows.append(r)
        print(f"{name:55s} max |dlogits| {r['max_abs_logits']:.2e}")
    from tidar_bench.provenance import portable_command, portable_path

    out = {"command": "OMP_NUM_THREADS=1 " + portable_command([Path(sys.executable).name, *sys.argv]),
           "python_executable": portable_path(sys.executable),
           "tolerance": t.TOL, "dtype": "float32", "device": "cpu", "machine": platform.platform(),
           "python": platform.python_version(), "seed": "fixed per check (see tests/test_reference_formats.py)",
           "versions": {p: version(p) for p in ("torch", "transformers", "speculators", "dflash")}, "checks": rows}
    from tidar_bench.provenance import write_atomic

    write_atomic(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
