"""`tidar-bench run`: decoders side by side on lm-eval tasks into one run folder (see
tidar_bench/harness/runner.py for the folder layout, resume and sharding)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .cli_app import app
from .cli_core import parse_list


@app.command("run")
def run_cmd(
    model: Path = typer.Option(..., "--model", help="checkpoint directory (config.json + safetensors + tokenizer)"),
    decoders_: str = typer.Option("ar", "--decoders", help="comma-separated decoders (see `tidar-bench decoders`)"),
    tasks: str = typer.Option(..., "--tasks", help="comma-separated tasks: humaneval, mbpp, gsm8k, gsm8k_cot, minerva_math"),
    out: Path = typer.Option(..., "--out", help="run folder (new, empty, or a run folder of this same command: resumes)"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="draft checkpoint for decoders that need one"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N documents of each task"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    decoder_arg: Optional[list[str]] = typer.Option(
        None, "--decoder-arg", help="decoder option key=value (all decoders having it) or decoder.key=value (repeatable)"),
    allow_code_exec: bool = typer.Option(False, "--allow-code-exec", help="allow tasks that execute generated code"),
    hub_datasets: bool = typer.Option(False, "--hub-datasets", help="load task data from the HF Hub instead of the shipped files"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="use your own lm-eval task YAMLs from DIR"),
) -> None:
    """Evaluate decoders on lm-eval tasks at batch 1: scores, tokens/s, T/NFE, accepted length,
    speedup vs ar, lossless check. Re-running the same command resumes; works under torchrun."""
    from rich.console import Console
    from rich.table import Table

    from .harness.runner import RunSpec, run

    spec = RunSpec(model=model, decoders=parse_list(decoders_, "--decoders"), tasks=parse_list(tasks, "--tasks"),
                   out=out, draft=draft, limit=limit, device=device, dtype=dtype, seed=seed,
                   decoder_args=list(decoder_arg or []), allow_code_exec=allow_code_exec,
                   hub_datasets=hub_datasets, include_path=include_path)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    result = run(spec)
    if result is None:  # a non-zero torchrun rank: rank 0 reports
        return
    info, rows = result["info"], result["rows"]

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    t = Table(title=f"tidar-bench run -> {out}  (batch 1, seed {seed}, world size {info['world_size']})")
    for col in ("task", "decoder", "metric", "score", "± stderr", "tokens/s", "T/NFE", "mean acc. len",
                "speedup vs ar", "n", "lossless mismatches"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["task"].removeprefix("tb_"), r["decoder"], r["metric"], fmt(r["score"], ".4f"), fmt(r["stderr"], ".4f"),
                  fmt(r["tokens_per_s"], ".1f"), fmt(r["tokens_per_nfe"], ".2f"), fmt(r["mean_accepted_length"], ".2f"),
                  fmt(r["speedup_vs_ar"], ".2f") + ("x" if r["speedup_vs_ar"] is not None else ""), str(r["n"]),
                  "-" if r["mismatches_vs_ar"] is None else str(r["mismatches_vs_ar"]))
    console = Console()
    console.print(t)
    overhead = info["overhead_fraction"]
    console.print(f"decoded now: {sum(d['decoded_this_invocation'] for d in info['decoders'].values())} requests; "
                  f"harness overhead {fmt(overhead and 100 * overhead, '.2f')}% of decode time; "
                  f"wall {info['wall_s_this_invocation']:.1f} s")
    bad = {d: n for d, n in info["mismatches_vs_ar"].items() if n}
    if bad:
        console.print(f"[bold red]lossless decoders differ from ar on greedy outputs: {bad}[/bold red]")
