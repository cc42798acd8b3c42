"""Batched decoding beyond batch 1: B sequences per forward, ragged acceptance, continuous refill.

`generate_batch(decoder, prompts, config, batch_size)` decodes every prompt with B slots in flight:

- Each slot (a row of one [B, ...] KV cache) holds one sequence with its own committed length,
  positions and mask: a step feeds every row its own layout, padded to the longest row of the step,
  through the model's static-shape forward (`Transformer.forward(..., start=[B] per-row offsets)`:
  row b's fed KV is written at start[b] + arange(n) and row b attends to every slot before start[b]
  plus its fed tokens as its own local mask says; padding tokens see only themselves and are seen by
  nobody). After verification each row keeps its own number of tokens: its offset advances by that,
  so rejected drafts, pre-draft blocks and padding are simply overwritten by the row's next step.
- A row that stops (stop id, stop string or max_new_tokens, the shared `StopChecker`) hands back its
  Generation and its slot takes the next prompt right away (prefilled alone at batch 1 into a scratch
  cache with the decoder's own prefill layout, then copied into the slot), so the other rows never
  wait and never change: every row computes exactly what it would alone, up to float rounding.
- Lossless decoders stay lossless per row: greedy verification per row against that row's AR rows.

Supported: `ar` and `tidar` (mode tidar, beta 1, any block size, max_blocks), greedy only
(temperature 0). Per-row stats: nfe = forwards the row took part in (its prefill included),
tokens_fed = its own unpadded layout, wall_time_s = admission to last token (per-sequence latency,
including waiting inside batched steps), prefill_time_s = its prefill.

`speed_batch` is the paired batched benchmark behind `tidar-bench speed --batch-size` (output format:
`report.SPEED_BATCH_FORMAT`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .decoding import DecodeStats, Generation, GenerationConfig, StopChecker, Timer
from .errors import UserError
from .masks import TidarStepLayout, tidar_first_step, tidar_step


def supports_batch(decoder) -> str | None:
    """None when `generate_batch` can run this decoder, else why not (one line)."""
    name = getattr(decoder, "name", type(decoder).__name__)
    if name not in _RUNNERS:
        return f"batched decoding (--batch-size > 1) supports {', '.join(sorted(_RUNNERS))}; not {name!r}"
    if name == "tidar" and not decoder.lossless:
        return "batched tidar supports the lossless setting only (mode=tidar, beta=1)"
    return None


def generate_batch(decoder, prompts: Sequence[Sequence[int]], config: GenerationConfig, batch_size: int,
                   on_done: Callable[[int, Generation], None] | None = None) -> list[Generation]:
    """Decode every prompt with `batch_size` sequences in flight; results in prompt order.
    `on_done(i, generation)` is called as each sequence finishes (progress, streaming)."""
    why = supports_batch(decoder)
    if why:
        raise UserError(why)
    if not config.sampling.greedy:
        raise UserError("batched decoding is greedy only (temperature 0)")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise UserError("batched decoding needs non-empty prompts")
    if not prompts:
        return []
    return _RUNNERS[decoder.name](decoder, [list(p) for p in prompts], config, batch_size, on_done).run()


# ----------------------------------------------------------------------------- the slot machinery


@dataclass
class _Row:
    index: int  # which prompt
    stop: StopChecker
    stats: DecodeStats
    t0: float
    length: int  # cache slots of this row holding committed KV
    last: int  # newest committed token (its KV is computed by the next step)
    drafts: list[int] = field(default_factory=list)
    conf: torch.Tensor | None = None  # diffusion probability of each draft (tidar max_blocks)


class _Batched:
    """Slots, admission and refill, the batched forward; subclasses give the prefill and the step."""

    step_rows = 1  # the most tokens one row feeds in a step

    def __init__(self, decoder, prompts: list[list[int]], config: GenerationConfig, batch_size: int, on_done):
        self.dec, self.model = decoder, decoder.model
        self.tok = getattr(decoder, "tokenizer", None)
        self.prompts, self.config, self.on_done = prompts, config, on_done
        self.B = min(batch_size, len(prompts))
        self.dev = self.model.device
        self.timer = Timer(self.dev)
        longest = max(len(p) for p in prompts)
        need = longest + config.max_new_tokens + self.step_rows + 1
        cache = getattr(decoder, "_batch_cache", None)
        self.cache = self.model.new_cache(need, batch=self.B, reuse=cache)
        self.scratch = self.model.new_cache(longest + self.step_rows + 1, reuse=getattr(decoder, "_batch_scratch", None))
        decoder._batch_cache, decoder._batch_scratch = self.cache, self.scratch
        self.rows: list[_Row | None] = [None] * self.B
        self.results: list[Generation | None] = [None] * len(prompts)
        self.next_prompt = 0
        self.last_layer = self.model.config.num_hidden_layers - 1

    def run(self) -> list[Generation]:
        while True:
            for s in range(self.B):
                while self.rows[s] is None and self.next_prompt < len(self.prompts):
                    self._admit(s)
            active = [s for s in range(self.B) if self.rows[s] is not None]
            if not active:
                return self.results
            self.step(active)

    def _admit(self, slot: int) -> None:
        i = self.next_prompt
        self.next_prompt += 1
        t0 = self.timer.now()
        row = _Row(i, StopChecker(self.config, self.tok), DecodeStats(), t0, len(self.prompts[i]), -1)
        done = self.prefill(row, self.prompts[i])
        self._copy_scratch(slot, row.length)
        row.stats.nfe = 1
        row.stats.prefill_time_s = self.timer.now() - t0
        self.rows[slot] = row
        if done:
            self._finish(slot)

    def _copy_scratch(self, slot: int, n: int) -> None:
        """The prefilled prompt's KV (scratch row 0, slots [0, n)) into row `slot` of the batch cache."""
        for dst, src in ((self.cache.k, self.scratch.k), (self.cache.v, self.scratch.v)):
            for d, s_ in zip(dst, src):
                d[slot, :, :n] = s_[0, :, :n]

    def _finish(self, slot: int) -> None:
        row = self.rows[slot]
        row.stats.wall_time_s = self.timer.now() - row.t0
        g = row.stop.result(row.stats)
        self.results[row.index] = g
        self.rows[slot] = None
        if self.on_done is not None:
            self.on_done(row.index, g)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, local: torch.Tensor | None, starts: list[int],
                rows: torch.Tensor | None) -> torch.Tensor:
        """One static-shape forward over the batch cache: ids/pos [B, n], local [B, n, n] (None:
        causal), row b written at starts[b]; logits [B, r, V] of the fed rows `rows` [B, r] (None: all)."""
        start = torch.tensor(starts, dtype=torch.long, device=self.dev)
        if rows is None:
            return self.model(ids, pos, local, self.cache, start=start).logits
        out = self.model(ids, pos, local, self.cache, start=start, hidden_layers=(self.last_layer,),
                         return_logits=False)
        h = out.hidden_states[self.last_layer]
        h = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
        return self.model.lm_head(self.model.model.norm(h)).float()

    def prefill(self, row: _Row, prompt: list[int]) -> bool:
        raise NotImplementedError

    def step(self, active: list[int]) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- AR


class _BatchedAR(_Batched):
    def prefill(self, row: _Row, prompt: list[int]) -> bool:
        self.scratch.reset()
        ids = torch.tensor([prompt], device=self.dev)
        logits = self.model(ids, cache=self.scratch, logits_index=slice(-1, None)).logits[0, -1]
        row.stats.tokens_fed = [len(prompt)]
        row.last = int(logits.argmax(-1))
        return row.stop.extend([row.last])

    def step(self, active: list[int]) -> None:
        B = self.B
        ids = torch.zeros(B, 1, dtype=torch.long)
        starts = [0] * B
        for s in active:
            ids[s, 0] = self.rows[s].last
            starts[s] = self.rows[s].length
        pos = torch.tensor(starts, dtype=torch.long)[:, None]
        nxt = self.forward(ids.to(self.dev), pos.to(self.dev), None, starts, None)[:, -1].argmax(-1).tolist()
        for s in active:
            row = self.rows[s]
            row.length += 1
            row.stats.nfe += 1
            row.stats.tokens_fed.append(1)
            row.stats.accepted_lengths.append(1)
            row.last = nxt[s]
            if row.stop.extend([row.last]):
                self._finish(s)


# ----------------------------------------------------------------------------- TiDAR


@dataclass
class _Layout:
    """One row's step: n fed tokens, local mask [n, n], positions relative to the row's length,
    the fed rows that need logits (AR rows, then offsets 1..k-1 of every block)."""

    n: int
    local: torch.Tensor
    rel_pos: torch.Tensor
    logits_rows: list[int]


class _BatchedTidar(_Batched):
    def __init__(self, decoder, *args):
        self.k = decoder.k
        self.step_rows = self.k * (self.k + 1)
        super().__init__(decoder, *args)
        self._layouts: dict[tuple, _Layout] = {}

    def _layout(self, m: int, outcomes: tuple[int, ...]) -> _Layout:
        key = (m, outcomes)
        if key not in self._layouts:
            lay = TidarStepLayout(0, m, self.k, outcomes)
            rows = list(range(lay.n_causal))
            for b in range(len(outcomes)):
                rows += range(lay.block_start(b) + 1, lay.block_start(b) + self.k)
            self._layouts[key] = _Layout(lay.n_fed, tidar_step(lay, "cpu"), lay.positions("cpu"), rows)
        return self._layouts[key]

    def prefill(self, row: _Row, prompt: list[int]) -> bool:
        """The decoder's own prefill layout, at batch 1: prompt causal + one pre-draft block at L."""
        k, L = self.k, len(prompt)
        first = tidar_first_step(L, k, self.dev)
        self.scratch.reset()
        ids = torch.tensor([prompt + [self.dec.mask_id] * k], device=self.dev)
        rows = torch.tensor([L - 1, *range(L + 1, L + k)], device=self.dev)
        logits = self.model(ids, first.positions(self.dev), tidar_step(first, self.dev), self.scratch,
                            logits_index=rows).logits[0]
        row.stats.tokens_fed = [first.n_fed]
        first_tok, *drafts = logits.argmax(-1).tolist()
        row.last, row.drafts, row.conf = first_tok, drafts, self._conf(logits[1:])
        return row.stop.extend([row.last])

    def _conf(self, block_logits: torch.Tensor) -> torch.Tensor | None:
        """Each draft's diffusion probability: only max_blocks ranks outcomes by it."""
        return block_logits.softmax(-1).amax(-1).cpu() if self.dec.max_blocks is not None else None

    def step(self, active: list[int]) -> None:
        B, mask_id = self.B, self.dec.mask_id
        plan = {}
        for s in active:
            row = self.rows[s]
            m = len(row.drafts)
            outcomes = self.dec._outcomes(m, row.conf)
            plan[s] = (m, outcomes, self._layout(m, outcomes))
        n = max(lay.n for _, _, lay in plan.values())
        r = max(len(lay.logits_rows) for _, _, lay in plan.values())
        ids = torch.full((B, n), mask_id, dtype=torch.long)
        pos = torch.zeros(B, n, dtype=torch.long)
        local = torch.eye(n, dtype=torch.bool).repeat(B, 1, 1)  # padding tokens see only themselves
        rows = torch.zeros(B, r, dtype=torch.long)
        starts = [0] * B
        for s, (m, outcomes, lay) in plan.items():
            row = self.rows[s]
            ids[s, 0] = row.last
            ids[s, 1 : 1 + m] = torch.tensor(row.drafts, dtype=torch.long)
            pos[s, : lay.n] = lay.rel_pos + row.length
            pos[s, lay.n :] = row.length + lay.n
            local[s, : lay.n, : lay.n] = lay.local
            rows[s, : len(lay.logits_rows)] = torch.tensor(lay.logits_rows)
            starts[s] = row.length
        logits = self.forward(ids.to(self.dev), pos.to(self.dev), local.to(self.dev), starts, rows.to(self.dev))
        target = logits.argmax(-1).tolist()  # one host sync for the whole batch
        for s, (m, outcomes, lay) in plan.items():
            row = self.rows[s]
            ar = target[s][: m + 1]
            acc = 0
            while acc < m and row.drafts[acc] == ar[acc]:
                acc += 1
            committed = row.drafts[:acc] + [ar[acc]]
            row.stats.nfe += 1
            row.stats.tokens_fed.append(lay.n)
            row.stats.accepted_lengths.append(acc + 1)
            row.length += acc + 1  # x + accepted drafts; the new token's KV comes with the next step
            row.last = ar[acc]
            if row.stop.extend(committed):
                self._finish(s)
            elif acc in outcomes:  # block acc starts at the new token's position: its offsets 1..k-1
                lo = m + 1 + outcomes.index(acc) * (self.k - 1)
                row.drafts = target[s][lo : lo + self.k - 1]
                row.conf = self._conf(logits[s, lo : lo + self.k - 1])
            else:  # no block for this outcome (max_blocks): the next step verifies nothing
                row.drafts, row.conf = [], None


_RUNNERS = {"ar": _BatchedAR, "tidar": _BatchedTidar}
