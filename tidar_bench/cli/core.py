"""Core commands: `decoders` (list them), `generate` (one prompt through one decoder) and
`speed` (paired tokens/s benchmark of several decoders on the same model and prompts)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from .app import app
from ..errors import UserError


DECODER_ARG_HELP = ("decoder option DECODER.key=value, for every setting of that decoder (repeatable); a bare "
                    "key=value when one decoder is given; options in a setting's parentheses win")


def parse_list(value: str, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise UserError(f"{what} is empty")
    return items


def random_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of a shipped architecture config to `out`."""
    from ..model import ModelConfig, Transformer, init_weights, save_model
    from ..profiling import shipped_config

    cfg = ModelConfig.from_dict(shipped_config(name))
    model = init_weights(Transformer(cfg), seed=seed)
    save_model(model, out)
    return out


@app.command("decoders")
def list_decoders() -> None:
    """List the registered decoders and their options."""
    from rich.console import Console
    from rich.table import Table

    from ..registry import decoders

    t = Table(title="decoders")
    for col in ("name", "needs --draft", "options", "description"):
        t.add_column(col)
    for name, spec in sorted(decoders().items()):
        opts = ", ".join(f"{k}: {getattr(v, '__name__', str(v))}" for k, v in spec.option_types().items())
        t.add_row(name, "yes" if spec.needs_draft else "", opts, spec.help)
    Console().print(t)


@app.command("generate")
def generate_cmd(
    model: Path = typer.Option(..., "--model", help="checkpoint directory (config.json + safetensors)"),
    prompt: Optional[str] = typer.Option(None, help="prompt text (needs the checkpoint's tokenizer)"),
    prompt_ids: Optional[str] = typer.Option(None, help="prompt as comma-separated token ids"),
    decoder: str = typer.Option("ar", help="decoder name or setting, e.g. tidar(block_size=4) (see `tidar-bench decoders`)"),
    draft: Optional[Path] = typer.Option(None, help="draft checkpoint for decoders that need one"),
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    stop: Optional[list[str]] = typer.Option(None, help="stop string (repeatable)"),
    decoder_arg: Optional[list[str]] = typer.Option(None, help=DECODER_ARG_HELP),
    compile: str = typer.Option("auto", "--compile", help="compiled decoding: auto (on where torch.compile works), on, off"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="print the generation and stats as JSON"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="never stop at the checkpoint's EOS ids: exactly "
                                    "--max-new-tokens tokens (the TiDAR authors' benchmark setting)"),
) -> None:
    """Decode one prompt with one decoder and print the output and its stats."""
    from ..decoding import GenerationConfig, SamplingParams
    from ..registry import DecoderContext, build_decoder, resolve_model, resolve_settings
    from ..speed import fit_context

    if (prompt is None) == (prompt_ids is None):
        raise UserError("give exactly one of --prompt or --prompt-ids")
    chosen = resolve_settings(decoder, decoder_arg, compile, "--decoder")
    if len(chosen) != 1:
        raise UserError("generate takes one decoder (use `speed` to compare several)")
    setting = chosen[0]
    ctx = DecoderContext(resolve_model(model), device, dtype, draft)
    dec = build_decoder(setting.name, ctx, setting.options)
    tok = ctx.tokenizer
    if prompt is not None:
        if tok is None:
            raise UserError(f"{model} has no tokenizer: use --prompt-ids")
        ids = tok.encode(prompt, add_special_tokens=False)
    else:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UserError("--prompt-ids must be comma-separated integers")
    if not ids:
        raise UserError("the prompt is empty")
    context = ctx.model.config.max_position_embeddings
    (ids,), truncated = fit_context([ids], max_new_tokens, context)
    if truncated:
        print(f"note: the prompt was left-truncated to its last {len(ids)} tokens (context {context} - "
              f"--max-new-tokens {max_new_tokens})", file=sys.stderr)
    vocab = ctx.model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise UserError(f"prompt token ids must be in [0, {vocab})")
    try:
        sampling = SamplingParams(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise UserError(str(e))
    cfg = GenerationConfig(max_new_tokens, tuple(stop or ()), () if ignore_eos else ctx.stop_token_ids, sampling)
    g = dec.generate(ids, cfg)
    if as_json:
        print(json.dumps({"tokens": g.tokens, "text": g.text, "finish_reason": g.finish_reason,
                          "stats": g.stats.as_dict()}))
        return
    print(g.text if g.text is not None else " ".join(map(str, g.tokens)))
    s = g.stats
    print(f"[{setting.label}] tokens={s.new_tokens} nfe={s.nfe} T/NFE={s.tokens_per_nfe:.2f} "
          f"mean_accepted={s.mean_accepted_length:.2f} tokens/s={s.tokens_per_s:.1f} "
          f"compiled={'yes' if dec.options().get('compile') else 'no'} compile_s={s.compile_s:.1f} "
          f"finish={g.finish_reason}")


COMPILE_HELP = ("compiled decoding (gpt-fast style static-shape steps under torch.compile; CUDA graphs on GPU): "
                "auto = on where torch.compile works here, on, off; a decoder setting such as ar(compile=false) "
                "overrides it")


# datasheet peak memory bandwidth (GB/s) by device-name fragment: the denominator of the achieved
# fraction that `speed` prints on CUDA (override with --peak-bandwidth)
PEAK_BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
                      ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("RTX 4090", 1008.0))


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@app.command("speed")
def speed_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint directory"),
    config: Optional[str] = typer.Option(None, "--config", help="a shipped architecture with random weights instead of --model"),
    decoders_: str = typer.Option(
        "ar,hf", "--decoders", help="comma-separated decoder settings, the first is the reference: "
                                    "e.g. ar,ar(compile=false),hf(compile=true),tidar(block_size=4)"),
    draft: Optional[Path] = typer.Option(None),
    prompts: Optional[int] = typer.Option(None, min=1, help="number of prompts (default 8: random token ids, seeded; or "
                                          "the first N of --prompts-file; --workload authors: N per task, default 128)"),
    workload: Optional[str] = typer.Option(
        None, "--workload", help="authors: the TiDAR authors' benchmark (lm-eval few-shot contexts of HumanEval 0-shot, "
                                 "MBPP 3-shot, GSM8K-CoT 8-shot, Minerva math 4-shot, raw text, shuffled with seed 227, "
                                 "EOS ignored, 512 new tokens unless --max-new-tokens)"),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts-file", help="JSONL with a `prompt` field (e.g. tasks/data/mini/gsm.jsonl): real prompts, "
                                     "decoding stops at EOS; default: random token ids, no stop"),
    prompt_len: int = typer.Option(64, min=1),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default 128 (512 with --workload authors)"),
    decoder_arg: Optional[list[str]] = typer.Option(None, help=DECODER_ARG_HELP),
    compile: str = typer.Option("auto", "--compile", help=COMPILE_HELP),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)"),
    peak_bandwidth: Optional[float] = typer.Option(
        None, "--peak-bandwidth", help="device peak memory bandwidth in GB/s for the achieved fraction (CUDA; "
                                       "default: datasheet value of known GPUs)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the table, command and environment to this JSON file"),
    batch_size: Optional[str] = typer.Option(
        None, "--batch-size", help="batched mode, e.g. 1,4,16: at each batch size every decoder decodes all prompts "
                                   "with that many in flight (tidar_bench/batched.py); tokens/s over the batch, "
                                   "per-sequence latency, speedup vs the first decoder at the same batch size"),
    rounds: int = typer.Option(2, min=1, help="batched mode: paired rounds per batch size (ABBA order)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="--prompts-file: never stop at EOS, every prompt gets "
                                    "exactly --max-new-tokens (the TiDAR authors' benchmark setting)"),
) -> None:
    """Paired speed benchmark: each prompt is decoded greedily by every decoder setting in turn
    (after a warm-up of each on the longest prompt, which also compiles: compile time is printed
    apart), and tokens/s ratios vs the first setting are printed with their spread over prompts,
    the reference's own tokens/s and compile mode, and a check that lossless decoders produced the
    reference's tokens. On CUDA: the achieved weight bandwidth of every setting."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..decoding import GenerationConfig
    from ..registry import DecoderContext, build_decoder, resolve_model, resolve_settings
    from ..provenance import environment, portable_command, portable_path, portable_value, write_atomic
    from ..speed import fit_context, lossless_status, ratio, read_prompts, speed_paired

    if threads:
        torch.set_num_threads(threads)
    if (model is None) == (config is None):
        raise UserError("give exactly one of --model or --config")
    if workload not in (None, "authors"):
        raise UserError(f"--workload must be authors, got {workload!r}")
    if workload and prompts_file is not None:
        raise UserError("give --workload or --prompts-file, not both")
    max_new_tokens = max_new_tokens or (512 if workload else 128)
    settings = resolve_settings(decoders_, decoder_arg, compile)
    labels = [st.label for st in settings]
    batch_sizes = _batch_sizes(batch_size) if batch_size is not None else None
    texts = read_prompts(prompts_file, prompts or 8) if prompts_file is not None else None  # before loading
    with tempfile.TemporaryDirectory() as tmp:
        path = model if model is not None else random_checkpoint(config, Path(tmp) / config, seed)
        ctx = DecoderContext(resolve_model(path), device, dtype, draft)
        decs = [build_decoder(st.name, ctx, st.options) for st in settings]
        per_task = None
        if workload:
            from ..harness.workload import authors_prompts

            if ctx.tokenizer is None:
                raise UserError("--workload authors needs the checkpoint's tokenizer")
            per_task = authors_prompts(prompts or 128)
            batch = [ctx.tokenizer.encode(t) for texts in per_task.values() for t in texts]  # raw text, no template
            cfg = GenerationConfig(max_new_tokens=max_new_tokens)  # EOS ignored, no stop strings
            source = (f"the TiDAR authors' workload ({', '.join(f'{len(v)} {k}' for k, v in per_task.items())}), "
                      "EOS ignored")
        elif prompts_file is not None:
            if ctx.tokenizer is None:
                raise UserError("--prompts-file needs a checkpoint with a tokenizer (--model)")
            batch = [ctx.tokenizer.encode(t) for t in texts]
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=() if ignore_eos else ctx.stop_token_ids)
            source = f"{len(batch)} prompts of {portable_path(prompts_file)}" + (", EOS ignored" if ignore_eos else "")
        else:
            vocab = ctx.model.config.vocab_size
            rng = torch.Generator().manual_seed(seed)
            batch = [torch.randint(0, vocab, (prompt_len,), generator=rng).tolist() for _ in range(prompts or 8)]
            cfg = GenerationConfig(max_new_tokens=max_new_tokens)  # no stop: every decoder makes the same count
            source = f"{prompts or 8} random prompts of {prompt_len} tokens"
        if any(not p for p in batch):
            raise UserError(f"prompt {next(i for i, p in enumerate(batch) if not p)} of {source} is empty")
        batch, truncated = fit_context(batch, max_new_tokens, ctx.model.config.max_position_embeddings)
        if truncated:
            source += (f", {truncated} left-truncated to fit the context of "
                       f"{ctx.model.config.max_position_embeddings} tokens")
        if batch_sizes is not None:
            return _speed_batched(dict(zip(labels, decs)), batch, cfg, batch_sizes, rounds, source, max_new_tokens,
                                  out, model, config, seed, ctx)
        from rich.progress import Progress

        err = Console(stderr=True)
        with Progress(transient=True, console=err, disable=not err.is_terminal) as bar:
            task = bar.add_task("paired decoding (ABBA)", total=len(batch) * len(decs))
            sums, zero_token = speed_paired(dict(zip(labels, decs)), batch, cfg, progress=lambda: bar.advance(task))
        wbytes = weight_bytes(ctx.model)
    dev = ctx.model.device
    peak = peak_bandwidth
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    if peak is None and dev_name:
        peak = next((v for frag, v in PEAK_BANDWIDTH_GBS if frag in dev_name), None)
    compiled = {n: bool(d.options().get("compile", False)) for n, d in zip(labels, decs)}
    ref_tps = sums[labels[0]].tokens_per_s
    t = Table(title=f"speed: {source}, up to {max_new_tokens} new tokens, "
                    f"{'random ' + config if config else portable_path(path)}, {dev_name or dev}, {ctx.model.dtype}, "
                    f"{torch.get_num_threads()} threads")
    cols = ["decoder", "compiled", "tokens/s", "T/NFE", "τ", "acc.len", "e2e s / TPOT ms (median)",
            f"vs {labels[0]} (total)", "paired ratio median [min-max]", "compile s", f"≠{labels[0]}"]
    if dev.type == "cuda":
        cols.insert(3, "weight GB/s" + (" (% of peak)" if peak else ""))
    for col in cols:
        t.add_column(col)
    record_decs = {}
    for n, d in zip(labels, decs):
        r = sums[n]
        tps = r.tokens_per_s
        speedup = ratio(tps, ref_tps)
        rs = r.ratios
        spread = f"{statistics.median(rs):.3f} [{min(rs):.3f}-{max(rs):.3f}]" if rs else "-"
        if r.no_ratio and n != labels[0]:
            spread += f" ({r.no_ratio} with 0 tokens: no ratio)"
        status = lossless_status(n, labels[0], d.lossless, decs[0].lossless, len(labels) == 1)
        mm = {"checked": str(r.mismatch), "lossy": f"{r.mismatch} lossy", "reference": "-"}.get(status, "unchecked")
        tau = statistics.fmean(r.accepted_lengths) if r.accepted_lengths else None
        acc = r.tokens / r.decode_forwards if r.decode_forwards else None
        e2e, tpot = statistics.median(r.e2e), statistics.median(r.tpot)
        # a decode step reads every weight once per forward: bytes x forwards/s
        gbs = wbytes * (ratio(r.nfe, r.time) or 0.0) / 1e9
        cells = [n, "yes" if compiled[n] else "no", f"{tps:.1f}", f"{r.tokens / r.nfe:.2f}",
                 "-" if tau is None else f"{tau:.2f}", "-" if acc is None else f"{acc:.2f}",
                 f"{e2e:.3f} / {1000 * tpot:.2f}", "n/a (0 tokens)" if speedup is None else f"{speedup:.3f}x", spread,
                 f"{r.compile_s:.1f}", mm]
        if dev.type == "cuda":
            cells.insert(3, f"{gbs:.0f}" + (f" ({100 * gbs / peak:.0f}%)" if peak else ""))
        t.add_row(*cells)
        record_decs[n] = {"decoder": d.name, "options": portable_value(d.options()), "compiled": compiled[n],
                          "tokens": r.tokens, "decode_s": r.time, "nfe": r.nfe, "tokens_per_s": tps,
                          "speedup_vs_first": speedup, "paired_ratios": rs,
                          "prompts_without_ratio": r.no_ratio, "compile_s": r.compile_s,
                          "lossless": d.lossless, "tokens_per_nfe": r.tokens / r.nfe, "tau": tau,
                          "accept_length": acc, "decode_forwards": r.decode_forwards,
                          "e2e_latency_s": r.e2e, "tpot_s": r.tpot,
                          "lossless_mismatches": r.mismatch if status == "checked" else None,
                          "lossy_mismatches": r.mismatch if status == "lossy" else None, "lossless_check": status,
                          "weight_bandwidth_GBs": gbs if dev.type == "cuda" else None}
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped output: never fold the table
    console.print(t)
    console.print(f"reference: {labels[0]} ({'compiled' if compiled[labels[0]] else 'eager'}) at {ref_tps:.1f} tokens/s; "
                  f"paired ratio = a setting's tokens/s over the reference's on the same prompt ({len(batch)} prompts, "
                  "ABBA order); "
                  "compile s = first-use compilation, excluded from tokens/s; T/NFE = tokens per forward (prefill "
                  "counted), τ = EAGLE's tokens per decoding step, acc.len = the TiDAR authors' tokens per decode forward "
                  "(prefill forwards excluded); e2e = per-request decode time, TPOT = (e2e - prefill) / new tokens; "
                  f"≠{labels[0]}: prompts whose tokens differ from the reference's (lossless: must be 0; "
                  "`lossy`: reported)", style="dim")
    if zero_token:
        console.print(f"prompts with 0 new tokens (EOS first), prompt index: settings: "
                      + "; ".join(f"{i}: {', '.join(n for j, n in zero_token if j == i)}"
                                  for i in sorted({i for i, _ in zero_token}))
                      + " (such a prompt has no tokens/s ratio)")
    if out is not None:
        record = {"command": portable_command(["tidar-bench", *sys.argv[1:]]), "environment": environment(),
                  "model": portable_path(model) if model else f"random weights, config {config}", "seed": seed,
                  "prompts": source, "n_prompts": len(batch), "max_new_tokens": max_new_tokens,
                  "workload": workload, "ignore_eos": bool(ignore_eos or workload),
                  "dtype": str(ctx.model.dtype), "device": str(dev), "device_name": dev_name,
                  "compile": compile, "reference": labels[0], "reference_tokens_per_s": ref_tps,
                  "weight_bytes": wbytes, "peak_bandwidth_GBs": peak, "decoders": record_decs,
                  "zero_token_prompts": [{"prompt": i, "decoder": n} for i, n in zero_token]}
        write_atomic(out, json.dumps(record, indent=2) + "\n")
    unchecked = [f"{n} ({v['lossless_check'].partition(': ')[2]})" for n, v in record_decs.items()
                 if v["lossless_check"].startswith("unchecked")]
    if unchecked:
        console.print(f"lossless check not done for: {', '.join(unchecked)}", style="bold yellow")
    if any(v["lossless_mismatches"] for v in record_decs.values()):
        raise UserError("a lossless decoder's greedy tokens differ from the reference decoder's")


def _batch_sizes(value: str) -> list[int]:
    from .profile import parse_ints

    sizes = sorted(set(parse_ints(value, "--batch-size")))
    if sizes[0] < 1:
        raise UserError(f"--batch-size must all be >= 1, got {sizes[0]}")
    return sizes


def _speed_batched(decs: dict, prompts: list, cfg, batch_sizes: list[int], rounds: int, source: str,
                   max_new_tokens: int, out: Optional[Path], model, config, seed: int, ctx) -> None:
    """speed --batch-size: batched.speed_batch, one table row per (batch size, decoder), and the
    JSON of report.SPEED_BATCH_FORMAT with --out."""
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ..batched import speed_batch, supports_batch
    from ..provenance import portable_path

    for label, d in decs.items():
        why = supports_batch(d)
        if why:
            raise UserError(f"{label}: {why}")
    console = Console()
    with Progress(transient=True, console=console) as bar:
        task = bar.add_task("batched decoding", total=len(batch_sizes) * rounds * len(decs))
        res = speed_batch(decs, prompts, cfg, batch_sizes, rounds, progress=lambda: bar.advance(task))
    ref = res["reference"]
    dev = ctx.model.device
    t = Table(title=f"batched speed: {source}, up to {max_new_tokens} new tokens, "
                    f"{'random ' + config if config else portable_path(model)}, {dev}, {ctx.model.dtype}, {torch.get_num_threads()} threads, "
                    f"{rounds} paired rounds per batch size")
    for col in ("batch", "decoder", "tokens/s (batch)", "T/NFE", "per-seq latency s: median [q1-q3]",
                f"speedup vs {ref}", "paired ratio median [min-max]", "lossless mismatches"):
        t.add_column(col)
    for b in batch_sizes:
        for label, c in res["batch"][str(b)].items():
            lat, rs = c["per_sequence_latency_s"], c["paired_ratios"]
            t.add_row(str(b), label, f"{c['tokens_per_s']:.1f}", f"{c['tokens_per_nfe']:.2f}",
                      f"{lat['median']:.3f} [{lat['q1']:.3f}-{lat['q3']:.3f}]",
                      "n/a (0 tokens)" if c["speedup_vs_reference"] is None else f"{c['speedup_vs_reference']:.3f}x",
                      f"{statistics.median(rs):.3f} [{min(rs):.3f}-{max(rs):.3f}]" if rs else "-",
                      "-" if c["lossless_mismatches"] is None else str(c["lossless_mismatches"]))
    console.print(t)
    console.print(f"tokens/s = all new tokens / decode wall time of the whole prompt set (prefills included) at that "
                  f"batch size; speedup vs {ref} at the same batch size; lossless mismatches vs {ref} at batch "
                  f"{batch_sizes[0]}; each decoder runs its batched steps with its own compile setting "
                  f"(compiled by default: one graph per batch size and step shape)", style="dim")
    if out is not None:
        from ..provenance import environment, portable_command, portable_path, portable_value, write_atomic

        record = {"command": portable_command(["tidar-bench", *sys.argv[1:]]), "environment": environment(),
                  "model": portable_path(model) if model else f"random weights, config {config}", "seed": seed,
                  "prompts": source, "n_prompts": len(prompts), "max_new_tokens": max_new_tokens,
                  "dtype": str(ctx.model.dtype), "device": str(dev), "rounds": rounds,
                  "decoders": {n: {"decoder": d.name, "options": portable_value(d.options()), "lossless": d.lossless}
                               for n, d in decs.items()}, **res}
        write_atomic(out, json.dumps(record, indent=2) + "\n")
    if any(c["lossless_mismatches"] for cells in res["batch"].values() for c in cells.values()):
        raise UserError(f"a lossless decoder's greedy tokens differ from {ref}'s at batch {batch_sizes[0]}")
