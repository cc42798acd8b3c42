"""`tidar-bench run`: decoders side by side on lm-eval tasks into one run folder (see
tidar_bench/harness/runner.py for the folder layout, resume and sharding)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .core import COMPILE_HELP, DECODER_ARG_HELP, parse_list
from ..errors import UserError


@app.command("run")
def run_cmd(
    model: Optional[Path] = typer.Option(
        None, "--model", help="checkpoint directory (config.json + safetensors + tokenizer) or a Hugging Face Hub "
                              "id (downloaded once into the HF cache, safetensors only); "
                              "omitted: the embedded model suite on the mini tasks (see README)"),
    decoders_: str = typer.Option(
        "ar", "--decoders", help="comma-separated decoder settings (see `tidar-bench decoders`), e.g. "
                                 "ar,ar(compile=false),hf(compile=true),tidar(block_size=4); the first is the reference: speedups and "
                                 "the lossless check are against it"),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="comma-separated tasks: humaneval, mbpp, gsm8k, gsm8k_cot, minerva_math, "
                              "mini_gsm, mini_code, mini_math (required with --model)"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="run folder (new, empty, or a run folder of this same command: resumes); "
                            "default for the embedded suite: runs/embedded-<date-time>"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="draft checkpoint (folder or hub id) for decoders that need one"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N documents of each task"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    seed: int = typer.Option(0, help="sampling seed of the decoders (lm-eval's own seeds keep its defaults: "
                                     "random 0, numpy 1234, torch 1234, few-shot 1234)"),
    decoder_arg: Optional[list[str]] = typer.Option(None, "--decoder-arg", help=DECODER_ARG_HELP),
    allow_code_exec: bool = typer.Option(False, "--allow-code-exec", help="allow tasks that execute generated code"),
    hub_datasets: bool = typer.Option(False, "--hub-datasets", help="load task data from the HF Hub instead of the shipped files"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="use your own lm-eval task YAMLs from DIR"),
    apply_chat_template: bool = typer.Option(
        False, "--apply-chat-template", help="format prompts with the tokenizer's chat template (lm-eval's --apply_chat_template)"),
    fewshot_as_multiturn: Optional[bool] = typer.Option(
        None, "--fewshot-as-multiturn/--no-fewshot-as-multiturn",
        help="few-shot examples as chat turns (lm-eval's; default: on with --apply-chat-template)"),
    system_instruction: Optional[str] = typer.Option(
        None, "--system-instruction", help="system message / instruction before the prompt (lm-eval's --system_instruction)"),
    gen_kwargs: Optional[str] = typer.Option(
        None, "--gen-kwargs", help="generation settings for every task, e.g. max_gen_toks=64 (lm-eval's --gen_kwargs)"),
    compile: str = typer.Option("auto", "--compile", help=COMPILE_HELP),
    batch_size: int = typer.Option(
        1, "--batch-size", help="sequences in flight per decoder (every decoder and option, greedy or sampled: "
                                "tidar_bench/engine.py; hf: padded chunks); tokens/s and the speedup vs "
                                "ar are then throughput over the batch"),
) -> None:
    """Evaluate decoders on lm-eval tasks at batch 1 (or --batch-size B): scores, tokens/s, T/NFE,
    accepted length, speedup vs the first decoder setting, lossless check against it. Re-running the same command resumes; works under
    torchrun. Without --model: the embedded default (shipped tiny models, mini tasks, every decoder)."""
    from ..harness.runner import RunSpec, run

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if model is None and (apply_chat_template or fewshot_as_multiturn is not None or system_instruction is not None
                          or gen_kwargs is not None):
        raise UserError("--apply-chat-template, --fewshot-as-multiturn, --system-instruction and --gen-kwargs need --model")
    if model is None and batch_size != 1:
        raise UserError("--batch-size needs --model (the embedded suite is the batch-1 reference run; "
                        "batch it per checkpoint with --model tidar_bench/embedded/<checkpoint>)")
    if model is None:
        return _run_embedded(tasks, out, limit, device, seed, decoder_arg, allow_code_exec, decoders_, draft,
                             include_path, hub_datasets, compile)
    if tasks is None or out is None:
        raise UserError("--model needs --tasks and --out")

    from ..registry import resolve_model

    from ..compiled import normalize
    from ..harness.runner import setting_text
    from ..provenance import portable_path
    from ..registry import parse_settings

    # the settings as typed (a path option keeps its real value: the decoder loads it); labels, file
    # names and outputs show it in portable form (RunSpec.labels, provenance.portable_path)
    settings = [setting_text(st) for st in parse_settings(decoders_)]
    spec = RunSpec(model=resolve_model(model), decoders=settings, tasks=parse_list(tasks, "--tasks"), compile=normalize(compile),
                   out=out, draft=draft and resolve_model(draft, "--draft"), limit=limit, device=device, dtype=dtype,
                   seed=seed, decoder_args=list(decoder_arg or []), allow_code_exec=allow_code_exec,
                   hub_datasets=hub_datasets, include_path=include_path, apply_chat_template=apply_chat_template,
                   fewshot_as_multiturn=fewshot_as_multiturn, system_instruction=system_instruction,
                   gen_kwargs=gen_kwargs, batch_size=batch_size)
    result = run(spec)
    if result is None:  # a non-zero torchrun rank: rank 0 reports
        return
    info, rows = result["info"], result["rows"]
    console = _print_table(rows, f"tidar-bench run -> {portable_path(out)}  (batch {batch_size}, seed {seed}, "
                                 f"world size {info['world_size']})", batch_size)
    overhead = info["overhead_fraction"]
    console.print(f"decoded now: {sum(d['decoded_this_invocation'] for d in info['decoders'].values())} requests; "
                  f"harness overhead {_fmt(overhead and 100 * overhead, '.2f')}% of decode time; "
                  f"wall {info['wall_s_this_invocation']:.1f} s")
    bad = {d: n for d, n in info["mismatches_vs_ar"].items() if n}
    if bad:
        console.print(f"[bold red]lossless decoders differ from {info['reference']} on greedy outputs: {bad}[/bold red]")


def metric_label(key: str) -> str:
    """lm-eval's `metric,filter` key as `metric (filter)`: gsm8k scores one row per filter
    (strict-match, flexible-extract); `none` (no filter) is left out."""
    metric, _, flt = key.partition(",")
    return metric if flt in ("", "none") else f"{metric} ({flt})"


def _yes(x) -> str:
    return "-" if x in (None, "") else ("yes" if x in (True, "True", "true", 1) else "no")


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _mismatch_cell(r: dict) -> str:
    """≠ref: a lossless decoder's count (must be 0), a lossy one's marked `lossy` (reported only), or
    `unchecked` for a lossless decoder with nothing to be checked against."""
    if str(r.get("lossless_check") or "").startswith("unchecked"):
        return "unchecked"
    if r.get("mismatches_vs_ar") not in (None, ""):
        return str(r["mismatches_vs_ar"])
    lossy = r.get("lossy_mismatches_vs_ar")
    return "-" if lossy in (None, "") else f"{lossy} lossy"


def _print_table(rows: list[dict], title: str, batch_size: int = 1):
    """One compact row per (task, checkpoint, decoder, metric and filter); every other column is in
    summary.csv. A batch column when batch_size > 1 (the title says the batch size either way). Piped
    output gets a wide console so the table is never folded."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    with_model = any("model" in r for r in rows)
    with_batch = batch_size > 1
    refs = {r.get("reference") or "ar" for r in rows}
    ref = refs.pop() if len(refs) == 1 else "ref"
    cols = ["task"] + ["model"] * with_model + ["decoder"] + ["batch"] * with_batch + [
        "metric (filter)", "score ± se", "tok/s", "compiled", "T/NFE", "τ", "acc.len", f"vs {ref}", "n", f"≠{ref}"]
    for col in cols:
        t.add_column(col, no_wrap=True, justify="left" if col in ("task", "model", "decoder") else "right")
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.3f} ± {_fmt(r['stderr'], '.3f')}"
        t.add_row(r["task"].removeprefix("tb_"), *([r["model"]] if with_model else []), r["decoder"],
                  *([str(r.get("batch_size") or batch_size)] if with_batch else []), metric_label(r["metric"]), score,
                  _fmt(r["tokens_per_s"], ".1f"), _yes(r.get("compiled")), _fmt(r["tokens_per_nfe"], ".2f"),
                  _fmt(r["mean_accepted_length"], ".2f"), _fmt(r.get("accept_length"), ".2f"),
                  _fmt(r["speedup_vs_ar"], ".2f") + ("x" if r["speedup_vs_ar"] is not None else ""), str(r["n"]),
                  _mismatch_cell(r))
    console.print(t)
    if batch_size > 1:
        speed = ("tok/s: throughput over the batch, all new tokens / wall time of the batched calls (" + str(batch_size) + " "
                 "sequences in flight, continuous refill; not per sequence); T/NFE: new tokens per target forward "
                 "a sequence took part in; τ: tokens committed per decoding step; acc.len: new tokens per decode forward; vs ar: that throughput over "
                 "the reference's batched throughput on the same task (and checkpoint) at the same batch size; compiled: each "
                 "decoder's own compile setting (one graph per batch size and step shape; hf: padded chunks of the "
                 "batch size, no refill)")
    else:
        speed = ("tok/s: new tokens per second of decode time; T/NFE: new tokens per target forward (prefill "
                 "included); τ: EAGLE's, tokens committed per decoding step; acc.len: the TiDAR authors' accept length, "
                 "new tokens per decode forward (prefill forwards excluded); vs ar: tokens/s over the tok/s of the reference "
                 "(the first decoder setting) on the same task (and checkpoint), whose compiled column gives the baseline's compile mode; compiled: static-shape "
                 "steps under torch.compile (compile time excluded from tok/s)")
    unchecked = sorted({f"{r['decoder']} ({r['lossless_check'].partition(': ')[2]})" for r in rows
                        if str(r.get("lossless_check") or "").startswith("unchecked")})
    console.print(f"{speed.replace('vs ar', f'vs {ref}')}; ≠{ref}: greedy outputs of a lossless decoder that differ "
                  f"from the reference's (must be 0), or of a lossy one (`N lossy`: reported, not a failure); "
                  "`unchecked`: a lossless decoder with no lossless reference to be checked against", style="dim")
    if unchecked:
        console.print(f"[bold yellow]lossless check not done for: {', '.join(unchecked)}[/bold yellow]")
    return console


def _run_embedded(tasks, out, limit, device, seed, decoder_arg, allow_code_exec, decoders_, draft, include_path,
                  hub_datasets, compile: str = "auto") -> None:
    import time

    from ..harness.suite import run_embedded

    if draft is not None or include_path is not None or hub_datasets or decoders_ != "ar":
        raise UserError("--decoders, --draft, --include-path and --hub-datasets need --model; "
                        "the embedded default runs every decoder on the shipped models")
    task_list = parse_list(tasks, "--tasks") if tasks else None
    if out is None:
        out = Path("runs") / time.strftime("embedded-%Y%m%d-%H%M%S")
    dev = "cpu" if device == "auto" else device
    from ..compiled import normalize
    from ..provenance import portable_path

    result = run_embedded(out, task_list, limit, dev, seed, allow_code_exec, list(decoder_arg or []), normalize(compile))
    info, rows = result["info"], result["rows"]
    console = _print_table(rows, f"tidar-bench run (embedded suite) -> {portable_path(out)}  (batch 1, seed {seed}; "
                                 "speedup and ≠ar vs the ar of the same checkpoint)")
    if "mini_code" not in info["identity"]["tasks"]:
        console.print("mini_code skipped: it executes generated code; add --allow-code-exec to include it")
    over = [r["overhead_fraction"] for r in info["runs"].values() if r["overhead_fraction"] is not None]
    console.print(f"harness overhead {100 * max(over or [0]):.2f}% of decode time (worst sub-run); "
                  f"wall {info['wall_s_this_invocation']:.1f} s; commands and environment in {portable_path(out)}/suite.json")
    bad = {f"{sub}/{d}": n for sub, r in info["runs"].items() for d, n in r["mismatches_vs_ar"].items() if n}
    if bad:
        console.print(f"[bold red]lossless decoders differ from their checkpoint's ar: {bad}[/bold red]")
