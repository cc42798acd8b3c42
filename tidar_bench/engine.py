"""The one decoding loop: every decoder is written once, over B rows; batch 1 is B = 1.

A decoder (`RowDecoder`) implements three things and nothing about batching:

    class ARDecoder(RowDecoder):
        def new_caches(self, batch, max_len):      # its caches, one row per sequence in flight
            return {"target": self.model.new_cache(max_len, batch=batch, reuse=...)}
        def prefill(self, row, prompt, caches):    # one prompt into batch-1 caches; first tokens
            logits = self.model(ids, cache=caches["target"], ...)
            row.length = len(prompt)
            return [first_token]
        def step(self, rows):                      # ONE batched step over every slot (None: empty)
            out = self.steps(ids[B, n], pos[B, n], cache=self.caches["target"],
                             starts=[r.length if r else 0 for r in rows], ...)
            ...per row: verify, advance row.length, update row.stats...
            return [tokens committed by each row (None for an empty slot)]

`Engine` owns everything else, the same for every decoder: slots (a row of each batch cache),
admission and continuous refill (a row that stops hands back its Generation and its slot takes the
next prompt at once; the other rows never wait and never change), the shared `StopChecker`, per-row
sampling generators (seeded as the sequence would be alone), per-row stats and timing.

- B = 1: the caches have one row and `prefill` writes into them directly; that is `generate`.
- B > 1: `prefill` runs at batch 1 into scratch caches (same layout), whose row is then copied into
  the slot; every step feeds all B rows, each at its own offset (`Steps(..., starts=[B])`: static
  per-row offsets, rows padded to one step shape; an empty slot is inert, it attends only to itself
  and nothing reads it).
- Per row: nfe = forwards it took part in (its prefill included); wall_time_s = admission to last
  token (at B > 1 that includes the other rows' share of each step); compile time of steps first
  used during its life is reported apart (`compile_s`), not in wall_time_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .decoding import DecodeStats, Generation, GenerationConfig, StopChecker, Timer, make_generator
from .errors import UserError


@dataclass
class Row:
    """One sequence in flight."""

    index: int  # which prompt
    slot: int  # its row in every batch cache
    stop: StopChecker
    stats: DecodeStats
    gen: torch.Generator | None  # its own sampling generator (None: greedy)
    t0: float
    compile0: float  # the decoder's compile seconds at admission
    length: int = 0  # committed KV slots in the target cache (the decoder keeps it)
    state: Any = None  # the decoder's own per-row state


class RowDecoder:
    """Base of decoders written over B rows (see the module doc). Subclasses set `step_rows` (the
    most tokens one row feeds in a step, its cache headroom) and `runners()` (their `Steps`, for
    compile accounting), and implement `new_caches`, `prefill` and `step`."""

    step_rows = 1
    caches: dict = {}
    _scratch: dict = {}

    def runners(self) -> list:
        return []

    def begin(self, batch: int, config: GenerationConfig) -> None:
        """Called once per generate_batch call, after the caches: per-call state of B rows."""

    def new_caches(self, batch: int, max_len: int, reuse: dict) -> dict:
        return {"target": self.model.new_cache(max_len, batch=batch, reuse=reuse.get("target"))}

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> list[int]:
        raise NotImplementedError

    def step(self, rows: list[Row | None]) -> list[list[int] | None]:
        raise NotImplementedError

    def check_batch(self, config: GenerationConfig, batch_size: int) -> str | None:
        """Why this decoder, as configured, cannot decode `config` at `batch_size` (None: it can)."""
        return None

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
        return self.generate_batch([prompt_ids], config, 1)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, batch_size: int,
                       on_done: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        """Decode every prompt with `batch_size` sequences in flight; results in prompt order.
        `on_done(i, generation)` is called as each sequence finishes (progress, streaming)."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if any(len(p) == 0 for p in prompts):
            raise UserError(f"{self.name} needs a non-empty prompt")
        if not prompts:
            return []
        why = self.check_batch(config, min(batch_size, len(prompts)))
        if why:
            raise UserError(why)
        return Engine(self, [[int(t) for t in p] for p in prompts], config, batch_size, on_done).run()


class Engine:
    """Slots, admission, refill and per-row bookkeeping around a RowDecoder's prefill and step."""

    def __init__(self, decoder: RowDecoder, prompts: list[list[int]], config: GenerationConfig, batch_size: int,
                 on_done):
        self.dec, self.prompts, self.config, self.on_done = decoder, prompts, config, on_done
        self.B = min(batch_size, len(prompts))
        self.dev = decoder.model.device
        self.timer = Timer(self.dev)
        longest = max(len(p) for p in prompts)
        need = longest + config.max_new_tokens + decoder.step_rows + 2
        decoder.caches = decoder.new_caches(self.B, need, decoder.caches)
        if self.B > 1:  # prefills run at batch 1 into these, then their row is copied into the slot
            decoder._scratch = decoder.new_caches(1, longest + decoder.step_rows + 2, decoder._scratch)
        decoder.begin(self.B, config)
        self.rows: list[Row | None] = [None] * self.B
        self.results: list[Generation | None] = [None] * len(prompts)
        self.next_prompt = 0

    def compile_s(self) -> float:
        return sum(r.compile_s for r in self.dec.runners())

    def run(self) -> list[Generation]:
        while True:
            for s in range(self.B):
                while self.rows[s] is None and self.next_prompt < len(self.prompts):
                    self._admit(s)
            rows = self.rows
            if not any(r is not None for r in rows):
                return self.results
            committed = self.dec.step(rows)
            for s, row in enumerate(rows):
                if row is not None and row.stop.extend(committed[s]):
                    self._finish(s)

    def _admit(self, slot: int) -> None:
        i = self.next_prompt
        self.next_prompt += 1
        t0 = self.timer.now()
        row = Row(i, slot, StopChecker(self.config, getattr(self.dec, "tokenizer", None)), DecodeStats(),
                  make_generator(self.config.sampling, self.dev), t0, self.compile_s())
        dec = self.dec
        if self.B == 1:
            for c in dec.caches.values():
                c.reset()
            first = dec.prefill(row, self.prompts[i], dec.caches)
        else:
            for c in dec._scratch.values():
                c.reset()
            first = dec.prefill(row, self.prompts[i], dec._scratch)
            for name, src in dec._scratch.items():
                copy_row(dec.caches[name], src, slot)
        row.stats.prefill_time_s = self.timer.now() - t0 - (self.compile_s() - row.compile0)
        self.rows[slot] = row
        if row.stop.extend(first):
            self._finish(slot)

    def _finish(self, slot: int) -> None:
        row = self.rows[slot]
        row.stats.compile_s = self.compile_s() - row.compile0
        row.stats.wall_time_s = self.timer.now() - row.t0 - row.stats.compile_s
        g = row.stop.result(row.stats)
        self.results[row.index] = g
        self.rows[slot] = None
        if self.on_done is not None:
            self.on_done(row.index, g)


def copy_row(dst, src, slot: int) -> None:
    """Every slot of row 0 of cache `src` (batch 1) into row `slot` of cache `dst`."""
    n = min(src.max_len, dst.max_len)
    for d_layers, s_layers in ((dst.k, src.k), (dst.v, src.v)):
        for d, s_ in zip(d_layers, s_layers):
            d[slot, :, :n] = s_[0, :, :n]


def inert_local(n: int, B: int, device) -> torch.Tensor:
    """[B, n, n] local masks where every token sees only itself (an empty slot's or a padding
    token's row: finite attention, read by nobody); callers fill the live rows' blocks."""
    return torch.eye(n, dtype=torch.bool, device=device).repeat(B, 1, 1)
