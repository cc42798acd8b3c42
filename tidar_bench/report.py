"""`tidar-bench plot`: figures and a report from run folders and profile-latency folders.

Inputs, any mix:
- a `tidar-bench run` folder (summary.csv + run.json), or an embedded-suite folder (summary.csv with a
  model column + suite.json, one run folder per checkpoint inside);
- a `tidar-bench profile-latency` folder (latency.csv + latency.json).

Per task: quality vs tokens/s and quality vs T/NFE, one point per (run, checkpoint, decoder, setting),
the Pareto frontier (no other point is both faster and better), AR as the reference (dashed lines at
its score and speed) and every point's speedup over AR annotated. Per profile folder: the latency vs
slots curve (profiling.plot). PNG + SVG each, and report.md with the figures and the summary table."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

NUMERIC = ("score", "stderr", "tokens_per_s", "tokens_per_nfe", "mean_accepted_length", "speedup_vs_ar")


@dataclass
class RunRows:
    folder: Path
    rows: list[dict]  # summary rows + "label", "run"
    meta: dict  # title facts: model, device, date, command


def _num(v):
    return float(v) if v not in (None, "") else None


def _options_label(given: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(given.items()))


def read_run(folder: Path) -> RunRows:
    """A run folder or an embedded-suite folder -> rows with a display label per decoder setting."""
    folder = Path(folder)
    summary = folder / "summary.csv"
    if not summary.is_file():
        raise UserError(f"{folder} is not a run folder: summary.csv is missing")
    suite = folder / "suite.json"
    info_file = suite if suite.is_file() else folder / "run.json"
    if not info_file.is_file():
        raise UserError(f"{folder}: {info_file.name} is missing")
    info = json.loads(info_file.read_text())
    given: dict[tuple[str | None, str], dict] = {}
    if suite.is_file():
        for sub in info.get("runs", {}):
            run_json = folder / sub / "run.json"
            if run_json.is_file():
                for d, v in json.loads(run_json.read_text()).get("decoders", {}).items():
                    given[(sub, d)] = v.get("given") or {}
        model = "embedded suite"
    else:
        for d, v in info.get("decoders", {}).items():
            given[(None, d)] = v.get("given") or {}
        model = Path((info.get("identity") or {}).get("model") or "?").name
    env = info.get("environment") or {}
    device = env.get("gpu") or (f"CPU {env.get('cpu') or ''}".strip())
    rows = []
    with summary.open() as f:
        for r in csv.DictReader(f):
            for k in NUMERIC:
                r[k] = _num(r.get(k))
            sub = r.get("model") or None
            opts = _options_label(given.get((sub, r["decoder"]), {}))
            label = r["decoder"] + (f"({opts})" if opts else "") + (f" [{sub}]" if sub and sub != "base" else "")
            r["label"], r["run"] = label, folder.name
            rows.append(r)
    meta = {"model": model, "device": device, "date": _date(info_file), "command": info.get("command", "")}
    return RunRows(folder, rows, meta)


def _date(f: Path) -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime(f.stat().st_mtime))


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better for x and y), sorted by x."""
    front = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def _savefig(fig, base: Path) -> list[Path]:
    out = []
    for ext in ("png", "svg"):
        tmp = base.with_name(f".{base.name}.tmp.{ext}")
        fig.savefig(tmp, dpi=130, format=ext)
        tmp.replace(base.with_suffix(f".{ext}"))
        out.append(base.with_suffix(f".{ext}"))
    return out


def plot_task(task: str, rows: list[dict], metas: list[dict], out_base: Path) -> list[Path]:
    """Two panels for one task: score vs tokens/s and score vs T/NFE. The `ar` of a non-base
    checkpoint (a speed reference for its own sub-run) is left out of the figure, kept in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not (r["decoder"] == "ar" and r.get("model") not in (None, "", "base"))]
    multi = len({r["run"] for r in rows}) > 1

    def name(r):
        sp = r.get("speedup_vs_ar")
        return (f"{r['run']}: " if multi else "") + r["label"] + (f"  ({sp:.2f}× ar)" if sp is not None else "")

    labels = list(dict.fromkeys(name(r) for r in rows))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4 + 0.22 * ((len(labels) + 1) // 2)))
    ar = [r for r in rows if r["label"] == "ar"]
    for ax, xkey, xlabel in ((axes[0], "tokens_per_s", "tokens / s (batch 1)"),
                             (axes[1], "tokens_per_nfe", "tokens per forward pass (T/NFE)")):
        pts = []
        for r in rows:
            if r[xkey] is None or r["score"] is None:
                continue
            pts.append((r[xkey], r["score"]))
            ax.errorbar([r[xkey]], [r["score"]], yerr=[r["stderr"] or 0], fmt="o", ms=7, capsize=3,
                        color=colors[name(r)], label=name(r))
        front = pareto(pts)
        if len(front) > 1:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="pre", ls="-", lw=1, color="grey", alpha=0.6, label="Pareto frontier")
        for a in ar[:1]:
            if a[xkey] is not None:
                ax.axvline(a[xkey], ls="--", lw=0.8, color="black", alpha=0.6)
            if a["score"] is not None:
                ax.axhline(a["score"], ls="--", lw=0.8, color="black", alpha=0.6, label="ar: reference score and speed")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{rows[0]['metric'].split(',')[0]} (higher is better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.1, y=0.1)
        if xkey == "tokens_per_nfe":
            ax.set_xlim(left=0)
    handles, labs = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labs, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    models = ", ".join(sorted({m["model"] for m in metas}))
    devices = ", ".join(sorted({m["device"] for m in metas}))
    dates = ", ".join(sorted({m["date"] for m in metas}))
    fig.suptitle(f"{task.removeprefix('tb_')} — {models} — {devices} — {dates}", fontsize=10)
    legend_h = (0.22 * ((len(uniq) + 1) // 2) + 0.3) / fig.get_figheight()
    fig.tight_layout(rect=(0, legend_h, 1, 0.95))
    paths = _savefig(fig, out_base)
    plt.close(fig)
    return paths


def plot_latency(folder: Path, out_base: Path) -> list[Path]:
    from .profiling import Point, plot

    folder = Path(folder)
    meta = json.loads((folder / "latency.json").read_text())
    points = []
    with (folder / "latency.csv").open() as f:
        for r in csv.DictReader(f):
            points.append(Point(int(r["context"]), int(r["slots"]), float(r["median_ms"]), float(r["q1_ms"]),
                                float(r["q3_ms"]), int(r["repeats"]), r["mask"],
                                int(r["block_size"]) if r["block_size"] else None))
    knees = {int(k): v for k, v in (meta.get("knee") or {}).items()}
    env = meta.get("environment") or {}
    title = f"{meta.get('model', '?')} · {env.get('device_name') or meta.get('label', '')} · {meta.get('dtype', '')} · batch 1"
    plot(points, knees, float(meta.get("tolerance", 0.1)), title, out_base)
    return [out_base.with_suffix(".png"), out_base.with_suffix(".svg")]


def _md_table(rows: list[dict], multi: bool) -> str:
    def f(x, spec):
        return "–" if x is None else format(x, spec)

    head = (["run"] if multi else []) + ["task", "decoder", "metric", "score", "± se", "tokens/s", "T/NFE",
                                         "mean acc. len", "speedup vs ar", "n", "lossless mismatches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["run"]] if multi else []) + [
            r["task"].removeprefix("tb_"), r["label"], r["metric"], f(r["score"], ".3f"), f(r["stderr"], ".3f"),
            f(r["tokens_per_s"], ".1f"), f(r["tokens_per_nfe"], ".2f"), f(r["mean_accepted_length"], ".2f"),
            f(r["speedup_vs_ar"], ".2f"), r.get("n") or "–", r.get("mismatches_vs_ar") or "–"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def make_report(folders: list[Path], out: Path) -> list[Path]:
    """Figures for every task of every run folder and every latency folder, plus report.md."""
    runs, latency = [], []
    for d in folders:
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"{d} is not a folder")
        if (d / "latency.csv").is_file() and (d / "latency.json").is_file():
            latency.append(d)
        else:
            runs.append(read_run(d))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    md = ["# tidar-bench report", ""]
    rows = [r for run in runs for r in run.rows]
    multi = len(runs) > 1
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        base = out / f"pareto_{task.removeprefix('tb_')}"
        written += plot_task(task, task_rows, [run.meta for run in runs], base)
        md += [f"## {task.removeprefix('tb_')}", "", f"![{task}]({base.name}.png)", ""]
    for i, d in enumerate(latency):
        base = out / f"latency_{d.name or i}"
        written += plot_latency(d, base)
        md += [f"## Forward latency: {d}", "", f"![latency]({base.name}.png)", ""]
    if rows:
        md += ["## Summary", "", _md_table(rows, multi), "", "Speedup: tokens/s over the reference `ar` on the same task. "
               "Lossless mismatches: greedy outputs of a lossless decoder that differ from its checkpoint's `ar`.", ""]
        md += ["## Sources", ""] + [f"- `{run.folder}`: `{run.meta['command']}`" for run in runs] + [""]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(out / "report.md")
    written.append(out / "report.md")
    return written
