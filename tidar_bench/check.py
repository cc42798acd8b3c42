"""`tidar-bench check`: a CI regression gate for a run folder against a committed baseline.

Fails (one line per reason) when:
- a required file of the run folder is missing;
- a lossless decoder's greedy outputs differ from its run's reference, the first decoder setting
  (`ar` in the shipped runs; mismatches_vs_ar > 0), or a lossless decoder was left unchecked (no
  lossless reference to compare with);
- a (task, checkpoint, decoder setting) of the baseline is missing from the run;
- a score drops below baseline - tolerance, tolerance = `score_se` x the baseline's standard error
  (default 2), or the absolute `score_abs` when given;
- T/NFE or the mean accepted length drops by more than `rel` (default 10%) of the baseline's.
Speed in tokens/s is deliberately not gated: it depends on the machine; T/NFE and acceptance do not.

The baseline is a JSON file written by `--update-baseline` from a run folder (never by hand)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .provenance import write_atomic
from .report import read_run

GATED = ("score", "stderr", "tokens_per_nfe", "mean_accepted_length")


@dataclass
class Tolerance:
    score_se: float = 2.0
    score_abs: float | None = None
    rel: float = 0.10


def required_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if (folder / "suite.json").is_file():
        subs = json.loads((folder / "suite.json").read_text()).get("runs", {})
        return [folder / "summary.csv"] + [folder / s / f for s in subs for f in ("run.json", "summary.csv")]
    return [folder / "summary.csv", folder / "run.json"]


def _key(r: dict) -> str:
    return " | ".join([r["task"].removeprefix("tb_"), r.get("model") or "-", r["label"]])


def baseline_from_run(folder: Path) -> dict:
    run = read_run(folder)
    rows = [{"key": _key(r), "task": r["task"], "model": r.get("model"), "decoder": r["decoder"], "label": r["label"],
             "metric": r["metric"], "n": int(r["n"]) if r.get("n") else None, **{k: r[k] for k in GATED}}
            for r in run.rows]
    return {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "source_command": run.meta["command"],
            "environment": json.loads(((folder / "suite.json") if (folder / "suite.json").is_file()
                                       else (folder / "run.json")).read_text()).get("environment"),
            "rows": rows}


def check(folder: Path, baseline: dict, tol: Tolerance) -> list[str]:
    """Failure reasons (empty: passed)."""
    missing = [p for p in required_files(folder) if not p.is_file()]
    if missing:
        return [f"missing file: {p}" for p in missing]
    run = read_run(folder)
    failures = []
    for r in run.rows:
        m = r.get("mismatches_vs_ar")
        ref = r.get("reference") or "ar"
        if m not in (None, "", "0"):
            failures.append(f"lossless: {_key(r)}: {m} greedy outputs differ from {ref}")
        if str(r.get("lossless_check") or "").startswith("unchecked"):
            failures.append(f"lossless: {_key(r)}: {r['lossless_check']}")
    got = {_key(r): r for r in run.rows}
    for b in baseline.get("rows", []):
        r = got.get(b["key"])
        if r is None:
            failures.append(f"missing result: {b['key']} is in the baseline but not in {folder}")
            continue
        if b["score"] is not None:
            allowed = tol.score_abs if tol.score_abs is not None else tol.score_se * (b.get("stderr") or 0.0)
            if r["score"] is None or r["score"] < b["score"] - allowed - 1e-12:
                failures.append(f"score: {b['key']}: {b['metric']} {r['score']} < baseline {b['score']:.4f} "
                                f"- tolerance {allowed:.4f}")
        for k, name in (("tokens_per_nfe", "T/NFE"), ("mean_accepted_length", "mean accepted length")):
            if b.get(k) is not None:
                floor = b[k] * (1 - tol.rel)
                if r[k] is None or r[k] < floor - 1e-12:
                    failures.append(f"{name}: {b['key']}: {r[k]} < baseline {b[k]:.3f} - {100 * tol.rel:.0f}% "
                                    f"({floor:.3f})")
    return failures


def load_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline {path} not found (create one with --update-baseline)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"baseline {path} is not valid JSON: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise UserError(f"baseline {path} has no rows list; was it written by --update-baseline?")
    return data


def update_baseline(folder: Path, path: Path) -> dict:
    missing = [p for p in required_files(folder) if not p.is_file()]
    if missing:
        raise UserError(f"cannot make a baseline from {folder}: {missing[0]} is missing")
    bad = [f for f in check(folder, {"rows": []}, Tolerance()) if f.startswith("lossless")]
    if bad:
        raise UserError(f"refusing to make a baseline from a run that fails the lossless check: {bad[0]}")
    data = baseline_from_run(folder)
    write_atomic(Path(path), json.dumps(data, indent=2) + "\n")
    return data
