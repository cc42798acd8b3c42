"""`tidar-bench plot`: figures and a report from run folders and profile-latency folders.

Inputs, any mix:
- a `tidar-bench run` folder (summary.csv + run.json), or an embedded-suite folder (summary.csv with a
  model column + suite.json, one run folder per checkpoint inside);
- a `tidar-bench profile-latency` folder (latency.csv + latency.json);
- a batched `tidar-bench speed --batch-size 1,2,4 --out FILE.json` result (or a folder holding one
  as speed.json): throughput and speedup vs batch size per decoder (format: `SPEED_BATCH_FORMAT`).

Per task: quality vs tokens/s and quality vs T/NFE, one point per (run, checkpoint, decoder, setting),
the Pareto frontier (no other point is both faster and better), AR as the reference (dashed lines at
its score and speed) and every point's speedup over AR annotated. Per profile folder: the latency vs
slots curve (profiling.plot; with several batch sizes also profiling.plot_batches). Per batched speed
file: tokens/s over the batch and speedup over the reference decoder at the same batch size, both
against batch size, one line per decoder. PNG + SVG each, and report.md with the figures and the
summary table."""

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
    """k=v,... of the given options; a path (e.g. dflash's draft=DIR) shows as its last part."""
    def short(v):
        return Path(v).name if isinstance(v, str) and "/" in v else v

    return ",".join(f"{k}={short(v)}" for k, v in sorted(given.items()))


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
            # decoder = the setting as written (`tidar(block_size=4)`); its given options (the setting's
            # and --decoder-arg's) make the label, so both spellings of one setting label alike
            name = r["decoder"].split("(", 1)[0]
            label = name + (f"({opts})" if opts else "") + (f" [{sub}]" if sub and sub != "base" else "")
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
    from .profiling import save_figure

    return save_figure(fig, base)


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
    """The latency curve of the first batch size; with several batch sizes also out_base + "_batch"
    (profiling.plot_batches, knee and predicted speedup per batch size recomputed from the points)."""
    from .profiling import Point, analyse, plot, plot_batches

    folder = Path(folder)
    meta = json.loads((folder / "latency.json").read_text())
    points = []
    with (folder / "latency.csv").open() as f:
        for r in csv.DictReader(f):
            points.append(Point(int(r["context"]), int(r["slots"]), float(r["median_ms"]), float(r["q1_ms"]),
                                float(r["q3_ms"]), int(r["repeats"]), r["mask"],
                                int(r["block_size"]) if r["block_size"] else None, int(r.get("batch") or 1)))
    batches = sorted({p.batch for p in points})
    knees = {int(k): v for k, v in (meta.get("knee") or {}).items()}
    env = meta.get("environment") or {}
    title = f"{meta.get('model', '?')} · {env.get('device_name') or meta.get('label', '')} · {meta.get('dtype', '')}"
    tolerance = float(meta.get("tolerance", 0.1))
    plot([p for p in points if p.batch == batches[0]], knees, tolerance, f"{title} · batch {batches[0]}", out_base)
    written = [out_base.with_suffix(".png"), out_base.with_suffix(".svg")]
    if len(batches) > 1:
        tnfe = {int(k): float(v) for k, v in (meta.get("tnfe") or {}).items()}
        batch_base = out_base.with_name(out_base.name + "_batch")
        plot_batches(points, analyse(points, tolerance, tnfe), f"{title} · batch {','.join(map(str, batches))}", batch_base)
        written += [batch_base.with_suffix(".png"), batch_base.with_suffix(".svg")]
    return written


SPEED_BATCH_FORMAT = """\
`tidar-bench speed --batch-size 1,2,4 --out FILE.json` writes one JSON object:
  command, environment, model, seed, prompts, max_new_tokens, dtype, device  (as batch-1 speed)
  reference: the first decoder (speedups are against it at the same batch size)
  batch_sizes: [1, 2, 4]
  decoders: {name: {options, lossless}}
  batch: {"<B>": {name: {tokens, decode_s, nfe, tokens_per_s (all new tokens / decode wall time,
          over the batch), tokens_per_nfe, per_sequence_latency_s: {median, q1, q3} (prompt in to
          last token out, per prompt), speedup_vs_reference (tokens_per_s / the reference's),
          paired_ratios ([per round] tokens/s ratio vs the reference decoding the same prompts in the
          same process, back to back), lossless_mismatches (prompts whose greedy tokens differ from
          the reference's; lossless decoders only, else null)}}}
"""


def read_speed_batch(path: Path) -> dict:
    """A batched speed result: FILE.json or a folder holding speed.json (see SPEED_BATCH_FORMAT)."""
    path = Path(path)
    f = path / "speed.json" if path.is_dir() else path
    try:
        rec = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read a speed result: {e}")
    if not isinstance(rec, dict) or not isinstance(rec.get("batch"), dict) or not rec.get("batch_sizes"):
        raise UserError(f"{f} is not a batched speed result (no `batch` / `batch_sizes`; "
                        "write one with `tidar-bench speed --batch-size 1,2,4 --out FILE.json`)")
    return rec


def plot_speed_batch(rec: dict, out_base: Path) -> list[Path]:
    """Left: tokens/s over the batch vs batch size; right: speedup over the reference decoder at the
    same batch size (bars: interquartile range of the paired per-round ratios), one line per decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(int(b) for b in rec["batch"])
    names = list(dict.fromkeys(n for b in batches for n in rec["batch"][str(b)]))
    ref = rec.get("reference") or names[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for name in names:
        xs = [b for b in batches if name in rec["batch"][str(b)]]
        cells = [rec["batch"][str(b)][name] for b in xs]
        (line,) = left.plot(xs, [c["tokens_per_s"] for c in cells], marker="o", label=name)
        ys = [c["speedup_vs_reference"] for c in cells]
        lo, hi = [], []
        for c, y in zip(cells, ys):
            r = sorted(c.get("paired_ratios") or [y])
            q = _quartiles(r)
            lo.append(max(0.0, y - q[0]))
            hi.append(max(0.0, q[1] - y))
        if name != ref:
            right.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=line.get_color(), label=name)
    right.axhline(1.0, ls="--", lw=0.8, color="black", label=f"{ref} (reference)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    left.set_ylabel("tokens / s over the batch")
    right.set_ylabel(f"speedup over {ref} at the same batch size")
    env = rec.get("environment") or {}
    device = env.get("gpu") or f"CPU {env.get('cpu') or ''}".strip()
    fig.suptitle(f"{rec.get('model', '?')} — {device} — {rec.get('prompts', '')}", fontsize=9)
    fig.tight_layout()
    paths = _savefig(fig, out_base)
    plt.close(fig)
    return paths


def _quartiles(xs: list[float]) -> tuple[float, float]:
    from .profiling import quartiles

    _, q1, q3 = quartiles(xs)
    return q1, q3


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


def _speed_batch_table(rec: dict) -> str:
    ref = rec.get("reference")
    lines = [f"| batch | decoder | tokens/s | T/NFE | per-seq latency s (median) | speedup vs {ref} | "
             "paired ratio IQR | lossless mismatches |", "|" + "---|" * 8]
    for b in sorted(rec["batch"], key=int):
        for name, c in rec["batch"][b].items():
            r = sorted(c.get("paired_ratios") or [])
            iqr = "–" if not r else "{:.2f}–{:.2f}".format(*_quartiles(r))
            mm = c.get("lossless_mismatches")
            lines.append(f"| {b} | {name} | {c['tokens_per_s']:.1f} | {c.get('tokens_per_nfe', 0):.2f} | "
                         f"{c['per_sequence_latency_s']['median']:.3f} | {c['speedup_vs_reference']:.2f} | {iqr} | "
                         f"{'–' if mm is None else mm} |")
    return "\n".join(lines)


def make_report(folders: list[Path], out: Path) -> list[Path]:
    """Figures for every task of every run folder and every latency folder, plus report.md."""
    runs, latency, speeds = [], [], []
    for d in folders:
        d = Path(d)
        if (d.is_file() and d.suffix == ".json") or (d / "speed.json").is_file():
            speeds.append((d, read_speed_batch(d)))
        elif not d.is_dir():
            raise UserError(f"{d} is neither a folder nor a speed .json file")
        elif (d / "latency.csv").is_file() and (d / "latency.json").is_file():
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
        if (out / f"{base.name}_batch.png") in written:
            md += [f"![latency vs batch size]({base.name}_batch.png)", ""]
    for d, rec in speeds:
        base = out / f"speed_batch_{d.stem if d.is_file() else d.name}"
        written += plot_speed_batch(rec, base)
        md += [f"## Throughput and speedup vs batch size: {d}", "", f"![speed vs batch]({base.name}.png)", "",
               _speed_batch_table(rec), "", f"Command: `{rec.get('command', '')}`", ""]
    if rows:
        md += ["## Summary", "", _md_table(rows, multi), "", "Speedup: tokens/s over the reference `ar` on the same task. "
               "Lossless mismatches: greedy outputs of a lossless decoder that differ from its checkpoint's `ar`.", ""]
        md += ["## Sources", ""] + [f"- `{run.folder}`: `{run.meta['command']}`" for run in runs] + [""]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(out / "report.md")
    written.append(out / "report.md")
    return written
