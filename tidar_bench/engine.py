"""The one decoding loop: every decoder is written once, over B rows; batch 1 is B = 1.

A decoder (`RowDecoder`) declares `name`, `lossless`, `model`, `tokenizer` and `options()` and
implements `prefill` and `step` (and `new_caches` when it needs more than the target's KV cache);
nothing about batching or bookkeeping. The whole contract, with a complete example, is
docs/writing-a-decoder.md; in short:

    class ARDecoder(RowDecoder):
        name, lossless = "ar", True
        def options(self):                          # what defines its behaviour (recorded in results)
            return {}
        def prefill(self, row, prompt, caches):     # one prompt into batch-1 caches
            logits = self.model(torch.tensor([prompt]), cache=caches["target"]).logits[0, -1]
            row.state = int(logits.argmax())        # whatever the row's next step needs
            return Step([row.state], fed=len(prompt), advance=len(prompt))
        def step(self, rows, caches):               # ONE batched step over every slot (None: empty)
            out = self.steps(ids[B, n], pos[B, n], cache=caches["target"],
                             starts=[r.length if r else 0 for r in rows], ...)
            ...verify each row (decoding.verify_chain)...
            return [Step(tokens, fed=n, accepted=len(tokens), advance=kept) or None per slot]

`Engine` owns everything else, the same for every decoder: the caches (`new_caches`, kept between
calls), slots (a row of each batch cache), admission and continuous refill (a row that stops hands
back its Generation and its slot takes the next prompt at once; the other rows never wait and never
change), the shared `StopChecker`, per-row sampling generators (seeded as the sequence would be
alone), and the bookkeeping of every `Step` a decoder returns: row.length (the one place a row's
committed target-cache length lives), nfe, tokens_fed, accepted_lengths, draft_forwards, per-row
timing, and the `on_step` test hook.

- B = 1: the caches have one row and `prefill` writes into them directly; that is `generate`. After
  the prefill and after every step the engine sets the target cache's length to row.length (a
  decoder never resets it), then calls `on_step(caches, history)` when a test has set it.
- B > 1: `prefill` runs at batch 1 into scratch caches (same layout), whose row is then copied into
  the slot; every step feeds all B rows, each at its own offset (`Steps(..., starts=[B])`: static
  per-row offsets, rows padded to one step shape; an empty slot is inert, it attends only to itself
  and nothing reads it).
- Per row: nfe = forwards it took part in (its prefill included); wall_time_s = admission to last
  token (at B > 1 that includes the other rows' share of each step); compile time of steps first
  used during its life is reported apart (`compile_s`), not in wall_time_s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
    length: int = 0  # committed KV slots in the target cache (the engine keeps it, from Step.advance)
    state: Any = None  # the decoder's own per-row state
    history: list[int] | None = None  # prompt + committed tokens, kept only while `on_step` is set


@dataclass(slots=True)
class Step:
    """What one row did in one step (or in its prefill); the engine books it.

    tokens: committed to the output now (the stop rules see them in order; may be empty).
    fed: tokens this row fed to the target forward (a `tokens_fed` entry); a list for a prefill of
        several forwards (one entry each).
    accepted: this forward's `accepted_lengths` entry (None: no entry; prefills usually give none).
        For verifying decoders: accepted drafts + the target's own token (== len(tokens)).
    advance: slots of the target cache this row keeps (row.length += advance; a prefill: from 0).
    forwards: target forwards counted in nfe (1; 0 for a step that only commits tokens an earlier
        forward made, e.g. AR's look-ahead: then nothing is booked but tokens and advance).
    draft_forwards: forwards of a separate draft model (not in nfe).
    """

    tokens: list[int]
    fed: int | list[int] = 0
    accepted: int | None = None
    advance: int = 0
    forwards: int = 1
    draft_forwards: int = 0


class RowDecoder(ABC):
    """Base of decoders written over B rows; see the module doc and docs/writing-a-decoder.md.
    Subclasses declare the attributes below, implement `options`, `prefill` and `step`, and may
    override `new_caches`, `begin`, `runners`, `check_batch` and `step_rows`."""

    name: str
    """The registry name (`@register_decoder(name)`), recorded with every result."""
    lossless: bool
    """True when greedy outputs must equal AR greedy outputs (tests and `check` hold it to that)."""
    model: Any
    """The target model core (`tidar_bench.model`): its device, config, `new_cache` and forward."""
    tokenizer: Any
    """The tokenizer (None allowed: no stop strings, no text)."""
    step_rows: int = 1
    """The most tokens one row feeds in a step: the cache headroom past its length."""
    on_step: Callable[[dict, list[int]], None] | None = None
    """Test hook, batch 1 only: on_step(caches, prompt + committed tokens), called by the engine after
    the prefill and after every step, with caches["target"].length == row.length."""

    @abstractmethod
    def options(self) -> dict:
        """The settings that define this decoder's behaviour (recorded in run outputs)."""

    def new_caches(self, batch: int, max_len: int, reuse: dict) -> dict:
        """Every cache the decoder needs, `batch` rows of `max_len` slots, by name; "target" is the
        model's (the engine keeps its length). `reuse`: the dict this returned last time (reuse its
        buffers when they fit: `model.new_cache(..., reuse=reuse.get(name))`)."""
        return {"target": self.model.new_cache(max_len, batch=batch, reuse=reuse.get("target"))}

    def begin(self, batch: int, config: GenerationConfig) -> None:
        """Called once per generate_batch call, after the caches: per-call state of B rows."""

    @abstractmethod
    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        """One prompt into batch-1 `caches` (reset, length 0); sets row.state; returns its Step
        (tokens: the first ones committed; fed: len(prompt); advance: the slots kept)."""

    @abstractmethod
    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        """ONE step over every slot of the B-row `caches` (None: an empty slot); row s is at offset
        rows[s].length. Returns each live row's Step (None for an empty slot). Reads row.length but
        never writes it, nor any cache's length for the target (the engine does both)."""

    def runners(self) -> list:
        """Its `compiled.Steps` (for compile-time accounting)."""
        return []

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
        # the caches are kept on the decoder between calls (their buffers are reused when they fit)
        held = decoder.__dict__.setdefault("_engine_caches", {})
        self.caches = held["rows"] = decoder.new_caches(self.B, need, held.get("rows", {}))
        self.scratch = None
        if self.B > 1:  # prefills run at batch 1 into these, then their row is copied into the slot
            self.scratch = held["scratch"] = decoder.new_caches(1, longest + decoder.step_rows + 2,
                                                                held.get("scratch", {}))
        self.target = self.caches.get("target") if self.B == 1 else None  # its length: row.length
        decoder.begin(self.B, config)
        self.rows: list[Row | None] = [None] * self.B
        self.results: list[Generation | None] = [None] * len(prompts)
        self.next_prompt = 0

    def compile_s(self) -> float:
        return sum(r.compile_s for r in self.dec.runners())

    def run(self) -> list[Generation]:
        dec, caches = self.dec, self.caches
        while True:
            for s in range(self.B):
                while self.rows[s] is None and self.next_prompt < len(self.prompts):
                    self._admit(s)
            rows = self.rows
            if not any(r is not None for r in rows):
                return self.results
            results = dec.step(rows, caches)
            for s, row in enumerate(rows):
                if row is None:
                    continue
                r = results[s]
                st = row.stats
                if r.forwards:
                    st.nfe += r.forwards
                    st.tokens_fed.append(r.fed)
                    if r.accepted is not None:
                        st.accepted_lengths.append(r.accepted)
                st.draft_forwards += r.draft_forwards
                row.length += r.advance
                if self.target is not None:
                    self.target.length = row.length
                if dec.on_step is not None and self.B == 1:
                    row.history += r.tokens
                    dec.on_step(caches, row.history)
                if row.stop.extend(r.tokens):
                    self._finish(s)

    def _admit(self, slot: int) -> None:
        i = self.next_prompt
        self.next_prompt += 1
        t0 = self.timer.now()
        dec = self.dec
        row = Row(i, slot, StopChecker(self.config, dec.tokenizer), DecodeStats(),
                  make_generator(self.config.sampling, self.dev), t0, self.compile_s())
        caches = self.caches if self.B == 1 else self.scratch
        for c in caches.values():
            c.reset()
        r = dec.prefill(row, self.prompts[i], caches)
        if self.B > 1:
            for name, src in caches.items():
                copy_row(self.caches[name], src, slot)
        st = row.stats
        st.nfe = st.prefill_forwards = r.forwards
        st.tokens_fed = list(r.fed) if isinstance(r.fed, list) else [r.fed]
        if r.accepted is not None:
            st.accepted_lengths.append(r.accepted)
        st.draft_forwards += r.draft_forwards
        row.length = r.advance
        if self.target is not None:
            self.target.length = row.length
        st.prefill_time_s = self.timer.now() - t0 - (self.compile_s() - row.compile0)
        self.rows[slot] = row
        if dec.on_step is not None and self.B == 1:
            row.history = self.prompts[i] + r.tokens
            dec.on_step(caches, row.history)
        if row.stop.extend(r.tokens):
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
