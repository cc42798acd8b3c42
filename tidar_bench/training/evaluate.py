"""Evaluation during training (`--eval-every N --eval-prompts FILE`): decode held-out prompts with
the checkpoint of the current weights and report what the recipe is for:

- tidar: T/NFE (tokens per target forward) of the `tidar` decoder;
- block diffusion: T/NFE of the `bd` decoder (its default threshold rule: tokens finalised per forward);
- eagle head: mean accepted length of the `eagle` decoder (the frozen target + this head);
- every recipe, when the prompts carry an `answer`: exact match of the greedy output.
  The answer read from an output is the text after its last "####" when it has one, else its first
  line; both sides are stripped.

Prompts: a .jsonl file with a `prompt` string per line and optional `answer`.
An objective may set `eval_decoder = (decoder name, primary metric or None, decodes as draft)` to
choose its own; objectives without one and without answers cannot be evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError
from .data import read_jsonl

# objective name -> (decoder, primary metric or None, the checkpoint is a draft head for the base)
EVAL_DECODERS = {
    "tidar": ("tidar", "tokens_per_nfe", False),
    "eagle_head": ("eagle", "mean_accepted_length", True),
    "block_diffusion": ("bd", "tokens_per_nfe", False),
    "ar": ("ar", None, False),
}


def check_eval_prompts(path: Path, limit: int) -> list[dict]:
    """The first `limit` prompts of a .jsonl file ({"prompt": str, "answer"?: str})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--eval-prompts: file not found: {p}")
    if limit < 1:
        raise UserError("--eval-limit must be >= 1")
    rows = []
    for rec in read_jsonl(p, "prompt"):
        if not isinstance(rec["prompt"], str):
            raise UserError(f"{p}: a 'prompt' is not a string")
        rows.append(rec)
        if len(rows) == limit:
            break
    if not rows:
        raise UserError(f"--eval-prompts: {p} has no prompts")
    return rows


def extract_answer(text: str) -> str:
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    return text.strip().split("\n")[0].strip()


def make_evaluator(objective, prompts: list[dict], base: Path, device: str,
                   max_new_tokens: int = 64) -> Callable[[Path], dict[str, float]]:
    """evaluate(checkpoint_dir) -> metrics, for the loop's `evaluator`."""
    spec = getattr(objective, "eval_decoder", None) or EVAL_DECODERS.get(objective.name)
    answers = all("answer" in r for r in prompts)
    if spec is None or (spec[1] is None and not answers):
        raise UserError(f"--eval-every: the {objective.name} recipe reports exact match only; "
                        "give --eval-prompts lines an 'answer'")
    decoder, primary, as_draft = spec

    def evaluate(ckpt: Path) -> dict[str, float]:
        from ..decoding import GenerationConfig
        from ..registry import DecoderContext, build_decoder, decoders

        ctx = DecoderContext(base, device, "auto", draft_path=ckpt) if as_draft else DecoderContext(ckpt, device, "auto")
        tok = ctx.tokenizer
        # eager: a fresh decoder per evaluation would recompile each time; the counts are the same
        eager = {"compile": "off"} if "compile" in decoders()[decoder].option_types() else None
        dec = build_decoder(decoder, ctx, eager)
        gen = GenerationConfig(max_new_tokens=max_new_tokens,
                               stop_token_ids=(tok.eos_token_id,) if tok.eos_token_id is not None else ())
        new = nfe = steps = accepted = hits = 0
        for rec in prompts:
            g = dec.generate(tok.encode(rec["prompt"], add_special_tokens=False), gen)
            new, nfe = new + g.stats.new_tokens, nfe + g.stats.nfe
            steps, accepted = steps + len(g.stats.accepted_lengths), accepted + sum(g.stats.accepted_lengths)
            if answers:
                text = g.text if g.text is not None else tok.decode(g.tokens, skip_special_tokens=True)
                hits += extract_answer(text) == str(rec["answer"]).strip()
        metrics = {}
        if primary == "tokens_per_nfe":
            metrics["eval_tokens_per_nfe"] = new / max(nfe, 1)
        elif primary == "mean_accepted_length":
            metrics["eval_mean_accepted_length"] = accepted / max(steps, 1)
        if answers:
            metrics["eval_exact_match"] = hits / len(prompts)
        return metrics

    return evaluate
