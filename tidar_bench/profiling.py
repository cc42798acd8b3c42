"""Forward latency vs token slots (the paper's Figure 1) at batch 1 and at larger batch sizes, the
free-slot knee per batch size, and the TiDAR speedup it predicts per block size and batch size.

For each context length C: a KV cache prefilled to C with random token ids, then timed forwards
of the model core (Transformer.forward, its real attention path) over n fed tokens, cropping the
cache back to C after each one. Two kinds of forward:

- "causal": n new tokens, causal among themselves, full access to the cache. Fed with the model's
  own causal path (mask=None), which is `masks.causal(n, C)` (tested) and is exactly what the AR
  decoder feeds, so latency(1) is the AR baseline step.
- "tidar": the exact steady-state TiDAR decoding step for block size k: x + k-1 drafts (causal),
  then one k-long pre-draft block per outcome 0..k-1, i.e. k + k*k slots, with the mask
  `masks.tidar_step`, positions `layout.positions()` and the logits rows the decoder computes.

Timing: CUDA events around each forward after warm-up (optionally replaying a captured CUDA graph
of the fixed-shape forward); on CPU `time.perf_counter`. Median and interquartile range over the
repeats. Knee: the largest n such that every measured n' <= n costs <= (1 + tolerance) x latency(1).
Predicted TiDAR speedup in tokens/s over AR: T/NFE(k) x latency(1) / latency(TiDAR step with k).

Batch B > 1: every forward feeds B rows at once, each row the same n tokens (the same layout and
mask, broadcast), over a cache of B rows each prefilled to C. Knee and prediction are per batch
size, against AR at the same batch size: AR commits B tokens per lat_B(1), TiDAR B x T/NFE(k) per
lat_B(step k), so the throughput speedup is T/NFE(k) x lat_B(1) / lat_B(step k). A batched decoder
pads every row to the longest row of the step, so lat_B(step k) is what a batched TiDAR step costs.
As B grows the forward leaves the memory-bound regime sooner: the knee moves left and so does the
speedup drafting can buy.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import masks
from .errors import UserError
from .model import ModelConfig, Transformer, init_weights, rope_inv_freq

CONFIGS_DIR = Path(__file__).parent / "configs"
PREFILL_CHUNK = 512
PREFILL_TOKENS = 4096


# ----------------------------------------------------------------------------- models


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def shipped_config(name: str) -> dict:
    """The config.json contents of a shipped architecture (tidar_bench/configs/<name>.json)."""
    f = CONFIGS_DIR / f"{name}.json"
    if not f.is_file():
        raise UserError(f"unknown config {name!r}; shipped configs: {', '.join(config_names())}")
    return json.loads(f.read_text())


def random_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """A shipped architecture with random weights (`init_weights`), allocated once on `device` in
    `dtype` (built on the meta device first, so an 8B model never exists in fp32)."""
    cfg = ModelConfig.from_dict(shipped_config(name))
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    init_weights(model, seed=seed)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- what one forward feeds


def tidar_slots(k: int) -> int:
    """Tokens fed by a steady-state TiDAR step with block size k: x + (k-1) drafts + k blocks of k."""
    return k + k * k


def tidar_layout(context: int, k: int) -> masks.TidarStepLayout:
    """The steady-state step the TiDAR decoder takes after `context` cached tokens."""
    return masks.TidarStepLayout(cached=context, n_drafts=k - 1, block_size=k, outcomes=tuple(range(k)))


def tidar_logits_rows(layout: masks.TidarStepLayout) -> list[int]:
    """Fed rows the decoder computes logits for in a steady-state step: the causal rows (verification)
    and offsets 1..k-1 of every pre-draft block (the next drafts). Checked against the decoder in tests."""
    rows = list(range(layout.n_causal))
    for b in range(len(layout.outcomes)):
        s = layout.block_start(b)
        rows += range(s + 1, s + layout.block_size)
    return rows


@dataclass
class Forward:
    """The inputs of one timed forward (besides token ids): positions [n], mask [n, C+n] or None
    (the model's causal path), logits rows or None (all)."""

    kind: str  # "causal" | "tidar"
    n: int  # slots = tokens fed
    positions: torch.Tensor
    mask: torch.Tensor | None
    logits_index: torch.Tensor | None
    block_size: int | None = None


def step_inputs(kind: str, context: int, n: int, device: torch.device | str = "cpu") -> Forward:
    """kind "causal": n new tokens; kind "tidar": n is the block size k (the step feeds k + k*k)."""
    if kind == "causal":
        return Forward("causal", n, torch.arange(context, context + n, device=device), None, None)
    if kind != "tidar":
        raise ValueError(f"unknown forward kind {kind!r}")
    layout = tidar_layout(context, n)
    rows = torch.tensor(tidar_logits_rows(layout), dtype=torch.long, device=device)
    return Forward("tidar", layout.n_fed, layout.positions(device), masks.tidar_step(layout, device), rows, n)


# ----------------------------------------------------------------------------- timing


@dataclass
class Point:
    context: int
    slots: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    mask: str
    block_size: int | None
    batch: int = 1  # rows per forward; slots are tokens fed per row


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, q1, q3), quartiles by linear interpolation between order statistics."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q1, q3


def _cuda_graph(run: Callable[[], None], reset: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """Capture one call of `run` (a fixed-shape forward at a fixed cache length) into a CUDA graph.
    Warm-up runs on a side stream first, as torch.cuda.graphs requires; `reset` crops the cache
    back before every run so the captured kernels write the same KV slots as the replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            reset()
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(graph):
        run()
    reset()
    torch.cuda.synchronize()
    return graph


def _time_ms(run: Callable[[], None], reset: Callable[[], None], repeats: int, warmup: int, cuda: bool) -> list[float]:
    times = []
    for r in range(warmup + repeats):
        reset()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        if r >= warmup:
            times.append(ms)
    reset()
    return times


@torch.inference_mode()
def measure(model: Transformer, contexts: list[int], slots: list[int], block_sizes: list[int], repeats: int,
            warmup: int, seed: int = 0, cuda_graphs: bool = False, progress: Callable[[Point], None] | None = None,
            batches: list[int] = (1,), compile: bool = False) -> list[Point]:
    """Causal latency at every n in `slots` and TiDAR-step latency for every k in `block_sizes`,
    at every context length and every batch size (B rows, each fed the same n tokens).
    compile: time the decoders' compiled static-shape step (tidar_bench/compiled.py; its
    compilation happens in the warm-up runs, outside the timings) instead of the eager forward."""
    dev = model.device
    cuda = dev.type == "cuda"
    if cuda_graphs and not cuda:
        raise UserError("--cuda-graphs needs a CUDA device")
    g = torch.Generator().manual_seed(seed)
    jobs = [("causal", n) for n in slots] + [("tidar", k) for k in block_sizes]
    biggest = max([*slots, *(tidar_slots(k) for k in block_sizes)])
    points = []
    steps = None
    if compile:
        from .compiled import Steps

        # CPU: one static graph per shape, as the decoders compile them (a dynamic kv_len window
        # measured a third slower); CUDA: dozens of shapes x two contexts per model in gpu_check's
        # budget, so torch's automatic dynamic shapes
        steps = Steps(model, dev, compiled=True, dynamic=None if cuda else False, name="profile-latency step")
        warmup = max(warmup, 3)  # first calls compile (and record CUDA graphs)
    for B in batches:
        cache = model.new_cache(max(contexts) + biggest, batch=B)
        points += _measure_batch(model, cache, B, contexts, jobs, repeats, warmup, g, cuda_graphs, progress, steps)
        del cache  # freed before the next batch size's cache is allocated
    return points


def _measure_batch(model, cache, B, contexts, jobs, repeats, warmup, g, cuda_graphs, progress, steps=None) -> list[Point]:
    dev, V = model.device, model.config.vocab_size
    cuda = dev.type == "cuda"
    points = []
    chunk = max(1, min(PREFILL_CHUNK, PREFILL_TOKENS // B))  # prefill forwards of <= PREFILL_TOKENS tokens
    for C in contexts:
        cache.reset()
        for s in range(0, C, chunk):
            ids = torch.randint(0, V, (B, min(chunk, C - s)), generator=g).to(dev)
            model(ids, cache=cache, return_logits=False)
        for kind, n in jobs:
            f = step_inputs(kind, C, n, dev)
            ids = torch.randint(0, V, (B, f.n), generator=g).to(dev)

            def run():
                if steps is not None:  # the compiled static step: local mask over the fed tokens only
                    local = None if f.mask is None else f.mask[:, C:]
                    steps(ids, f.positions, cache=cache, local_mask=local, logits_index=f.logits_index)
                else:
                    model(ids, f.positions, f.mask, cache, logits_index=f.logits_index)

            def reset():
                cache.crop(C)

            if cuda:
                torch.cuda.synchronize(dev)
            if cuda_graphs:
                graph = _cuda_graph(run, reset)
                times = _time_ms(graph.replay, reset, repeats, warmup, cuda)
                del graph
            else:
                times = _time_ms(run, reset, repeats, warmup, cuda)
            med, q1, q3 = quartiles(times)
            points.append(Point(C, f.n, med, q1, q3, repeats, kind, f.block_size, B))
            if progress is not None:
                progress(points[-1])
    return points


# ----------------------------------------------------------------------------- analysis


def knee(curve: dict[int, float], tolerance: float = 0.1) -> int:
    """The largest measured n such that every measured n' <= n (walking up from n = 1, stopping
    at the first miss) has latency(n') <= (1 + tolerance) * latency(1). 1 when even the next
    measured point is over the limit. `curve` maps slots -> latency and must contain 1."""
    if 1 not in curve:
        raise ValueError("the curve needs latency(1)")
    limit = (1 + tolerance) * curve[1]
    best = 1
    for n in sorted(curve):
        if curve[n] > limit:
            break
        best = n
    return best


def predict_speedup(tnfe: dict[int, float], lat1: float, step_latency: dict[int, float]) -> dict[int, float]:
    """Predicted tokens/s speedup over AR per block size k: T/NFE(k) x lat(1) / lat(step with k).
    Block sizes without a step latency are left out."""
    return {k: tnfe[k] * lat1 / step_latency[k] for k in sorted(tnfe) if step_latency.get(k)}


def best_block_size(speedup: dict[int, float]) -> int | None:
    return max(speedup, key=speedup.get) if speedup else None


@dataclass
class Analysis:
    """What one (batch size, context length) curve says."""

    batch: int
    context: int
    knee: int
    latency_1_ms: float
    ratios: dict[int, float]  # slots -> latency / latency(1)
    predicted_speedup: dict[int, float]  # block size -> predicted speedup over AR at this batch size
    recommended_block_size: int | None


def analyse(points: list[Point], tolerance: float, tnfe: dict[int, float] | None = None) -> list[Analysis]:
    """Knee, latency ratios and (with `tnfe`) the predicted TiDAR speedup for every measured
    (batch, context), each against latency(1) at the same batch size. The step latency of block
    size k is the exact TiDAR step when it was measured (mask "tidar"), else the causal forward of
    k + k*k tokens."""
    out = []
    for B, C in sorted({(p.batch, p.context) for p in points}):
        here = [p for p in points if p.batch == B and p.context == C]
        curve = {p.slots: p.median_ms for p in here if p.mask == "causal"}
        pred: dict[int, float] = {}
        if tnfe:
            step = {p.block_size: p.median_ms for p in here if p.mask == "tidar"}
            if not step:
                step = {k: curve[tidar_slots(k)] for k in tnfe if tidar_slots(k) in curve}
            pred = predict_speedup(tnfe, curve[1], step)
        out.append(Analysis(B, C, knee(curve, tolerance), curve[1], {n: v / curve[1] for n, v in sorted(curve.items())},
                            pred, best_block_size(pred)))
    return out


def parse_tnfe(spec: str) -> dict[int, float]:
    """T/NFE per block size from comma-separated items, each either `k=T/NFE`, a CSV file with a
    block-size column (k or block_size) and a T/NFE column (tidar_T_per_NFE, tokens_per_nfe or
    T/NFE), or a `tidar-bench run` folder (its run.json: the tidar decoder's block size, from its
    options or the checkpoint's tidar_config.json, and its measured tokens_per_nfe)."""
    out: dict[int, float] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if "=" in item and not Path(item).exists():
            k, _, v = item.partition("=")
            try:
                out[int(k)] = float(v)
            except ValueError:
                raise UserError(f"--tnfe expects k=T/NFE pairs like 4=3.1,8=5.2, a CSV or a run folder; got {item!r}")
        elif Path(item).is_dir():
            out.update(_tnfe_from_run(Path(item)))
        elif Path(item).is_file():
            out.update(_tnfe_from_csv(Path(item)))
        else:
            raise UserError(f"--tnfe: {item!r} is neither k=T/NFE nor an existing CSV file or run folder")
    if not out:
        raise UserError("--tnfe is empty")
    bad = [k for k, v in out.items() if k < 1 or not v > 0]
    if bad:
        raise UserError(f"--tnfe needs block sizes >= 1 and T/NFE > 0; check k={bad[0]}")
    return out


def _tnfe_from_csv(f: Path) -> dict[int, float]:
    out = {}
    with f.open(newline="") as fh:
        for r in csv.DictReader(fh):
            k = r.get("k") or r.get("block_size")
            v = r.get("tidar_T_per_NFE") or r.get("tokens_per_nfe") or r.get("T/NFE")
            if k and v:
                try:
                    out[int(k)] = float(v)
                except ValueError:
                    raise UserError(f"{f}: bad block size / T/NFE values {k!r}, {v!r}")
    if not out:
        raise UserError(f"{f} has no block-size (k or block_size) and T/NFE (tidar_T_per_NFE or tokens_per_nfe) columns")
    return out


def _tnfe_from_run(d: Path) -> dict[int, float]:
    from .checkpoint import TidarConfig

    f = d / "run.json"
    if not f.is_file():
        raise UserError(f"--tnfe: {d} has no run.json (not a finished `tidar-bench run` folder)")
    run = json.loads(f.read_text())
    tidar = run.get("decoders", {}).get("tidar")
    if not tidar or not tidar.get("tokens_per_nfe"):
        raise UserError(f"--tnfe: {f} has no tidar decoder with a measured tokens_per_nfe")
    k = (tidar.get("options") or {}).get("block_size")
    model = (run.get("identity") or {}).get("model")
    if k is None and model and TidarConfig.exists(model):
        k = TidarConfig.load(model).block_size
    if k is None:
        raise UserError(f"--tnfe: cannot tell the block size of the tidar run in {d}; pass it as k=T/NFE")
    return {int(k): float(tidar["tokens_per_nfe"])}


# ----------------------------------------------------------------------------- environment and plot


def device_info(device: torch.device) -> dict:
    """Where the numbers come from: provenance.environment() plus the device's name, clocks and driver."""
    import subprocess

    from .provenance import environment

    info = environment()
    info["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(timer="CUDA events", device_name=props.name, device_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            q = subprocess.run(["nvidia-smi", f"--id={device.index or 0}",
                                "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = {"query": "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                                  "value": q.stdout.strip() or None}
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    else:
        info.update(timer="time.perf_counter (CPU)",
                    device_name=f"{info.get('cpu') or 'unknown CPU'}, {info['threads']} threads")
    return info


def save_figure(fig, out_base: Path) -> list[Path]:
    """fig -> out_base.png and out_base.svg, each written to a temp file and renamed."""
    out = []
    for ext in ("png", "svg"):
        tmp = out_base.with_name(f".{out_base.name}.tmp.{ext}")
        fig.savefig(tmp, dpi=130, format=ext)
        tmp.replace(out_base.with_suffix(f".{ext}"))
        out.append(out_base.with_suffix(f".{ext}"))
    return out


def plot(points: list[Point], knees: dict[int, int], tolerance: float, title: str, out_base: Path) -> None:
    """latency vs slots (log2 x), one line per context with its IQR band, its knee and the knee's
    limit (1 + tolerance) x latency(1) dotted; TiDAR steps as crosses. Writes out_base.png and
    out_base.svg atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, C in enumerate(sorted({p.context for p in points})):
        causal = sorted((p.slots, p.median_ms, p.q1_ms, p.q3_ms) for p in points if p.context == C and p.mask == "causal")
        color = None
        if causal:
            xs, ys, lo, hi = zip(*causal)
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"context {C}")
            color = line.get_color()
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
            kn = knees.get(C)
            if kn is not None:
                curve = dict(zip(xs, ys))
                ax.axhline((1 + tolerance) * curve[1], ls=":", lw=0.8, color=color)
                ax.scatter([kn], [curve[kn]], s=90, facecolors="none", edgecolors=color, zorder=5)
                ax.annotate(f"knee {kn}", (kn, curve[kn]), textcoords="offset points", xytext=(4, 8 + 10 * i),
                            fontsize=8, color=color)
        for p in sorted((p for p in points if p.context == C and p.mask == "tidar"), key=lambda p: p.slots):
            ax.scatter([p.slots], [p.median_ms], marker="x", color=color or "black", zorder=6)
            ax.annotate(f"TiDAR k={p.block_size}", (p.slots, p.median_ms), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=color or "black")
    ax.set_xscale("log", base=2)
    batch = {p.batch for p in points}
    ax.set_xlabel(f"tokens fed in one forward (slots), batch {'/'.join(map(str, sorted(batch)))}")
    ax.set_ylabel("forward latency, median (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_base)
    plt.close(fig)


def plot_batches(points: list[Point], analyses: list[Analysis], title: str, out_base: Path) -> None:
    """The batch figure: per context length, latency vs tokens fed per sequence with one line per
    batch size (knee circled, TiDAR steps as crosses); then the knee vs batch size and, when
    predicted, the TiDAR speedup over AR at the same batch size vs batch size per block size.
    Writes out_base.png and out_base.svg atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({p.context for p in points})
    batches = sorted({p.batch for p in points})
    predicted = any(a.predicted_speedup for a in analyses)
    ncols = len(contexts) + 1 + predicted
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4.2), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("viridis")
    color = {B: cmap(i / max(1, len(batches) - 1) * 0.9) for i, B in enumerate(batches)}
    by = {(a.batch, a.context): a for a in analyses}
    for ax, C in zip(axes, contexts):
        for B in batches:
            causal = sorted((p.slots, p.median_ms, p.q1_ms, p.q3_ms) for p in points
                            if p.context == C and p.batch == B and p.mask == "causal")
            if not causal:
                continue
            xs, ys, lo, hi = zip(*causal)
            ax.plot(xs, ys, marker="o", ms=3, color=color[B], label=f"batch {B}")
            ax.fill_between(xs, lo, hi, color=color[B], alpha=0.2)
            a = by.get((B, C))
            if a is not None:
                y = dict(zip(xs, ys))[a.knee]
                ax.scatter([a.knee], [y], s=90, facecolors="none", edgecolors=color[B], zorder=5)
            for p in (p for p in points if p.context == C and p.batch == B and p.mask == "tidar"):
                ax.scatter([p.slots], [p.median_ms], marker="x", color=color[B], zorder=6)
        ax.set_yscale("log")
        _axes(ax, "tokens fed per sequence (slots)", "forward latency, median (ms)", f"context {C} (o = knee, x = TiDAR step)")
    ax = axes[len(contexts)]
    for C in contexts:
        xs = [B for B in batches if (B, C) in by]
        ax.plot(xs, [by[B, C].knee for B in xs], marker="o", label=f"context {C}")
    ax.set_yscale("log", base=2)
    _axes(ax, "batch size", "knee: free slots per sequence", "where extra tokens stop being free")
    if predicted:
        ax = axes[-1]
        ks = sorted({k for a in analyses for k in a.predicted_speedup})
        styles = ["-", "--", ":", "-."]
        for ci, C in enumerate(contexts):
            for k in ks:
                xs = [B for B in batches if k in getattr(by.get((B, C)), "predicted_speedup", {})]
                ax.plot(xs, [by[B, C].predicted_speedup[k] for B in xs], marker="o", ls=styles[ci % len(styles)],
                        label=f"k={k}, context {C}")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        _axes(ax, "batch size", "predicted TiDAR speedup over AR (same batch)", "T/NFE(k) x lat_B(1) / lat_B(step k)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_base)
    plt.close(fig)


def _axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """log2 x axis, labels, small title, grid and legend: every panel of the batch figure."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
