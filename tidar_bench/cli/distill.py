"""`tidar-bench distill`: the target model's own responses to prompts, as training data.

EAGLE-3 heads and diffusion drafters learn best from what the target itself generates (its own
distribution, not the corpus'). This decodes every prompt with any registered decoder (batch 1) and
writes one JSONL record per prompt: `prompt`, `response` and `text` (what `train tidar` / `train
eagle` read by default); for chat prompts also `messages` (the conversation with the response as
the last assistant turn; `text` is then that conversation rendered with the chat template). The
file is written to a temp file and renamed at the end (a killed run leaves no half file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .core import DECODER_ARG_HELP
from ..errors import UserError


@app.command("distill")
def distill_cmd(
    model: Path = typer.Option(..., "--model", help="target checkpoint (config.json, safetensors, tokenizer)"),
    prompts: str = typer.Option(..., help="prompts: a .jsonl/.parquet/.arrow file, a datasets directory or a "
                                          "Hugging Face dataset NAME[:CONFIG]"),
    out: Path = typer.Option(..., help="output .jsonl (must not exist)"),
    prompt_field: str = typer.Option("prompt", help="record field holding the prompt text, or a chat "
                                                    "(list of role/content messages)"),
    chat: bool = typer.Option(False, help="wrap text prompts as a user turn of the tokenizer's chat template"),
    decoder: str = typer.Option("ar", help="decoder name (see `tidar-bench decoders`); lossless ones give the "
                                           "target's own outputs"),
    draft: Optional[Path] = typer.Option(None, help="draft checkpoint for decoders that need one"),
    decoder_arg: Optional[list[str]] = typer.Option(None, help=DECODER_ARG_HELP),
    max_new_tokens: int = typer.Option(256, min=1),
    batch_size: int = typer.Option(1, min=1, help="sequences in flight (tidar_bench.batched: every decoder, "
                                                  "greedy or sampled; hf: padded chunks)"),
    limit: int = typer.Option(0, min=0, help="distill the first N prompts (0 = all)"),
    split: str = typer.Option("train", help="split of dataset prompts"),
    streaming: bool = typer.Option(False, help="stream Hugging Face datasets (use with --limit)"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Generate the target's responses to prompts: training data for EAGLE and diffusion drafters."""
    from tqdm.auto import tqdm

    from ..decoding import GenerationConfig, SamplingParams
    from ..model import read_config
    from ..registry import DecoderContext, build_decoder, resolve_settings
    from ..training.data import iter_records

    read_config(model)
    if out.exists():
        raise UserError(f"{out} exists; distill writes a new file")
    if not out.parent.is_dir():
        raise UserError(f"directory {out.parent} does not exist")
    try:
        sampling = SamplingParams(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise UserError(str(e))
    records = list(iter_records(prompts, prompt_field, split=split, streaming=streaming, max_docs=limit))
    if not records:
        raise UserError(f"{prompts} holds no prompts")
    ctx = DecoderContext(model, device, dtype, draft)
    tok = ctx.tokenizer
    if tok is None:
        raise UserError(f"{model} has no tokenizer; distill needs one")
    chats = [_as_chat(r, chat, prompts) for r in records]
    if any(c is not None for c in chats) and not getattr(tok, "chat_template", None):
        raise UserError(f"chat prompts need a tokenizer with a chat template; {model}'s has none")
    chosen = resolve_settings(decoder, decoder_arg, "auto", "--decoder")
    if len(chosen) != 1:
        raise UserError("distill takes one decoder")
    dec = build_decoder(chosen[0].name, ctx, chosen[0].options)
    eos = () if tok.eos_token_id is None else (tok.eos_token_id,)
    gen = GenerationConfig(max_new_tokens, (), eos, sampling)
    prompt_texts = [rec if msgs is None else tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                    for rec, msgs in zip(records, chats)]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompt_texts]
    bar = tqdm(total=len(ids), desc=f"distill {decoder}", unit="prompt")
    if batch_size > 1:
        from ..batched import generate_batch

        gens = generate_batch(dec, ids, gen, batch_size, on_done=lambda i, g: bar.update(1))
    else:
        gens = []
        for x in ids:
            gens.append(dec.generate(x, gen))
            bar.update(1)
    bar.close()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for prompt, msgs, g in zip(prompt_texts, chats, gens):
                response = g.text if g.text is not None else tok.decode(g.tokens, skip_special_tokens=True)
                row = {"prompt": prompt, "response": response, "text": prompt + response}
                if msgs is not None:
                    row["messages"] = [*msgs, {"role": "assistant", "content": response}]
                    row["text"] = tok.apply_chat_template(row["messages"], tokenize=False)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    new = sum(g.stats.new_tokens for g in gens)
    print(f"wrote {out}: {len(records)} responses, {new} generated tokens ({decoder})")


def _as_chat(value, chat: bool, src: str) -> list[dict] | None:
    """The conversation to answer (up to its last user turn), or None for a plain text prompt."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if chat else None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        users = [i for i, m in enumerate(value) if m["role"] == "user"]
        if not users:
            raise UserError(f"{src}: a chat prompt has no user turn")
        return [dict(role=m["role"], content=m["content"]) for m in value[: users[-1] + 1]]
    raise UserError(f"{src}: the prompt field holds {type(value).__name__}, not text or chat messages")
