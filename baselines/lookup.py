"""Prompt-lookup (n-gram) decoding: drafts copied from the prompt and the text so far, no draft model.

Each step, per row: find the most recent earlier occurrence of the row's last n tokens (n from
max_ngram down to min_ngram) and propose the up-to-k tokens that followed it (transformers'
`prompt_lookup_num_tokens`, vLLM's `ngram` speculative method); no match: no drafts, a plain AR
step. One target forward verifies [newest token | drafts] of every row with `decoding.verify_chain`:
greedy, or exact speculative sampling with a point-mass proposal (the drafts are deterministic, so
q = one-hot), which keeps the target distribution. Written from docs/writing-a-decoder.md."""

from __future__ import annotations

import torch

from tidar_bench.compiled import steps_for
from tidar_bench.decoding import GenerationConfig, next_token, verify_chain, warp_probs
from tidar_bench.engine import Row, RowDecoder, Step
from tidar_bench.errors import UserError
from tidar_bench.registry import DecoderContext, register_decoder


def propose(history: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens of
    `history`, for the largest n in [min_ngram, max_ngram] that occurs; [] when none does."""
    L = len(history)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = history[L - n:]
        for i in range(L - n - 1, -1, -1):  # i + n <= L - 1: at least one token follows
            if history[i: i + n] == tail:
                return history[i + n: i + n + k]
    return []


class LookupDecoder(RowDecoder):
    """Per row: state = prompt + committed tokens (the newest one's KV comes with the next step)."""

    name = "lookup"
    lossless = True

    def __init__(self, model, tokenizer=None, *, num_draft_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1,
                 compile: str = "off"):
        if num_draft_tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise UserError("lookup needs num_draft_tokens >= 1 and 1 <= min_ngram <= max_ngram")
        self.model, self.tokenizer = model, tokenizer
        self.k, self.max_ngram, self.min_ngram = num_draft_tokens, max_ngram, min_ngram
        self.step_rows = num_draft_tokens + 1
        self.steps = steps_for(model, model, compile)

    def options(self) -> dict:
        return {"num_draft_tokens": self.k, "max_ngram": self.max_ngram, "min_ngram": self.min_ngram,
                "compile": self.steps.compiled}

    def runners(self) -> list:
        return [self.steps]

    def begin(self, batch: int, config: GenerationConfig) -> None:
        self._sp = config.sampling
        self._padded = batch > 1 or self.steps.compiled  # one static width (k drafts) per step

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        logits = self.model(torch.tensor([prompt], device=self.model.device), cache=caches["target"],
                            logits_index=slice(-1, None)).logits[0]
        tok = int(next_token(logits[-1], self._sp, row.gen))
        row.state = list(prompt) + [tok]
        return Step([tok], fed=len(prompt), advance=len(prompt))

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        drafts = [propose(r.state, self.k, self.max_ngram, self.min_ngram) if r is not None else [] for r in rows]
        w = self.k if self._padded else len(drafts[0])  # draft slots fed per row (padding: never accepted)
        starts = [r.length if r is not None else 0 for r in rows]
        fed = [[r.state[-1] if r is not None else 0] + d + [0] * (w - len(d)) for r, d in zip(rows, drafts)]
        host = torch.tensor([fed, [[p + i for i in range(w + 1)] for p in starts]])
        ids, pos = host.to(self.model.device).unbind(0)
        logits = self.steps(ids, pos, cache=caches["target"], starts=starts).logits  # causal over the fed tokens
        n, nxt = self._verify(ids[:, 1:], logits, [len(d) for d in drafts], rows)
        out: list[Step | None] = [None] * len(rows)
        for s, (a, t) in enumerate(torch.stack([n, nxt], 1).tolist()):  # one host read per step
            if rows[s] is not None:
                tokens = drafts[s][:a] + [t]
                rows[s].state += tokens
                out[s] = Step(tokens, fed=w + 1, accepted=a + 1, advance=a + 1)  # x + the a accepted drafts kept
        return out

    def _verify(self, drafts, logits, n_valid, rows):
        """verify_chain: greedy argmax match, or speculative sampling with one-hot proposals."""
        if self._sp.greedy:
            return verify_chain(drafts, logits, n_valid=n_valid)
        q = torch.nn.functional.one_hot(drafts, logits.shape[-1]).float()
        return verify_chain(drafts, warp_probs(logits, self._sp), q, n_valid=n_valid,
                            generators=[r.gen if r is not None else None for r in rows])


@register_decoder("lookup", help="prompt-lookup (n-gram) decoding: drafts copied from the prompt and the text so far "
                                 "(no draft model), verified by the target; lossless")
def build(ctx: DecoderContext, *, num_draft_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1,
          compile: str = "auto") -> LookupDecoder:
    return LookupDecoder(ctx.model, ctx.tokenizer, num_draft_tokens=num_draft_tokens, max_ngram=max_ngram,
                         min_ngram=min_ngram, compile=compile)
