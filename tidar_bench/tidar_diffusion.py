"""`tidar(mode=diffusion)`: pure block diffusion of a TiDAR checkpoint, no AR verification (LOSSY).

Block by block, iterative denoising with the diffusion rows only. Each block of k masks (seeing
every committed token before it, as in training) takes `steps` forwards; each unmasks the most
confident still-masked positions, ceil(remaining / steps left) of them: `bd`'s fixed-steps rule
(`unmasking.unmask_top`, `bd`'s rule with `remasking=low_confidence`). The forward that starts block
b+1 also writes block b's KV causally (TiDAR's one-step layout with m = k-1 and one block). Per row, a
step is one of those forwards; a finished block is committed to the output at once.

Built by the `tidar` factory (and by `TidarDecoder(..., mode="diffusion")`); same options and
options() as before the split. Written over B rows (`tidar_bench.engine`): at B > 1 a denoising
forward is padded to the commit step's 2k, so rows stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .unmasking import unmask_count, unmask_top
from .decoding import GenerationConfig
from .engine import Row, Step
from .masks import TidarStepLayout, tidar_first_step
from .tidar_base import StepShape, TidarBase


@dataclass
class _DiffusionRow:
    block: torch.Tensor  # [k] the block being denoised (mask ids where unknown)
    masked: torch.Tensor  # [k] bool
    remaining: int
    it: int = 0  # denoising forwards spent on this block
    commit: bool = False  # finished: the next forward commits it and starts the next block


class TidarDiffusionDecoder(TidarBase):
    lossless = False

    def __init__(self, model, tokenizer=None, **options):
        super().__init__(model, tokenizer, **{"mode": "diffusion", **options})
        if self.o.mode != "diffusion":
            raise ValueError(f"TidarDiffusionDecoder decodes mode=diffusion, not {self.o.mode!r}")
        self.steps = self.o.steps
        self.step_rows = self.k * (self.k + 1)  # the same cache headroom as mode=tidar

    def begin(self, batch: int, config: GenerationConfig) -> None:
        """Per-call state: the sampling rule, and the step buffers of B rows (2k wide: at B > 1 a
        denoising block is padded to the commit step's width)."""
        self._sp = config.sampling
        self._padded = batch > 1
        self._buffers(batch, 2 * self.k, 2 * self.k)

    def _block_shape(self, layout: TidarStepLayout) -> StepShape:
        """Logits of every row of the layout's (single) block."""
        s = layout.block_start(0)
        return self._layout_shape(layout, list(range(s, s + self.k)), layout.n_causal)

    def _shapes_now(self) -> tuple[StepShape, StepShape]:
        """(commit, denoise) layouts. Commit: [block b | k masks] (m = k-1, one block): block b's KV
        is written causally and block b+1 starts. Denoise: the block alone, seeing the cache and all
        of itself; at B > 1 padded to the commit step's 2k as [k inert tokens | block], so both have
        their block's logits in rows k..2k-1 and rows stack (the pads' KV lands after the row's
        committed length and is never kept)."""
        key = ("diffusion", self._padded)
        if key not in self._shapes:
            k, dev = self.k, self.model.device
            commit = self._block_shape(TidarStepLayout(0, k - 1, k, (k - 1,)))
            if self._padded:
                local = torch.eye(2 * k, dtype=torch.bool, device=dev)
                local[k:, k:] = True
                pos = torch.arange(k, device=dev).repeat(2)
                denoise = StepShape(2 * k, local, pos, commit.logits_index, k)
            else:
                denoise = StepShape(k, torch.ones(k, k, dtype=torch.bool, device=dev), torch.arange(k, device=dev),
                                    torch.arange(k, device=dev), 0)
            self._shapes[key] = (commit, denoise)
        return self._shapes[key]

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        """Prompt + the first block of k masks in one forward; its KV is dropped after the prompt."""
        k, dev, L = self.k, self.model.device, len(prompt)
        first = tidar_first_step(L, k, dev)
        logits = self._prefill(caches["target"], prompt, self._block_shape(first))
        row.state = _DiffusionRow(torch.full((k,), self.mask_id, device=dev), torch.ones(k, dtype=torch.bool, device=dev),
                                  k)
        # the prefill's own unmasking is not a decoding step: no accepted_lengths entry
        return Step(self._denoised(row, logits)[0], fed=first.n_fed, advance=L)

    def _denoised(self, row: Row, logits: torch.Tensor) -> tuple[list[int], int]:
        """Unmask this forward's share of the row's block (`bd`'s rule): (its output: the block once
        finished, the number of positions unmasked)."""
        st = row.state
        u = unmask_count(st.remaining, self.steps, st.it)
        idx = unmask_top(logits, st.block, st.masked, u, self._sp, row.gen)
        st.masked[idx] = False
        st.remaining -= u
        st.it += 1
        if st.it < self.steps:
            return [], u
        st.commit = True
        return st.block.tolist(), u

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        k, B = self.k, len(rows)
        commit, denoise = self._shapes_now()
        ids = self._ids
        plans = {}
        for s, row in enumerate(rows):
            if row is None:
                continue
            st = row.state
            at = 0 if st.commit or B == 1 else k  # where the block goes among the fed tokens
            ids[s, at : at + k] = st.block
            ids[s, k - at : 2 * k - at] = self.mask_id
            plans[s] = commit if st.commit else denoise
        sh = plans[0] if B == 1 else commit
        logits = self._forward(caches["target"], rows, ids[:, : sh.n], plans, sh)
        out: list[Step | None] = [None] * B
        for s, psh in plans.items():
            row, st = rows[s], rows[s].state
            kept = k if st.commit else 0  # committing: block b's KV kept; block b+1 starts from these logits
            if st.commit:
                st.block.fill_(self.mask_id)
                st.masked.fill_(True)
                st.remaining, st.it, st.commit = k, 0, False
            tokens, u = self._denoised(row, logits[s])
            out[s] = Step(tokens, fed=psh.n, accepted=u, advance=kept)
        return out
