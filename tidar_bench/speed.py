"""Paired speed measurement at batch 1 (`tidar-bench speed` without --batch-size): every decoder
setting decodes every prompt, prompt by prompt, so each setting's tokens/s is compared with the
reference's (the first setting) on the same prompt minutes apart at most. The order alternates ABBA
(prompt 0: A B C, prompt 1: C B A, ...), so a drift of the machine's speed during one prompt's turn
weighs on every setting alike. `batched.speed_batch` is the same measurement at batch sizes > 1.

The CLI only parses and renders; this module holds the loop and the per-setting sums."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .decoding import Decoder, GenerationConfig
from .errors import UserError


def ratio(a: float, b: float) -> float | None:
    """a / b, or None where b is 0 (a prompt that made no token has no tokens/s ratio)."""
    return a / b if b else None


def read_prompts(path: Path, limit: int) -> list[str]:
    """The first `limit` `prompt` fields of a JSONL file (blank lines skipped)."""
    if not Path(path).is_file():
        raise UserError(f"--prompts-file {path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--prompts-file {path}:{i}: expected a JSON object with a `prompt` field")
            if not isinstance(prompt, str) or not prompt:
                raise UserError(f"--prompts-file {path}:{i}: `prompt` must be a non-empty string")
            out.append(prompt)
            if len(out) == limit:
                break
    if not out:
        raise UserError(f"--prompts-file {path} holds no prompts")
    return out


def fit_context(prompts: list[list[int]], max_new_tokens: int, context: int) -> tuple[list[list[int]], int]:
    """Prompts left-truncated so that prompt + max_new_tokens fits the model's context (lm-eval's rule,
    as `run` applies it): (prompts, how many were truncated)."""
    keep = context - max_new_tokens
    if keep < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {context} tokens")
    return [p[-keep:] for p in prompts], sum(len(p) > keep for p in prompts)


def lossless_status(decoder: str, reference: str, lossless: bool, ref_lossless: bool, alone: bool) -> str:
    """How a decoder's outputs are judged against the reference (the first setting), in `speed` and
    `run` alike: `checked` (lossless against a lossless reference: mismatches must be 0), `reference`,
    `lossy` (differences reported, not a failure), or `unchecked: <why>` for a lossless decoder with
    nothing to be checked against (never a silent pass)."""
    if decoder == reference:
        # the reference alone is checked by nothing, unless it is AR itself (the definition)
        is_ar = decoder.partition("(")[0] == "ar"  # the label's decoder name
        return "unchecked: no other decoder" if alone and lossless and not is_ar else "reference"
    if not lossless:
        return "lossy"
    return "checked" if ref_lossless else f"unchecked: reference {reference} is lossy"


@dataclass
class SettingSums:
    """One setting's sums over the prompts (warm-up excluded)."""

    tokens: int = 0
    time: float = 0.0
    nfe: int = 0
    decode_forwards: int = 0
    compile_s: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)  # every decode step's committed tokens
    e2e: list[float] = field(default_factory=list)  # per-prompt decode wall time
    tpot: list[float] = field(default_factory=list)  # the authors' TPOT: (latency - prefill) / new tokens
    ratios: list[float] = field(default_factory=list)  # tokens/s over the reference's, same prompt
    no_ratio: int = 0  # prompts where this setting or the reference made no token
    mismatch: int = 0  # prompts whose tokens differ from the reference's

    @property
    def tokens_per_s(self) -> float:
        return ratio(self.tokens, self.time) or 0.0


def speed_paired(decoders: dict[str, Decoder], prompts: list[list[int]], config: GenerationConfig,
                 progress=None) -> tuple[dict[str, SettingSums], list[tuple[int, str]]]:
    """Decode every prompt with every setting in ABBA order, after one warm-up of each setting on the
    longest prompt (kernels, allocator, caches, compilation: its compile time is kept apart).

    Returns (label -> SettingSums, [(prompt index, label)] of outputs with 0 new tokens). Ratios and
    mismatches are against the first label, the reference; a prompt where either side made no token
    (EOS first) has no ratio: it is counted in `no_ratio`, never divided."""
    labels = list(decoders)
    sums = {n: SettingSums() for n in labels}
    longest = max(prompts, key=len)
    for n in labels:
        sums[n].compile_s += decoders[n].generate(longest, config).stats.compile_s
    zero_token: list[tuple[int, str]] = []
    for i, p in enumerate(prompts):
        gens = {}
        for n in (labels if i % 2 == 0 else labels[::-1]):
            g = gens[n] = decoders[n].generate(p, config)
            s, st = sums[n], g.stats
            s.tokens += st.new_tokens
            s.time += st.wall_time_s
            s.nfe += st.nfe
            s.compile_s += st.compile_s
            s.decode_forwards += st.nfe - st.prefill_forwards
            s.accepted_lengths += st.accepted_lengths
            s.e2e.append(st.wall_time_s)
            s.tpot.append((st.wall_time_s - st.prefill_time_s) / max(1, st.new_tokens))
            if not st.new_tokens:
                zero_token.append((i, n))
            if progress is not None:
                progress()
        ref = gens[labels[0]]
        for n in labels[1:]:
            g, s = gens[n], sums[n]
            if g.stats.new_tokens and ref.stats.new_tokens:
                s.ratios.append(g.stats.tokens_per_s / ref.stats.tokens_per_s)
            else:
                s.no_ratio += 1
            s.mismatch += g.tokens != ref.tokens  # a failure for lossless decoders, reported for lossy
    return sums, sorted(zero_token)
