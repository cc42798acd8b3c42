"""Forward latency vs token slots at batch 1 (the paper's Figure 1), the free-slot knee, and the
TiDAR speedup it predicts.

For each context length C: a KV cache prefilled to C, then timed forwards over n fed tokens, with
either a causal mask (`masks.causal`) or the exact TiDAR decoding-step mask (`masks.tidar_step` on
the steady-state layout the decoder uses: x + k-1 drafts + one k-block per outcome, k(k+1) slots).
The cache is cropped back to C after each forward. Timing: CUDA events after warm-up on GPU,
perf_counter on CPU; median and interquartile range over repeats.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import masks
from .errors import UserError
from .model import ModelConfig, Transformer

CONFIGS_DIR = Path(__file__).parent / "configs"


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def random_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """A shipped architecture with random weights, built directly on `device` in `dtype`."""
    f = CONFIGS_DIR / f"{name}.json"
    if not f.is_file():
        raise UserError(f"unknown config {name!r}; shipped configs: {', '.join(config_names())}")
    cfg = ModelConfig.from_dict(json.loads(f.read_text()))
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def tidar_slots(k: int) -> int:
    """Tokens fed by a steady-state TiDAR step with block size k: x + (k-1) drafts + k blocks of k."""
    return k + k * k


def tidar_layout(context: int, k: int) -> masks.TidarStepLayout:
    return masks.TidarStepLayout(cached=context, n_drafts=k - 1, block_size=k, outcomes=tuple(range(k)))


def step_inputs(kind: str, context: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [n], mask [n, context + n]) of a timed forward. kind "causal": n new tokens;
    kind "tidar": n is the block size k and the step feeds tidar_slots(k) tokens."""
    if kind == "causal":
        return torch.arange(context, context + n, device=device), masks.causal(n, context, device)
    layout = tidar_layout(context, n)
    return layout.positions(device), masks.tidar_step(layout, device)


@dataclass
class Point:
    context: int
    slots: int
    mask: str
    block_size: int | None
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[1], q[0], q[2]


@torch.inference_mode()
def measure(model: Transformer, contexts: list[int], slots: list[int], block_sizes: list[int], repeats: int,
            warmup: int, seed: int = 0, progress=None) -> list[Point]:
    """Causal latency at every n in `slots` and TiDAR-step latency for every k in `block_sizes`."""
    dev = model.device
    cuda = dev.type == "cuda"
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    jobs = [("causal", n) for n in slots] + [("tidar", k) for k in block_sizes]
    biggest = max([n for n in slots] + [tidar_slots(k) for k in block_sizes])
    points = []
    for C in contexts:
        cache = model.new_cache(C + biggest)
        for s in range(0, C, 512):  # prefill in chunks
            ids = torch.randint(0, V, (1, min(512, C - s)), generator=g).to(dev)
            model(ids, cache=cache, return_logits=False)
        for kind, n in jobs:
            pos, mask = step_inputs(kind, C, n, dev)
            ids = torch.randint(0, V, (1, pos.numel()), generator=g).to(dev)
            times = []
            for r in range(warmup + repeats):
                cache.crop(C)
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(ids, pos, mask, cache)
                    end.record()
                    torch.cuda.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    model(ids, pos, mask, cache)
                    ms = (time.perf_counter() - t0) * 1e3
                if r >= warmup:
                    times.append(ms)
            med, q1, q3 = _quartiles(times)
            points.append(Point(C, pos.numel(), kind, n if kind == "tidar" else None, med, q1, q3, repeats))
            if progress is not None:
                progress()
        cache.crop(0)
    return points


def knee(curve: dict[int, float], tolerance: float = 0.1) -> int:
    """The largest n such that every measured n' <= n has latency <= (1 + tolerance) * latency(1).
    `curve` maps slots -> latency and must contain 1."""
    if 1 not in curve:
        raise ValueError("the curve needs latency(1)")
    limit = (1 + tolerance) * curve[1]
    best = 1
    for n in sorted(curve):
        if curve[n] > limit:
            break
        best = n
    return best


def interpolate(curve: dict[int, float], n: int) -> float | None:
    """Latency at n by linear interpolation between measured slots (None outside the range)."""
    xs = sorted(curve)
    if n < xs[0] or n > xs[-1]:
        return None
    for a, b in zip(xs, xs[1:]):
        if a <= n <= b:
            return curve[a] + (curve[b] - curve[a]) * (n - a) / (b - a)
    return curve[xs[-1]]


def predict_speedup(tnfe: dict[int, float], lat1: float, step_latency: dict[int, float]) -> dict[int, float]:
    """tokens/s speedup over AR per block size k: T/NFE(k) * lat(1) / lat(TiDAR step with k)."""
    return {k: tnfe[k] * lat1 / step_latency[k] for k in sorted(tnfe) if step_latency.get(k)}


def parse_tnfe(spec: str) -> dict[int, float]:
    """`4=3.1,8=5.2` or a run folder's summary.csv / a CSV with columns k and a T/NFE column."""
    p = Path(spec)
    if p.exists():
        import csv

        f = p / "summary.csv" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"no summary.csv in {p}")
        rows = list(csv.DictReader(f.open()))
        out: dict[int, float] = {}
        for r in rows:
            k = r.get("k") or r.get("block_size")
            v = r.get("tidar_T_per_NFE") or r.get("tokens_per_nfe") or r.get("T/NFE")
            if k and v:
                out[int(k)] = float(v)
        if not out:
            raise UserError(f"{f} has no block-size (k) and T/NFE columns")
        return out
    try:
        return {int(k): float(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    except ValueError:
        raise UserError(f"--tnfe expects k=T/NFE pairs like 4=3.1,8=5.2 or a CSV/run folder, got {spec!r}")


def device_info(device: torch.device) -> dict:
    from .provenance import environment

    info = environment()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        try:
            import subprocess

            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = q.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    else:
        info["device_name"] = f"CPU ({info.get('cpu')}, {torch.get_num_threads()} threads)"
    return info


def plot(points: list[Point], knees: dict[int, int], title: str, out_base: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    contexts = sorted({p.context for p in points})
    for C in contexts:
        causal = sorted((p.slots, p.median_ms, p.q1_ms, p.q3_ms) for p in points if p.context == C and p.mask == "causal")
        if causal:
            xs, ys, lo, hi = zip(*causal)
            line, = ax.plot(xs, ys, marker="o", ms=3, label=f"context {C}")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
            kn = knees.get(C)
            if kn is not None:
                y = dict(zip(xs, ys))[kn]
                ax.scatter([kn], [y], s=80, facecolors="none", edgecolors=line.get_color(), zorder=5)
                ax.annotate(f"knee {kn}", (kn, y), textcoords="offset points", xytext=(4, 8), fontsize=8,
                            color=line.get_color())
        tid = sorted((p.slots, p.median_ms, p.block_size) for p in points if p.context == C and p.mask == "tidar")
        for s, y, k in tid:
            ax.scatter([s], [y], marker="x", color="black", zorder=6)
            ax.annotate(f"TiDAR k={k}", (s, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens fed in one forward (slots)")
    ax.set_ylabel("forward latency, median (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "svg"):
        tmp = out_base.with_name(f".{out_base.name}.{ext}.tmp")
        fig.savefig(tmp, dpi=130, format=ext)
        tmp.replace(out_base.with_suffix(f".{ext}"))
    plt.close(fig)
