#!/usr/bin/env python
"""Tables of the SmolLM2 pipeline's results, generated from its stored files (no number typed by hand):

    python scripts/smollm2_report.py                          # results/smollm2 -> results/smollm2/results.md
    python scripts/smollm2_report.py --res results/smollm2/smoke

Reads runs/<task>_<checkpoint>/{summary.csv,run.json,samples_*.jsonl}, training/<stage>/{train_log,eval_log}.jsonl
and stages.jsonl under --res, and writes --res/results.md (temp + rename) with:
  1. per task, every decoder: score, tokens/s, the paired speedup over the `ar` of its own checkpoint (the
     run's total-tokens ratio and the median [q1-q3] of per-item ratios), that `ar`'s tokens/s and compile
     mode, T/NFE, mean accepted length (tau), lossless mismatches;
  2. the TiDAR (and block-diffusion) checkpoint's AR mode against the original model, item by item;
  3. every drafter's acceptance on the held-out prompts against the tokens it had trained on;
  4. each stage's wall and CPU time.
Runs still in progress (no summary.csv yet) are listed as such."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tidar_bench.harness.runner import file_label  # noqa: E402
from tidar_bench.profiling import quartiles  # noqa: E402
from tidar_bench.report import read_run  # noqa: E402
from tidar_bench.provenance import write_atomic  # noqa: E402

# the eval metric each trainer logs with --eval-every: EAGLE's and DFlash's tau, TiDAR's and bd's T/NFE
EVAL_METRIC = {"eagle": ("eval_mean_accepted_length", "tau"), "dflash": ("eval_mean_accepted_length", "tau"),
               "tidar": ("eval_tokens_per_nfe", "T/NFE"), "bd": ("eval_tokens_per_nfe", "T/NFE")}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def fmt(x, spec=".2f", none="–"):
    if x in (None, ""):
        return none
    return format(float(x), spec)


def samples(run: Path, decoder: str) -> dict:
    """doc_id -> (first filter's record) for one decoder of a run (lm-eval writes one record per filter)."""
    out: dict = {}
    for f in sorted(run.glob(f"samples_{glob.escape(file_label(decoder))}_*.jsonl")):
        for r in jsonl(f):
            out.setdefault(r["doc_id"], r)
    return out


def item_ratios(run: Path, decoder: str) -> list[float]:
    """Per item: (decoder tokens/s) / (ar tokens/s) on the same item, from each item's latency."""
    a, d = samples(run, "ar"), samples(run, decoder)
    out = []
    for k, r in d.items():
        q = a.get(k)
        if q and r.get("latency_s") and q.get("latency_s") and r.get("new_tokens") and q.get("new_tokens"):
            out.append((r["new_tokens"] / r["latency_s"]) / (q["new_tokens"] / q["latency_s"]))
    return out


def score_of(rec: dict) -> float | None:
    m = rec.get("metrics") or {}
    return float(next(iter(m.values()))) if m else None


def task_tables(res: Path) -> list[str]:
    runs = sorted(p for p in (res / "runs").glob("*_*") if p.is_dir()) if (res / "runs").exists() else []
    tasks = sorted({p.name.rsplit("_", 1)[0] for p in runs})
    lines: list[str] = []
    for task in tasks:
        lines += [f"## {task}: every decoder against the `ar` of its own checkpoint", ""]
        env_done = False
        for run in (p for p in runs if p.name.rsplit("_", 1)[0] == task):
            summ = run / "summary.csv"
            if not summ.exists():
                lines += [f"`{run.name}`: not finished (no summary.csv yet).", ""]
                continue
            info = json.loads((run / "run.json").read_text())
            rows = list(csv.DictReader(summ.open()))
            label = {r["decoder"]: r["label"] for r in read_run(run).rows}  # as `plot` labels it: draft=dflash
            first = {}
            for r in rows:  # one row per decoder: the first metric/filter (gsm8k: strict-match)
                first.setdefault(r["decoder"], r)
            if not env_done:
                e = info["environment"]
                lines += [f"Machine: {e.get('cpu')} x {e.get('cpu_count')} cores, torch {e.get('torch')} "
                          f"({e.get('torch_threads')} threads), transformers {e.get('transformers')}, lm-eval "
                          f"{e.get('lm_eval')}, commit `{str(e.get('git_commit'))[:10]}`; seed {info.get('seed')}, "
                          f"batch {info.get('batch_size')}, {info.get('limit')} items.", ""]
                env_done = True
            metric = next(iter(first.values()))["metric"]
            lines += [f"**`{run.name}`** (`{info['command']}`), metric `{metric}`:", "",
                      "| decoder | score ± stderr | tokens/s | speedup vs `ar` (total) | per-item speedup median [q1–q3] "
                      "| `ar` tokens/s (compiled) | T/NFE | τ | lossless mismatches |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for d, r in first.items():
                ratios = item_ratios(run, d) if d != "ar" else []
                spread = "{:.2f} [{:.2f}–{:.2f}]".format(*quartiles(ratios)) if ratios else "–"
                lossless = info["decoders"].get(d, {}).get("lossless")
                if d == "ar":
                    mm = "–"
                elif lossless is False:  # lossy by design: how many items' outputs differ from ar's
                    n_diff = r.get("lossy_mismatches_vs_ar")
                    mm = f"lossy: {n_diff} of {r['n']} items differ" if n_diff not in (None, "") else "lossy"
                else:
                    mm = r.get("mismatches_vs_ar") or "–"
                comp = "yes" if r.get("ar_compiled") == "True" else "no"
                lines.append(f"| {label[d]} | {fmt(r['score'], '.3f')} ± {fmt(r['stderr'], '.3f')} (n {r['n']}) | "
                             f"{fmt(r['tokens_per_s'])} | {fmt(r['speedup_vs_ar'])}x | {spread} | "
                             f"{fmt(r['ar_tokens_per_s'])} ({comp}) | {fmt(r['tokens_per_nfe'])} | "
                             f"{fmt(r['mean_accepted_length'])} | {mm} |")
            lines.append("")
    return lines


def ar_mode_tables(res: Path) -> list[str]:
    lines = ["## AR mode of the trained checkpoints against the original model, item by item", "",
             "The `ar` decoder of each checkpoint on the same items as the original model's `ar` (greedy, "
             "same prompts): the checkpoint's quality as an AR model after its continued pretraining.", "",
             "| task | checkpoint | original score | checkpoint score | both right | only original | only checkpoint "
             "| identical outputs | items |", "|---|---|---|---|---|---|---|---|---|"]
    n_rows = 0
    for base in sorted((res / "runs").glob("*_base")) if (res / "runs").exists() else []:
        task = base.name.rsplit("_", 1)[0]
        b = samples(base, "ar")
        for ck in ("tidar", "bd"):
            c = samples(res / "runs" / f"{task}_{ck}", "ar")
            common = sorted(set(b) & set(c))
            if not common:
                continue
            sb = [score_of(b[k]) or 0.0 for k in common]
            sc = [score_of(c[k]) or 0.0 for k in common]
            same = sum(b[k].get("output") == c[k].get("output") for k in common)
            both = sum(x > 0 and y > 0 for x, y in zip(sb, sc))
            only_b = sum(x > 0 and not y > 0 for x, y in zip(sb, sc))
            only_c = sum(y > 0 and not x > 0 for x, y in zip(sb, sc))
            lines.append(f"| {task} | {ck} | {sum(sb) / len(common):.3f} | {sum(sc) / len(common):.3f} | {both} | "
                         f"{only_b} | {only_c} | {same} | {len(common)} |")
            n_rows += 1
    return lines + [""] if n_rows else []


def training_tables(res: Path) -> list[str]:
    lines = ["## Acceptance on the 4 held-out GSM8K train prompts (48 tokens each) against tokens trained on", "",
             "Tokens seen = optimizer steps x sequences per step x sequence length (`train_log.jsonl`'s `tokens` "
             "at that step). τ: mean accepted length (tokens committed per target forward); T/NFE: tokens per "
             "forward of the one model.", "",
             "| stage | metric | steps: tokens seen → value | final train loss |", "|---|---|---|---|"]
    n_rows = 0
    for stage, (key, name) in EVAL_METRIC.items():
        d = res / "training" / stage
        tl, ev = jsonl(d / "train_log.jsonl"), jsonl(d / "eval_log.jsonl")
        if not tl:
            continue
        # both logs count steps from 0 and train_log keeps every --log-every-th step: tokens per step from its
        # first row (a fixed batch x seq_len), so the eval at "step s" ran after (s + 1) x that many tokens
        per_step = tl[0]["tokens"] // (tl[0]["step"] + 1)
        pts = [f"{r['step'] + 1}: {(r['step'] + 1) * per_step:,} → {r[key]:.2f}" for r in ev if key in r]
        lines.append(f"| {stage} | {name} | {'; '.join(pts) or '–'} | {tl[-1]['loss']:.3f} "
                     f"(step {tl[-1]['step'] + 1}, {tl[-1]['tokens']:,} tokens) |")
        n_rows += 1
    return lines + [""] if n_rows else []


def stage_table(res: Path) -> list[str]:
    recs = jsonl(res / "stages.jsonl")
    if not recs:
        return []
    tot: dict = {}
    for r in recs:
        t = tot.setdefault(r["stage"], [0.0, 0.0, 0, r.get("threads")])
        t[0] += r["wall_s"]
        t[1] += r["cpu_s"]
        t[2] += 1
    lines = ["## Time per stage (`stages.jsonl`: every invocation, interrupted ones included when they logged)", "",
             "| stage | invocations | wall (min) | CPU (min) | threads |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {n} | {w / 60:.1f} | {c / 60:.1f} | {th} |" for s, (w, c, n, th) in tot.items()]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", default=str(ROOT / "results" / "smollm2"), help="the pipeline's results folder")
    ap.add_argument("--out", default=None, help="default: RES/results.md")
    a = ap.parse_args(argv)
    res = Path(a.res)
    if not res.is_dir():
        print(f"error: {res} is not a folder", file=sys.stderr)
        return 2
    cmd = "python scripts/smollm2_report.py" + "".join(f" {shlex.quote(x)}" for x in (argv or sys.argv[1:]))
    body = ["# SmolLM2-135M pipeline: results tables", "",
            f"Generated by `{cmd}` from the files in this folder; re-run it to refresh. What the numbers mean "
            "and what limits them: README.md.", ""]
    parts = task_tables(res) + ar_mode_tables(res) + training_tables(res) + stage_table(res)
    out = Path(a.out) if a.out else res / "results.md"
    write_atomic(out, "\n".join(body + parts))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
