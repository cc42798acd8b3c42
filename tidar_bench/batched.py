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

Supported: `ar`, `tidar` (mode tidar, beta 1, any block size, max_blocks) and `eagle` (trees, chains,
sampling: a RowDecoder, `baselines/eagle.py`) and `bd` (block cache, with or
without token shift; each row denoises its own block with the decoder's rule), greedy only
(temperature 0). Per-row stats: nfe = forwards the row took part in (its prefill included),
tokens_fed = its own unpadded layout, wall_time_s = admission to last token (per-sequence latency,
including waiting inside batched steps), prefill_time_s = its prefill.

`speed_batch` is the paired batched benchmark behind `tidar-bench speed --batch-size` (output format:
`report.SPEED_BATCH_FORMAT`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .decoding import DecodeStats, Generation, GenerationConfig, StopChecker, Timer
from .engine import RowDecoder
from .errors import UserError
from .masks import TidarStepLayout, tidar_first_step, tidar_step


def supports_batch(decoder, options: dict | None = None) -> str | None:
    """None when `generate_batch` can run this decoder (a decoder instance, or just its name, with
    its full options when known: checked before anything is built), else why not (one line)."""
    name = decoder if isinstance(decoder, str) else getattr(decoder, "name", type(decoder).__name__)
    if name not in _RUNNERS:
        return f"batched decoding (--batch-size) supports {', '.join(sorted(_RUNNERS))}; not {name!r}"
    if isinstance(decoder, str):
        if options is None:
            return None
        o = options  # the factories' defaults where an option is absent
        lossless = o.get("mode", "tidar") == "tidar" and float(o.get("beta", 1.0)) == 1.0
        # the TiDAR authors' rule options (tidar.py): any of them set is not the exact rule
        lossless = lossless and o.get("rule", "exact") == "exact" and all(
            o.get(k) is None for k in ("first_token", "prefill", "ar_ratio", "accept", "draft_penalty", "t0_as_t1"))
        block_cache = bool(o.get("block_cache", True))
        separate = str(o.get("separate_commit", False)).lower() in ("1", "true", "yes", "on")
    else:
        lossless, block_cache = getattr(decoder, "lossless", True), getattr(decoder, "block_cache", True)
        separate = getattr(decoder, "separate_commit", False)
    if name == "tidar" and not lossless:
        return "batched tidar supports the lossless setting only (mode=tidar, beta=1, rule=exact, no authors' options)"
    if name == "bd" and not block_cache:
        return "batched bd needs the block cache (block_cache=True)"
    if name == "bd" and separate:
        return "batched bd merges each commit into the next block's step; separate_commit=true runs at batch 1"
    return None


def generate_batch(decoder, prompts: Sequence[Sequence[int]], config: GenerationConfig, batch_size: int,
                   on_done: Callable[[int, Generation], None] | None = None) -> list[Generation]:
    """Decode every prompt with `batch_size` sequences in flight; results in prompt order.
    `on_done(i, generation)` is called as each sequence finishes (progress, streaming)."""
    why = supports_batch(decoder)
    if why:
        raise UserError(why)
    if isinstance(decoder, RowDecoder):  # written over B rows (tidar_bench.engine): its own loop
        return decoder.generate_batch(prompts, config, batch_size, on_done)
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
        done = self.prefill(row, self.prompts[i], slot)
        _copy_row(self.cache, self.scratch, slot, row.length)
        row.stats.nfe = 1
        row.stats.prefill_time_s = self.timer.now() - t0
        self.rows[slot] = row
        if done:
            self._finish(slot)

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

    def prefill(self, row: _Row, prompt: list[int], slot: int) -> bool:
        """Prefill `prompt` at batch 1 into self.scratch (row.length slots are then copied into the
        slot's row), set the row's first token; True when it already stops."""
        raise NotImplementedError

    def step(self, active: list[int]) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- AR


def _copy_row(dst, src, slot: int, n: int) -> None:
    """KV slots [0, n) of row 0 of cache `src` into row `slot` of cache `dst`."""
    for d_layers, s_layers in ((dst.k, src.k), (dst.v, src.v)):
        for d, s_ in zip(d_layers, s_layers):
            d[slot, :, :n] = s_[0, :, :n]


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

    def prefill(self, row: _Row, prompt: list[int], slot: int) -> bool:
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


# ----------------------------------------------------------------------------- EAGLE (chain)


# ----------------------------------------------------------------------------- block diffusion


@dataclass
class _BlockState:
    pending: list[int]  # tokens committed by the row's next forward (a finished block, or the prompt's full blocks)
    block: torch.Tensor  # [B] the block being denoised (mask ids where unknown)
    known: list[bool]
    emitted: int  # block positions already given to the stop checker
    step: int = 0  # denoising forwards spent on this block
    rgen: torch.Generator | None = None  # remasking=random: the row's own generator, seeded as batch 1
    commit: bool = False  # token shift: the next forward commits the finished block (an AR step)


class _BatchedBD(_Batched):
    """Block diffusion with the block-level KV cache (block_cache=True), greedy, with or without
    token shift. Per row: its committed length P (block-aligned), the block being denoised and which
    positions are known. A step feeds every row its own forward, block-causal at its aligned offset,
    padded to the step's longest: [finished block, if any | current block] (B or 2B tokens) to
    denoise, or with token shift the finished block alone to commit it (its last output is the next
    block's first token). Each row unmasks with the decoder's own rule (threshold / steps /
    sub_block), so it makes the choices it makes alone."""

    def __init__(self, decoder, *args):
        self.Bk = decoder.B
        self.step_rows = 3 * self.Bk
        super().__init__(decoder, *args)
        self.state: list[_BlockState | None] = [None] * self.B
        self._local: dict[int, torch.Tensor] = {}

    def _block_local(self, n: int) -> torch.Tensor:
        from .masks import block_causal

        if n not in self._local:
            self._local[n] = block_causal(n, self.Bk, 0, "cpu")  # == the step mask at a block-aligned offset
        return self._local[n]

    def _new_block(self, head: list[int]) -> tuple[torch.Tensor, list[bool]]:
        block = torch.full((self.Bk,), self.dec.mask_id, dtype=torch.long, device=self.dev)
        block[: len(head)] = torch.tensor(head, dtype=torch.long, device=self.dev)
        return block, [i < len(head) for i in range(self.Bk)]

    def prefill(self, row: _Row, prompt: list[int], slot: int) -> bool:
        """The decoder's first forward at batch 1: the prompt's full blocks (committed) + the first
        block (the prompt's tail as its known head), which also takes the block's first unmasking."""
        Bk, L = self.Bk, len(prompt)
        base = (L // Bk) * Bk
        block, known = self._new_block(prompt[base:])
        rgen = None
        if self.dec.remasking == "random":
            rgen = torch.Generator(device=self.dev).manual_seed(0)
        st = _BlockState(prompt[:base], block, known, L - base, 0, rgen)
        self.state[slot] = st
        self.scratch.reset()
        row.length = base  # the prompt's full blocks are committed; the rest of the scratch is dropped
        if self.dec.token_shift and base == L:  # AR step: the prompt's last output gives the first token
            logits = self.model(torch.tensor([prompt], device=self.dev), mask=self._block_local(L).to(self.dev),
                                cache=self.scratch, logits_index=slice(L - 1, L)).logits[0]
            row.stats.tokens_fed = [L]
            st.pending = []
            return self._committed(row, st, logits[-1])
        fed = torch.cat([torch.tensor(prompt[:base], dtype=torch.long, device=self.dev), block])
        logits = self.model(fed[None], mask=self._block_local(base + Bk).to(self.dev), cache=self.scratch,
                            logits_index=slice(base, base + Bk)).logits[0]
        row.stats.tokens_fed = [base + Bk]
        return self._after_forward(row, st, logits)

    def _committed(self, row: _Row, st: _BlockState, logits: torch.Tensor) -> bool:
        """Token shift: a block (or the prompt) was committed; its last output [V] is the first
        token of the next block."""
        logits[self.dec.mask_id] = float("-inf")
        tok = int(logits.argmax(-1))
        row.stats.accepted_lengths.append(1)
        st.block, st.known = self._new_block([tok])
        st.emitted, st.step, st.commit = 1, 0, False
        return row.stop.extend([tok])

    def _after_forward(self, row: _Row, st: _BlockState, logits: torch.Tensor) -> bool:
        """The row's pending tokens are committed; unmask its block; emit the newly known prefix;
        a finished block becomes the pending commit of the next forward. True when the row stops."""
        st.pending = []
        logits[:, self.dec.mask_id] = float("-inf")  # the mask token is never an output
        if self.dec.token_shift:  # output j-1 predicts position j (row 0 unused: always known)
            logits = torch.cat([logits[:1], logits[:-1]])
        idx = self.dec._unmask(logits, st.block, st.known, st.step, self.config.sampling, None, st.rgen)
        st.step += 1
        row.stats.accepted_lengths.append(len(idx))
        first_unknown = st.known.index(False) if not all(st.known) else self.Bk
        if first_unknown > st.emitted:
            if row.stop.extend(st.block[st.emitted : first_unknown].tolist()):
                return True
            st.emitted = first_unknown
        if all(st.known) and self.dec.token_shift:
            st.commit = True
        elif all(st.known):
            st.pending = st.block.tolist()
            st.block, st.known = self._new_block([])
            st.emitted, st.step = 0, 0
        return False

    def step(self, active: list[int]) -> None:
        B, Bk = self.B, self.Bk
        n = max(len(self.state[s].pending) + Bk for s in active)
        ids = torch.full((B, n), self.dec.mask_id, dtype=torch.long, device=self.dev)
        pos = torch.zeros(B, n, dtype=torch.long)
        local = torch.eye(n, dtype=torch.bool).repeat(B, 1, 1)  # padding tokens see only themselves
        rows = torch.zeros(B, Bk, dtype=torch.long)
        starts = [0] * B
        for s in active:
            st, P = self.state[s], self.rows[s].length
            p = len(st.pending)
            if p:
                ids[s, :p] = torch.tensor(st.pending, dtype=torch.long, device=self.dev)
            ids[s, p : p + Bk] = st.block
            pos[s] = torch.arange(P, P + n)
            local[s, : p + Bk, : p + Bk] = self._block_local(p + Bk)
            rows[s] = torch.arange(p, p + Bk)
            starts[s] = P
        logits = self.forward(ids, pos.to(self.dev), local.to(self.dev), starts, rows.to(self.dev))
        for s in active:
            row, st = self.rows[s], self.state[s]
            row.stats.nfe += 1
            row.stats.tokens_fed.append(len(st.pending) + Bk)
            if st.commit:  # the fed block is final: keep its KV, its last output starts the next block
                row.length += Bk
                done = self._committed(row, st, logits[s, -1])
            else:
                row.length += len(st.pending)
                done = self._after_forward(row, st, logits[s])
            if done:
                self._finish(s)


_RUNNERS = {"ar": None, "tidar": _BatchedTidar, "eagle": None, "bd": _BatchedBD}


# ----------------------------------------------------------------------------- the batched speed benchmark


def speed_batch(decoders: dict, prompts: list[list[int]], config: GenerationConfig, batch_sizes: list[int],
                rounds: int = 1, progress: Callable[[], None] | None = None) -> dict:
    """Paired batched throughput: at each batch size, `rounds` times, every decoder in turn decodes
    ALL prompts with that many sequences in flight (after one warm-up call on the first B prompts),
    in forward order on even rounds and reverse order on odd ones (ABBA: a linear drift of the
    machine's speed cancels over two rounds); the first decoder is the reference. Returns {"reference", "batch_sizes", "batch"} in
    report.SPEED_BATCH_FORMAT: per batch size and decoder, tokens/s over the batch (all new tokens /
    decode wall time, prefills included), T/NFE, per-sequence latency quartiles, speedup vs the
    reference at the same batch size, the per-round paired ratios, and for lossless decoders the
    prompts whose tokens differ from the reference's at the first batch size."""
    from .profiling import quartiles

    names = list(decoders)
    ref_name = names[0]
    dev = decoders[ref_name].model.device
    timer = Timer(dev)
    ref_tokens = None
    section = {}
    for B in batch_sizes:
        for dec in decoders.values():
            generate_batch(dec, prompts[:B], config, B)  # warm-up: caches allocated, kernels loaded
        acc = {n: {"tokens": 0, "decode_s": 0.0, "nfe": 0, "lat": [], "tps": [], "mismatch": 0} for n in names}
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n, dec in ((n, decoders[n]) for n in order):
                t0 = timer.now()
                gens = generate_batch(dec, prompts, config, B)
                dt = timer.now() - t0
                a = acc[n]
                toks = sum(len(g.tokens) for g in gens)
                a["tokens"] += toks
                a["decode_s"] += dt
                a["nfe"] += sum(g.stats.nfe for g in gens)
                a["lat"] += [g.stats.wall_time_s for g in gens]
                a["tps"].append(toks / dt)
                if ref_tokens is None and n == ref_name:
                    ref_tokens = [g.tokens for g in gens]  # the reference at the first batch size
                if dec.lossless:
                    a["mismatch"] = max(a["mismatch"], sum(g.tokens != r for g, r in zip(gens, ref_tokens)))
                if progress is not None:
                    progress()
        ref = acc[ref_name]
        cells = {}
        for n, dec in decoders.items():
            a = acc[n]
            med, q1, q3 = quartiles(a["lat"])
            tps = a["tokens"] / a["decode_s"]
            cells[n] = {"tokens": a["tokens"], "decode_s": a["decode_s"], "nfe": a["nfe"], "tokens_per_s": tps,
                        "tokens_per_nfe": a["tokens"] / a["nfe"] if a["nfe"] else 0.0,
                        "per_sequence_latency_s": {"median": med, "q1": q1, "q3": q3},
                        "speedup_vs_reference": tps / (ref["tokens"] / ref["decode_s"]),
                        "paired_ratios": [x / y for x, y in zip(a["tps"], ref["tps"])],
                        "lossless_mismatches": a["mismatch"] if dec.lossless else None}
        section[str(B)] = cells
    return {"reference": ref_name, "batch_sizes": list(batch_sizes), "batch": section}
