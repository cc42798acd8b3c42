"""Core commands: `decoders` (list them), `generate` (one prompt through one decoder) and
`speed` (paired tokens/s benchmark of several decoders on the same model and prompts)."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Optional

import typer

from .app import app
from ..errors import UserError


def parse_kv(items: list[str] | None, what: str = "--decoder-arg") -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"{what} expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_list(value: str, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise UserError(f"{what} is empty")
    return items


CONFIGS_DIR = Path(__file__).parent / "configs"


def random_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of a shipped architecture config to `out`."""
    from ..model import ModelConfig, Transformer, init_weights, save_model

    f = CONFIGS_DIR / f"{name}.json"
    if not f.is_file():
        names = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise UserError(f"unknown config {name!r}; shipped configs: {', '.join(names) or 'none'}")
    cfg = ModelConfig.from_dict(json.loads(f.read_text()))
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
    decoder: str = typer.Option("ar", help="decoder name (see `tidar-bench decoders`)"),
    draft: Optional[Path] = typer.Option(None, help="draft checkpoint for decoders that need one"),
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    stop: Optional[list[str]] = typer.Option(None, help="stop string (repeatable)"),
    decoder_arg: Optional[list[str]] = typer.Option(None, help="decoder option key=value (repeatable)"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="print the generation and stats as JSON"),
) -> None:
    """Decode one prompt with one decoder and print the output and its stats."""
    from ..decoding import GenerationConfig, SamplingParams
    from ..registry import DecoderContext, build_decoder

    ctx = DecoderContext(model, device, dtype, draft)
    dec = build_decoder(decoder, ctx, parse_kv(decoder_arg))
    tok = ctx.tokenizer
    if (prompt is None) == (prompt_ids is None):
        raise UserError("give exactly one of --prompt or --prompt-ids")
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
    vocab = ctx.model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise UserError(f"prompt token ids must be in [0, {vocab})")
    try:
        sampling = SamplingParams(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise UserError(str(e))
    eos = () if tok is None or tok.eos_token_id is None else (tok.eos_token_id,)
    cfg = GenerationConfig(max_new_tokens, tuple(stop or ()), eos, sampling)
    g = dec.generate(ids, cfg)
    if as_json:
        print(json.dumps({"tokens": g.tokens, "text": g.text, "finish_reason": g.finish_reason,
                          "stats": g.stats.as_dict()}))
        return
    print(g.text if g.text is not None else " ".join(map(str, g.tokens)))
    s = g.stats
    print(f"[{dec.name}] tokens={s.new_tokens} nfe={s.nfe} T/NFE={s.tokens_per_nfe:.2f} "
          f"mean_accepted={s.mean_accepted_length:.2f} tokens/s={s.tokens_per_s:.1f} finish={g.finish_reason}")


def read_prompts(path: Path, limit: int) -> list[str]:
    """The first `limit` `prompt` fields of a JSONL file."""
    if not Path(path).is_file():
        raise UserError(f"--prompts-file {path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--prompts-file {path}:{i}: expected a JSON object with a `prompt` field")
            if len(out) == limit:
                break
    if not out:
        raise UserError(f"--prompts-file {path} holds no prompts")
    return out


@app.command("speed")
def speed_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint directory"),
    config: Optional[str] = typer.Option(None, "--config", help="a shipped architecture with random weights instead of --model"),
    decoders_: str = typer.Option("ar,hf", "--decoders", help="comma-separated decoders; the first is the reference"),
    draft: Optional[Path] = typer.Option(None),
    prompts: int = typer.Option(8, min=1, help="number of prompts (random token ids, seeded; or the first N of --prompts-file)"),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts-file", help="JSONL with a `prompt` field (e.g. tasks/data/mini/gsm.jsonl): real prompts, "
                                     "decoding stops at EOS; default: random token ids, no stop"),
    prompt_len: int = typer.Option(64, min=1),
    max_new_tokens: int = typer.Option(128, min=1),
    decoder_arg: Optional[list[str]] = typer.Option(None, help="decoder option decoder.key=value (repeatable)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the table, command and environment to this JSON file"),
) -> None:
    """Paired speed benchmark: each prompt is decoded greedily by every decoder in turn (after one
    warm-up each), and tokens/s ratios vs the first decoder are printed, with a check that
    lossless decoders produced the reference's tokens."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..decoding import GenerationConfig
    from ..registry import DecoderContext, build_decoder

    if threads:
        torch.set_num_threads(threads)
    if (model is None) == (config is None):
        raise UserError("give exactly one of --model or --config")
    names = parse_list(decoders_, "--decoders")
    scoped: dict[str, dict[str, str]] = {n: {} for n in names}
    for k, v in parse_kv(decoder_arg).items():
        if "." not in k or k.split(".", 1)[0] not in scoped:
            raise UserError(f"--decoder-arg for speed must be DECODER.key=value with DECODER in {names}, got {k!r}")
        d, key = k.split(".", 1)
        scoped[d][key] = v
    with tempfile.TemporaryDirectory() as tmp:
        path = model if model is not None else random_checkpoint(config, Path(tmp) / config, seed)
        ctx = DecoderContext(path, device, dtype, draft)
        decs = [build_decoder(n, ctx, scoped[n]) for n in names]
        if prompts_file is not None:
            texts = read_prompts(prompts_file, prompts)
            batch = [ctx.tokenizer.encode(t) for t in texts]
            eos = ctx.tokenizer.eos_token_id
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=(eos,) if eos is not None else ())
            source = f"{len(batch)} prompts of {prompts_file}"
        else:
            vocab = ctx.model.config.vocab_size
            rng = torch.Generator().manual_seed(seed)
            batch = [torch.randint(0, vocab, (prompt_len,), generator=rng).tolist() for _ in range(prompts)]
            cfg = GenerationConfig(max_new_tokens=max_new_tokens)  # no stop: every decoder makes the same count
            source = f"{prompts} random prompts of {prompt_len} tokens"
        for d in decs:
            d.generate(batch[0], cfg)  # warm-up
        rows = {n: {"tokens": 0, "time": 0.0, "nfe": 0, "ratios": [], "mismatch": 0} for n in names}
        for p in batch:
            ref = None
            for n, d in zip(names, decs):
                g = d.generate(p, cfg)
                r = rows[n]
                r["tokens"] += g.stats.new_tokens
                r["time"] += g.stats.wall_time_s
                r["nfe"] += g.stats.nfe
                if ref is None:
                    ref = g
                else:
                    r["ratios"].append(g.stats.tokens_per_s / ref.stats.tokens_per_s)
                    if d.lossless and g.tokens != ref.tokens:
                        r["mismatch"] += 1
    t = Table(title=f"speed: {source}, up to {max_new_tokens} new tokens, "
                    f"{'random ' + config if config else path}, {ctx.model.device}, {ctx.model.dtype}, "
                    f"{torch.get_num_threads()} threads")
    for col in ("decoder", "tokens/s", "T/NFE", f"speedup vs {names[0]} (total)", "median paired ratio", "lossless mismatches"):
        t.add_column(col)
    ref_tps = rows[names[0]]["tokens"] / rows[names[0]]["time"]
    for n, d in zip(names, decs):
        r = rows[n]
        tps = r["tokens"] / r["time"]
        med = f"{statistics.median(r['ratios']):.3f}" if r["ratios"] else "-"
        mm = str(r["mismatch"]) if (d.lossless and n != names[0]) else "-"
        t.add_row(n, f"{tps:.1f}", f"{r['tokens'] / r['nfe']:.2f}", f"{tps / ref_tps:.3f}x", med, mm)
    Console().print(t)
    if out is not None:
        import sys

        from ..provenance import environment, write_atomic

        record = {"command": " ".join(["tidar-bench", *sys.argv[1:]]), "environment": environment(),
                  "model": str(model) if model else f"random weights, config {config}", "seed": seed,
                  "prompts": source, "max_new_tokens": max_new_tokens,
                  "dtype": str(ctx.model.dtype), "device": str(ctx.model.device),
                  "decoders": {n: {"options": d.options(), "tokens": rows[n]["tokens"], "decode_s": rows[n]["time"],
                                   "nfe": rows[n]["nfe"], "tokens_per_s": rows[n]["tokens"] / rows[n]["time"],
                                   "speedup_vs_first": (rows[n]["tokens"] / rows[n]["time"]) / ref_tps,
                                   "paired_ratios": rows[n]["ratios"], "lossless_mismatches": rows[n]["mismatch"]}
                               for n, d in zip(names, decs)}}
        write_atomic(out, json.dumps(record, indent=2) + "\n")
    if any(rows[n]["mismatch"] for n in names):
        raise UserError("a lossless decoder's greedy tokens differ from the reference decoder's")
