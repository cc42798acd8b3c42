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
from .provenance import portable_path, portable_text

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
            r["label"], r["run"], r["ckpt"] = label, folder.name, sub or model
            rows.append(r)
    # a command an older version recorded with absolute paths shows them in portable form
    meta = {"model": model, "device": device, "date": _date(info_file), "command": portable_text(info.get("command", ""))}
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


# Fixed colours, so a family looks the same in every figure; markers tell its settings apart.
FAMILY_COLORS = {"ar": "#222222", "hf": "#8c564b", "eagle": "#1f77b4", "dflash": "#9467bd", "tidar": "#d62728",
                 "bd": "#2ca02c"}
MARKERS = "osD^vP*Xph<>"


def _family(r: dict) -> str:
    return r["decoder"].split("(", 1)[0]


def _lossless(r: dict) -> bool:
    """The harness compares a decoder's greedy outputs with ar's only when it is lossless."""
    return r.get("mismatches_vs_ar") not in (None, "")


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _place(ax, candidates: list[dict], obstacles: list, renderer, leader: bool = False):
    """Annotate with the first candidate (ax.annotate keyword arguments) whose text box overlaps no
    obstacle and stays inside the axes; else the least bad one. The chosen box joins `obstacles`.
    With `leader`, a text placed away from its point gets a thin line to it."""
    box = ax.get_window_extent(renderer)
    best = None
    for kw in candidates:
        t = ax.annotate(**kw)
        e = t.get_window_extent(renderer)
        bb = (e.x0 - 1, e.y0 - 1, e.x1 + 1, e.y1 + 1)
        outside = (max(0, box.x0 - bb[0]) + max(0, bb[2] - box.x1)) * (bb[3] - bb[1]) + \
                  (max(0, box.y0 - bb[1]) + max(0, bb[3] - box.y1)) * (bb[2] - bb[0])
        cost = sum(_overlap(bb, o) for o in obstacles) + 4 * outside
        if best is None or cost < best[0]:
            if best is not None:
                best[1].remove()
            best = (cost, t, bb, kw)
        else:
            t.remove()
        if cost == 0:
            break
    _, t, bb, kw = best
    dx, dy = kw.get("xytext", (0, 0))
    if leader and (abs(dx) > 10 or abs(dy) > 10):
        t.remove()
        t = ax.annotate(**kw, arrowprops=dict(arrowstyle="-", lw=0.5, color=kw.get("color"), alpha=0.7))
    obstacles.append(bb)
    return t


# label offsets around a point (points): beside it first, then above/below, then further out
_OFFSETS = [(7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"), (-7, -4, "right", "top"),
            (0, 10, "center", "bottom"), (0, -10, "center", "top"), (12, 18, "left", "bottom"),
            (12, -18, "left", "top"), (-12, 18, "right", "bottom"), (-12, -18, "right", "top"),
            (0, 30, "center", "bottom"), (0, -30, "center", "top"), (26, 36, "left", "bottom"),
            (26, -36, "left", "top"), (-26, 36, "right", "bottom"), (-26, -36, "right", "top")]


def _place_labels(ax, points: list[tuple[float, float, str, str]], lines: list[tuple[float, str, str]],
                  bars: list[tuple[float, float, float]]) -> None:
    """Write every point's label next to it and every reference line's label on it, so that no label
    covers another label, a point or an error bar (a greedy choice among a few positions each). Call
    after the layout is final: positions are display pixels."""
    renderer = ax.figure.canvas.get_renderer()
    obstacles = []
    for x, lo, hi in bars:
        (px, py0), (_, py1) = ax.transData.transform((x, lo)), ax.transData.transform((x, hi))
        obstacles.append((px - 6, min(py0, py1) - 6, px + 6, max(py0, py1) + 6))
    for y, text, color in lines:
        cands = [dict(text=text, xy=(fx, y), xycoords=("axes fraction", "data"), xytext=(dx, dy),
                      textcoords="offset points", ha=ha, va=va, fontsize=7, color=color, style="italic")
                 for fx, dx, ha in ((1, -3, "right"), (0, 3, "left"), (0.5, 0, "center"))
                 for dy, va in ((2, "bottom"), (-2, "top"))]
        _place(ax, cands, obstacles, renderer)
    for x, y, text, color in points:
        cands = [dict(text=text, xy=(x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                      fontsize=7.5, color=color) for dx, dy, ha, va in _OFFSETS]
        _place(ax, cands, obstacles, renderer, leader=True)


def one_row_per_setting(rows: list[dict]) -> list[dict]:
    """The rows a figure draws: one per (run, checkpoint, decoder setting), its task's first metric and
    filter (gsm8k writes strict-match and flexible-extract rows for each decoder: drawn both, every
    point would carry its label twice). The report's table keeps every row."""
    seen, kept = set(), []
    for r in rows:
        key = (r.get("run"), r.get("ckpt"), r["decoder"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def plot_task(task: str, rows: list[dict], metas: list[dict], out_base: Path) -> list[Path]:
    """Two panels for one task: score vs tokens/s and score vs T/NFE. One colour per decoder family,
    one marker per setting or checkpoint within it, filled when the decoder is lossless (its greedy
    outputs were compared with ar's), hollow when lossy; every point labelled beside itself (no
    legend). Each checkpoint's `ar` is a horizontal line at its score: a lossless decoder must sit on
    the line of its own checkpoint, how far right is its speedup. The `ar` of a second checkpoint (a
    reference for its own decoders) is only that line, not a point; it stays in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = one_row_per_setting(rows)
    ckpts = list(dict.fromkeys(r["ckpt"] for r in rows))
    ar_rows = {}
    for r in rows:
        if r["decoder"] == "ar" and r["score"] is not None:
            ar_rows.setdefault(r["ckpt"], r)
    main = ckpts[0] if not ar_rows else next(iter(ar_rows))
    several = len({r["run"] for r in rows}) > 1

    def label(r):
        lab = r["label"]
        if r["ckpt"] != main and "[" not in lab:  # plain run folders: name the checkpoint
            lab += f" [{r['ckpt']}]"
        return lab

    pts = [r for r in rows if r["score"] is not None and not (r["decoder"] == "ar" and r["ckpt"] != main)]
    labels = [label(r) for r in pts]
    if several:  # the same setting from several runs: say which run
        dup = {lab for lab in labels if labels.count(lab) > 1}
        labels = [f"{r['run']}: {lab}" if lab in dup else lab for r, lab in zip(pts, labels)]
    families = list(dict.fromkeys(_family(r) for r in pts))
    from matplotlib.colors import to_hex

    spare = iter(c for c in map(to_hex, plt.get_cmap("tab10").colors) if c not in FAMILY_COLORS.values())
    colors = {f: FAMILY_COLORS.get(f) or next(spare, "grey") for f in families}
    marker = {}
    for f in families:
        for i, lab in enumerate(dict.fromkeys(lab for r, lab in zip(pts, labels) if _family(r) == f)):
            marker[lab] = MARKERS[i % len(MARKERS)]

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    panels = ((axes[0], "tokens_per_s", "tokens / s (batch 1)"), (axes[1], "tokens_per_nfe", "tokens per forward pass (T/NFE)"))
    pending = []
    for ax, xkey, xlabel in panels:
        drawn, lines, bars = {}, [], []
        for r, lab in zip(pts, labels):
            if r[xkey] is None:
                continue
            c, lossless = colors[_family(r)], _lossless(r) or r["decoder"] == "ar"
            ax.errorbar([r[xkey]], [r["score"]], yerr=[r["stderr"] or 0], fmt=marker[lab], ms=8, capsize=3, color=c,
                        mfc=c if lossless else "white", mew=1.5, zorder=3)
            bars.append((r[xkey], r["score"] - (r["stderr"] or 0), r["score"] + (r["stderr"] or 0)))
            text = lab
            if xkey == "tokens_per_s" and r["decoder"] != "ar" and r.get("speedup_vs_ar") is not None:
                text += f"  {r['speedup_vs_ar']:.2f}×"
            if _lossless(r) and int(float(r["mismatches_vs_ar"])) > 0:
                text += f"  ≠ar: {int(float(r['mismatches_vs_ar']))}!"
            key = (round(r[xkey], 6), round(r["score"], 6))  # points on top of each other share one label
            if key in drawn:
                drawn[key] = (drawn[key][0] + ", " + text, drawn[key][1])
            else:
                drawn[key] = (text, c)
        front = pareto([k for k in drawn])
        if len(front) > 1:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="pre", lw=3, color="grey", alpha=0.15, zorder=1)
        for ck, a in ar_rows.items():
            col = "black" if ck == main else colors.get(next((_family(r) for r in pts if r["ckpt"] == ck), ""), "grey")
            ax.axhline(a["score"], ls="--" if ck == main else ":", lw=1, color=col, alpha=0.8, zorder=2)
            name = "ar" if ck == main else f"ar [{ck}]"
            same = next((i for i, ln in enumerate(lines) if abs(ln[0] - a["score"]) < 1e-9), None)
            if same is None:
                lines.append((a["score"], f"{name} score {a['score']:.3f}", col))
            else:  # checkpoints with one score share one label
                lines[same] = (a["score"], lines[same][1].replace(" score", f", {name} score"), lines[same][2])
        if main in ar_rows and ar_rows[main][xkey] is not None:
            ax.axvline(ar_rows[main][xkey], ls="--", lw=0.8, color="black", alpha=0.4, zorder=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{rows[0]['metric'].replace(',', ', ')} (higher is better)")
        ax.grid(alpha=0.25)
        ax.margins(x=0.18, y=0.16)
        if xkey == "tokens_per_nfe":
            ax.set_xlim(left=0)
        if bars and max(b[2] for b in bars) - min(b[1] for b in bars) < 0.02:  # equal scores: a readable range
            mid = (max(b[2] for b in bars) + min(b[1] for b in bars)) / 2
            ax.set_ylim(mid - 0.05, mid + 0.05)
        pending.append((ax, [(x, y, t, c) for (x, y), (t, c) in drawn.items()], lines, bars))
    models = ", ".join(sorted({m["model"] for m in metas}))
    devices = ", ".join(sorted({m["device"] for m in metas}))
    dates = ", ".join(sorted({m["date"] for m in metas}))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    runs = ", ".join(runs) if len(runs) <= 3 else f"{len(runs)} runs (report.md lists them)"
    fig.suptitle(f"{task.removeprefix('tb_')} — {models} — {runs} — {devices} — {dates}", fontsize=10)
    compiled = {str(r.get("compiled")) for r in pts if r.get("compiled") not in (None, "")}
    notes = ["filled: lossless (greedy outputs compared with ar's), hollow: lossy", "dashed: ar's score and speed",
             "× = speedup over the ar of the same checkpoint", "bars: ±1 s.e.", "grey band: Pareto frontier"]
    if compiled:
        notes.append("compiled" if compiled == {"True"} else "eager" if compiled == {"False"} else "compiled and eager mixed")
    fig.text(0.5, 0.01, " · ".join(notes), ha="center", va="bottom", fontsize=7.5, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.canvas.draw()
    for ax, *labels_lines_bars in pending:  # once the layout is final
        _place_labels(ax, *labels_lines_bars)
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
    title = f"{portable_text(str(meta.get('model', '?')))} · {env.get('device_name') or meta.get('label', '')} · {meta.get('dtype', '')}"
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
          over the batch; compile time of step shapes first met inside a round, compile_s_excluded,
          is not in decode_s), tokens_per_nfe, per_sequence_latency_s: {median, q1, q3} (prompt in to
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
    fig.suptitle(f"{portable_text(str(rec.get('model', '?')))} — {device} — {rec.get('prompts', '')}", fontsize=9)
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


def make_report(folders: list[Path], out: Path, together: bool = False, command: str | None = None) -> list[Path]:
    """Figures for every task of every run folder and every latency folder, plus report.md (with
    `command`, the plot command itself, under Sources). One run per figure (pareto_<task>_<run>
    when there are several) unless `together`: then every run's points share one figure per task
    (e.g. a threshold sweep stored as one run per threshold)."""
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
    groups = [runs] if together or len(runs) == 1 else [[run] for run in runs]
    for task in dict.fromkeys(r["task"] for r in rows):
        md += [f"## {task.removeprefix('tb_')}", ""]
        for group in groups:
            task_rows = [r for run in group for r in run.rows if r["task"] == task]
            if not task_rows:
                continue
            base = out / (f"pareto_{task.removeprefix('tb_')}" + ("" if len(groups) == 1 else f"_{group[0].folder.name}"))
            written += plot_task(task, task_rows, [run.meta for run in group], base)
            md += [f"![{task}]({base.name}.png)", ""]
    for i, d in enumerate(latency):
        base = out / f"latency_{d.name or i}"
        written += plot_latency(d, base)
        md += [f"## Forward latency: {portable_path(d)}", "", f"![latency]({base.name}.png)", ""]
        if (out / f"{base.name}_batch.png") in written:
            md += [f"![latency vs batch size]({base.name}_batch.png)", ""]
    for d, rec in speeds:
        base = out / f"speed_batch_{d.stem if d.is_file() else d.name}"
        written += plot_speed_batch(rec, base)
        md += [f"## Throughput and speedup vs batch size: {portable_path(d)}", "", f"![speed vs batch]({base.name}.png)", "",
               _speed_batch_table(rec), "", f"Command: `{portable_text(rec.get('command', ''))}`", ""]
    if rows:
        md += ["## Summary", "", _md_table(rows, multi), "", "Speedup: tokens/s over the reference `ar` on the same task. "
               "Lossless mismatches: greedy outputs of a lossless decoder that differ from its checkpoint's `ar`.", ""]
        md += ["## Sources", ""] + [f"- `{portable_path(run.folder)}`: `{run.meta['command']}`" for run in runs] + [""]
    if command:
        md += [f"Figures and this report: `{command}`", ""]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(out / "report.md")
    written.append(out / "report.md")
    return written
