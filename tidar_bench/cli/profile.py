"""`tidar-bench profile-latency`: forward latency vs token slots, the free-slot knee, and the
TiDAR speedup it predicts (the measuring lives in tidar_bench/profiling.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .core import parse_list
from ..errors import UserError


def parse_ints(value: str, what: str) -> list[int]:
    """Comma-separated integers; `a,b,...,z` continues the geometric (b/a) or, failing that, the
    arithmetic (b-a) progression up to z: `1,2,4,...,512` is every power of two to 512."""
    items = parse_list(value, what)
    try:
        if "..." in items:
            i = items.index("...")
            if i < 2 or i != len(items) - 2 or items.count("...") > 1:
                raise UserError(f"{what}: write a progression as a,b,...,z (at least two terms before ...), got {value!r}")
            head = [int(x) for x in items[:i]]
            a, b, end = head[-2], head[-1], int(items[-1])
            out = list(head)
            if a > 0 and b > a and b % a == 0:
                while out[-1] * (b // a) <= end:
                    out.append(out[-1] * (b // a))
            elif b > a:
                while out[-1] + (b - a) <= end:
                    out.append(out[-1] + (b - a))
            else:
                raise UserError(f"{what}: a progression a,b,...,z needs b > a, got {value!r}")
            if out[-1] != end:
                out.append(end)
            return out
        return [int(x) for x in items]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers (a,b,...,z allowed), got {value!r}")


@app.command("profile-latency")
def profile_latency(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint directory"),
    config: Optional[str] = typer.Option(None, "--config", help="a shipped architecture with random weights: "
                                         "qwen2.5-1.5b, qwen3-4b, qwen3-8b, llama-3.1-8b, cpu-5m, tiny"),
    context: str = typer.Option("512,1024,4096", help="cached context lengths"),
    slots: str = typer.Option("1,2,4,...,512", help="new tokens per forward for the causal curve "
                              "(1 is always added: the knee and speedups are relative to it)"),
    mask: str = typer.Option("tidar", help="causal: the causal curve only (TiDAR steps approximated by causal "
                             "forwards of k + k*k tokens); tidar: also the exact TiDAR step mask for each block size"),
    block_size: Optional[str] = typer.Option(None, help="TiDAR block sizes k (a steady-state step feeds k + k*k tokens); "
                                             "default 4,8,16, on CPU 4,8 (k=16's 272-token step costs more than "
                                             "the rest of the sweep there, far past a CPU's knee)"),
    batch: str = typer.Option("1", "--batch", help="batch sizes, e.g. 1,4,16,64: every forward feeds B rows of the same "
                              "layout; knee and predicted speedup per batch size, plus latency_batch.png"),
    dtype: str = typer.Option("auto", help="auto = bf16 on CUDA, fp32 on CPU"),
    device: str = typer.Option("auto"),
    repeats: int = typer.Option(20, min=1),
    warmup: Optional[int] = typer.Option(None, min=0, help="untimed forwards before each point: default 3, "
                                         "1 for eager forwards on CPU (nothing to compile or capture)"),
    tolerance: float = typer.Option(0.1, min=0.0, help="knee: largest n with latency <= (1 + tolerance) x latency(1)"),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="time replays of a captured CUDA graph of each eager forward"),
    compile: str = typer.Option("auto", "--compile", help="time the decoders' compiled static-shape step (torch.compile, CUDA "
                                "graphs on GPU) instead of the eager forward: auto (on where it works), on, off; "
                                "one compilation per (slots, batch) shape"),
    tnfe: Optional[str] = typer.Option(None, help="T/NFE per block size to predict speedups: 4=3.1,8=5.2, a CSV "
                                       "(k, tidar_T_per_NFE) and/or `tidar-bench run` folders, comma-separated"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="output folder (latency.csv, latency.json, latency.png, latency.svg)"),
) -> None:
    """Latency of one batch-1 forward vs the number of tokens fed, per context length: the
    "free token slots" TiDAR drafts in, the knee where they stop being free, and (with --tnfe)
    the predicted tokens/s speedup per block size and the block size to use."""
    import torch

    from .. import profiling as prof
    from ..model import read_config, resolve_device, resolve_dtype

    # ---- validate everything before loading anything
    if (model is None) == (config is None):
        raise UserError("give exactly one of --model DIR or --config NAME")
    if mask not in ("causal", "tidar"):
        raise UserError(f"--mask must be causal or tidar, got {mask!r}")
    contexts = sorted(set(parse_ints(context, "--context")))
    ns = sorted(set(parse_ints(slots, "--slots")))
    block_size = block_size or ("4,8" if resolve_device(device).type == "cpu" else "4,8,16")
    ks = sorted(set(parse_ints(block_size, "--block-size")))
    batches = sorted(set(parse_ints(batch, "--batch")))
    if batches[0] < 1:
        raise UserError(f"--batch must all be >= 1, got {batches[0]}")
    if ns[0] < 1:
        raise UserError(f"--slots must all be >= 1, got {ns[0]}")
    if ks[0] < 1:
        raise UserError(f"--block-size must all be >= 1, got {ks[0]}")
    if contexts[0] < 0:
        raise UserError(f"--context must all be >= 0, got {contexts[0]}")
    if tolerance < 0:
        raise UserError("--tolerance must be >= 0")
    ns = sorted(set(ns) | {1})
    tnfe_table = prof.parse_tnfe(tnfe) if tnfe else {}
    # the speedup needs each k's step latency: measure it rather than interpolate
    if mask == "tidar":
        ks = sorted(set(ks) | set(tnfe_table))
    else:
        ns = sorted(set(ns) | {prof.tidar_slots(k) for k in tnfe_table})
        ks = []
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if cuda_graphs and dev.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device (--device cuda)")
    from ..compiled import cpu_rule, n_params, normalize, resolve

    compiled = resolve(compile, dev)
    if compiled and cuda_graphs:
        raise UserError("--compile already uses CUDA graphs (mode reduce-overhead): drop --cuda-graphs")
    notes = []
    if dev.type == "cpu" and dt != torch.float32:
        notes.append(f"{str(dt).replace('torch.', '')} on CPU: CPU kernels for it are often slower than fp32; "
                     "these timings say nothing about a GPU")
    cfg = prof.shipped_config(config) if config is not None else read_config(model)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    biggest = max([*ns, *(prof.tidar_slots(k) for k in ks)])
    if contexts[-1] + biggest > max_pos:
        raise UserError(f"context {contexts[-1]} + {biggest} slots exceeds the model's max_position_embeddings {max_pos}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "latency.json").exists())):
        raise UserError(f"--out {out} exists and is not a profile-latency folder")

    import time

    from rich.console import Console

    console = Console()
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if config is not None:
        m = prof.random_model(config, dt, dev, seed)
    else:
        from ..model import load_model

        m = load_model(model, dt, dev)
    from ..provenance import portable_command, portable_path

    name = config or portable_path(model)  # latency.json's model and the figure titles: no machine path
    compiled = resolve(compile, dev, n_params(m))  # the CPU size rule: eager above AUTO_EAGER_PARAMS
    if warmup is None:
        warmup = 1 if dev.type == "cpu" and not compiled else 3
    total, done, t0 = len(batches) * len(contexts) * (len(ns) + len(ks)), [], time.perf_counter()

    def progress(p):  # one line per measured point: a long sweep is never silent
        done.append(p)
        what = f"TiDAR k={p.block_size} ({p.slots} slots)" if p.mask == "tidar" else f"{p.slots} slots"
        console.print(f"[{len(done)}/{total}] batch {p.batch}, context {p.context}, {what}: {p.median_ms:.2f} ms "
                      f"({'compiled' if compiled else 'eager'}, {time.perf_counter() - t0:.0f} s elapsed)",
                      highlight=False, style="dim", soft_wrap=True)

    points = prof.measure(m, contexts, ns, ks, repeats, warmup, seed, cuda_graphs, progress=progress,
                          batches=batches, compile=compiled)
    info = prof.device_info(dev)

    # ---- analysis per (batch, context); the top-level fields are the first batch size's
    analyses = prof.analyse(points, tolerance, tnfe_table)
    first = [a for a in analyses if a.batch == batches[0]]
    knees = {a.context: a.knee for a in first}
    lat1 = {a.context: a.latency_1_ms for a in first}
    ratios = {a.context: a.ratios for a in first}
    predictions = {a.context: a.predicted_speedup for a in first} if tnfe_table else {}
    best = {a.context: a.recommended_block_size for a in first}

    # ---- outputs
    from ..provenance import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(points[0])), lineterminator="\n")
    w.writeheader()
    w.writerows(asdict(p) for p in points)
    write_atomic(out / "latency.csv", buf.getvalue())
    argv = ["tidar-bench", "profile-latency", *(["--model", name] if model else ["--config", config]),
            "--context", ",".join(map(str, contexts)), "--slots", slots, "--mask", mask, "--block-size", block_size,
            *(["--batch", batch] if batches != [1] else []), "--dtype", dtype, "--device", device, "--repeats", str(repeats), "--warmup", str(warmup),
            "--tolerance", str(tolerance), *(["--cuda-graphs"] if cuda_graphs else []), "--compile", normalize(compile),
            *(["--tnfe", tnfe] if tnfe else []), "--seed", str(seed), "--out", portable_path(out)]
    dtype_name = str(dt).replace("torch.", "")
    label = "GPU" if dev.type == "cuda" else "CPU"
    # the attention backend of the eager forward (TIDAR_BENCH_ATTN, tidar_bench/attention.py); compiled
    # static steps on CPU use plain math attention whatever it says
    attn = os.environ.get("TIDAR_BENCH_ATTN", "sdpa")
    env_prefix = f"TIDAR_BENCH_ATTN={shlex.quote(attn)} " if "TIDAR_BENCH_ATTN" in os.environ else ""
    record = {
        "command": env_prefix + portable_command(argv), "attention": attn, "model": name, "dtype": dtype_name, "device": str(dev), "label": label,
        "timer": info["timer"], "cuda_graphs": cuda_graphs, "compiled": compiled,
        "params": n_params(m), "cpu_compile_rule": cpu_rule(n_params(m)) if dev.type == "cpu" else None, "repeats": repeats, "warmup": warmup,
        "tolerance": tolerance, "seed": seed, "mask": mask, "block_sizes": ks, "batch_sizes": batches, "notes": notes,
        "environment": info, "points": [asdict(p) for p in points],
        "knee": {str(C): k for C, k in knees.items()},
        "latency_1_ms": {str(C): v for C, v in lat1.items()},
        "latency_ratio_vs_1": {str(C): {str(n): r for n, r in sorted(rs.items())} for C, rs in ratios.items()},
    }
    if tnfe_table:
        record["tnfe"] = {str(k): v for k, v in sorted(tnfe_table.items())}
        record["step_latency_source"] = "TiDAR step mask" if mask == "tidar" else "causal forward of k + k*k tokens"
        record["predicted_speedup"] = {str(C): {str(k): v for k, v in p.items()} for C, p in predictions.items()}
        record["recommended_block_size"] = {str(C): k for C, k in best.items()}
    record["by_batch"] = {str(B): {
        "knee": {str(a.context): a.knee for a in analyses if a.batch == B},
        "latency_1_ms": {str(a.context): a.latency_1_ms for a in analyses if a.batch == B},
        "ar_tokens_per_s": {str(a.context): 1e3 * B / a.latency_1_ms for a in analyses if a.batch == B},
        **({"predicted_speedup": {str(a.context): {str(k): v for k, v in a.predicted_speedup.items()}
                                  for a in analyses if a.batch == B},
            "recommended_block_size": {str(a.context): a.recommended_block_size for a in analyses if a.batch == B}}
           if tnfe_table else {})} for B in batches}
    write_atomic(out / "latency.json", json.dumps(record, indent=2) + "\n")
    title = f"{name} · {label}: {info['device_name']} · {dtype_name} · batch {batches[0]} · torch {info.get('torch')}"
    prof.plot([p for p in points if p.batch == batches[0]], knees, tolerance, title, out / "latency")
    if len(batches) > 1:
        prof.plot_batches(points, analyses, title.replace(f"batch {batches[0]}", "batch " + ",".join(map(str, batches))),
                          out / "latency_batch")
    for B in batches:
        _print_table(console, [p for p in points if p.batch == B], contexts, ns, ks,
                     {a.context: a.knee for a in analyses if a.batch == B}, repeats, label,
                     info["device_name"] + (f", batch {B}" if batches != [1] else ""))
    for a in analyses:
        if a.predicted_speedup:
            console.print((f"batch {a.batch}, " if batches != [1] else "") + f"context {a.context}: predicted speedup over AR "
                          + ", ".join(f"k={k}: {v:.2f}x" for k, v in a.predicted_speedup.items())
                          + f" -> recommended block size {a.recommended_block_size}")
    console.print(f"wrote {portable_path(out)}/latency.csv, latency.json, latency.png, latency.svg"
                  + (", latency_batch.png, latency_batch.svg" if len(batches) > 1 else ""))


def _print_table(console, points, contexts, ns, ks, knees, repeats, label, device_name) -> None:
    from rich.table import Table

    med = {(p.context, p.mask, p.block_size if p.mask == "tidar" else p.slots): p.median_ms for p in points}
    t = Table(title=f"forward latency, ms (median of {repeats}) — {label}: {device_name}")
    t.add_column("slots")
    for C in contexts:
        t.add_column(f"ctx {C}", justify="right")
        t.add_column("x lat(1)", justify="right")
    for n in ns:
        t.add_row(str(n), *[x for C in contexts for x in (f"{med[C, 'causal', n]:.2f}",
                                                          f"{med[C, 'causal', n] / med[C, 'causal', 1]:.2f}")])
    from ..profiling import tidar_slots

    for k in ks:
        t.add_row(f"TiDAR k={k} ({tidar_slots(k)})",
                  *[x for C in contexts for x in (f"{med[C, 'tidar', k]:.2f}", f"{med[C, 'tidar', k] / med[C, 'causal', 1]:.2f}")])
    t.add_row("knee", *[x for C in contexts for x in (str(knees[C]), "")])
    console.print(t)
