"""`tidar-bench profile-latency`: forward latency vs token slots, the free-slot knee, and the
TiDAR speedup it predicts (tidar_bench/profiling.py)."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from .cli_app import app
from .cli_core import parse_list
from .errors import UserError


def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in parse_list(value, what)]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {value!r}")
    return out


@app.command("profile-latency")
def profile_latency(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint directory"),
    config: Optional[str] = typer.Option(None, "--config", help="a shipped architecture with random weights: "
                                         "qwen2.5-1.5b, qwen3-4b, qwen3-8b, llama-3.1-8b, cpu-5m, tiny"),
    context: str = typer.Option("512,1024,4096", help="cached context lengths"),
    slots: str = typer.Option("1,2,4,8,16,32,64,128,256,512", help="new tokens per forward (causal mask)"),
    mask: str = typer.Option("tidar", help="causal: causal curve only; tidar: also the exact TiDAR step for each --block-size"),
    block_size: str = typer.Option("4,8,16", help="TiDAR block sizes k (a step feeds k + k*k tokens)"),
    dtype: str = typer.Option("auto", help="auto = bf16 on CUDA, fp32 on CPU"),
    device: str = typer.Option("auto"),
    repeats: int = typer.Option(20, min=1),
    warmup: int = typer.Option(3, min=0),
    tolerance: float = typer.Option(0.1, help="knee: largest n with latency <= (1 + tolerance) x latency(1)"),
    tnfe: Optional[str] = typer.Option(None, help="T/NFE per block size (4=3.1,8=5.2 or a CSV / run folder) to predict speedups"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="output folder (latency.csv, latency.json, latency.png, latency.svg)"),
) -> None:
    """Latency of one batch-1 forward vs the number of tokens fed, per context length: the
    "free token slots" TiDAR spends on drafting, the knee where they stop being free, and
    (with --tnfe) the predicted tokens/s speedup per block size."""
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from . import profiling as prof
    from .model import load_model, resolve_device, resolve_dtype

    if (model is None) == (config is None):
        raise UserError("give exactly one of --model or --config")
    if mask not in ("causal", "tidar"):
        raise UserError(f"--mask must be causal or tidar, got {mask!r}")
    contexts = _ints(context, "--context")
    ns = sorted(set(_ints(slots, "--slots")) | {1})
    ks = _ints(block_size, "--block-size") if mask == "tidar" else []
    if min(ns) < 1:
        raise UserError("--slots must all be >= 1")
    if ks and min(ks) < 1:
        raise UserError("--block-size must all be >= 1")
    if min(contexts) < 0:
        raise UserError("--context must all be >= 0")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    predicted_tnfe = prof.parse_tnfe(tnfe) if tnfe else None
    if out.exists() and any(out.iterdir()) and not (out / "latency.json").exists():
        raise UserError(f"--out {out} is a non-empty folder of something else")
    if config is not None:
        if config not in prof.config_names():
            raise UserError(f"unknown config {config!r}; shipped configs: {', '.join(prof.config_names())}")
        cfg_max = json.loads((prof.CONFIGS_DIR / f"{config}.json").read_text())["max_position_embeddings"]
    else:
        from .model import read_config

        cfg_max = read_config(model).get("max_position_embeddings", 4096)
    biggest = max(ns + [prof.tidar_slots(k) for k in ks])
    if max(contexts) + biggest > cfg_max:
        raise UserError(f"context {max(contexts)} + {biggest} slots exceeds the model's max_position_embeddings {cfg_max}")
    m = prof.random_model(config, dt, dev, seed) if config else load_model(model, dt, dev)
    name = config or str(model)
    with Progress(transient=True) as bar:
        task = bar.add_task("timing forwards", total=len(contexts) * (len(ns) + len(ks)))
        points = prof.measure(m, contexts, ns, ks, repeats, warmup, seed, progress=lambda: bar.advance(task))
    info = prof.device_info(dev)
    knees, predictions = {}, {}
    for C in contexts:
        curve = {p.slots: p.median_ms for p in points if p.context == C and p.mask == "causal"}
        knees[C] = prof.knee(curve, tolerance)
        if predicted_tnfe:
            step = {p.block_size: p.median_ms for p in points if p.context == C and p.mask == "tidar"}
            for k in predicted_tnfe:
                if k not in step:
                    lat = prof.interpolate(curve, prof.tidar_slots(k))
                    if lat is not None:
                        step[k] = lat
            predictions[C] = prof.predict_speedup({k: v for k, v in predicted_tnfe.items() if k in step}, curve[1], step)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(points[0])))
    w.writeheader()
    w.writerows(asdict(p) for p in points)
    from .provenance import write_atomic

    write_atomic(out / "latency.csv", buf.getvalue())
    record = {"command": " ".join(["tidar-bench", *sys.argv[1:]]), "model": name, "dtype": str(dt), "device": str(dev),
              "label": "GPU" if dev.type == "cuda" else "CPU", "tolerance": tolerance, "seed": seed,
              "environment": info, "points": [asdict(p) for p in points],
              "knee": {str(C): k for C, k in knees.items()},
              "lat_ratio_vs_1": {str(C): {str(p.slots): p.median_ms / next(q.median_ms for q in points if q.context == C and q.mask == "causal" and q.slots == 1)
                                          for p in points if p.context == C and p.mask == "causal"} for C in contexts}}
    if predicted_tnfe:
        record["tnfe"] = {str(k): v for k, v in predicted_tnfe.items()}
        record["predicted_speedup"] = {str(C): {str(k): v for k, v in p.items()} for C, p in predictions.items()}
        record["recommended_block_size"] = {str(C): max(p, key=p.get) for C, p in predictions.items() if p}
    write_atomic(out / "latency.json", json.dumps(record, indent=2) + "\n")
    title = f"{name} · {info['device_name']} · {str(dt).replace('torch.', '')} · batch 1 · {info.get('torch')}"
    prof.plot(points, knees, title, out / "latency")
    t = Table(title=f"forward latency (ms, median of {repeats}) — {'GPU' if dev.type == 'cuda' else 'CPU'}: {info['device_name']}")
    t.add_column("slots")
    for C in contexts:
        t.add_column(f"ctx {C}")
    for n in ns:
        t.add_row(str(n), *[f"{next(p.median_ms for p in points if p.context == C and p.mask == 'causal' and p.slots == n):.2f}"
                            for C in contexts])
    for k in ks:
        t.add_row(f"TiDAR k={k} ({prof.tidar_slots(k)})",
                  *[f"{next(p.median_ms for p in points if p.context == C and p.block_size == k):.2f}" for C in contexts])
    t.add_row("knee", *[str(knees[C]) for C in contexts])
    console = Console()
    console.print(t)
    for C, p in predictions.items():
        if p:
            best = max(p, key=p.get)
            console.print(f"context {C}: predicted speedup " + ", ".join(f"k={k}: {v:.2f}x" for k, v in p.items())
                          + f" -> recommended block size {best}")
    console.print(f"wrote {out}/latency.csv, latency.json, latency.png, latency.svg")
