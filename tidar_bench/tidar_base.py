"""What the two TiDAR decoders share (`tidar.TidarDecoder`: drafts + AR verification;
`tidar_diffusion.TidarDiffusionDecoder`: pure block diffusion of the same checkpoint): their
options (`TidarOptions`), a step's device tensors (`StepShape`, built from a `masks.TidarStepLayout`),
the prompt + one block prefill, and one forward over B rows, each at its own offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compiled import steps_for
from .engine import Row, RowDecoder, inert_local
from .masks import TidarStepLayout, tidar_step
from .tidar_options import TidarOptions


@dataclass
class StepShape:
    """Everything about a step that depends only on its layout, not on the cache length P: cached
    once per shape and shifted by P each step."""

    n: int  # tokens fed
    local_mask: torch.Tensor  # [n, n] the fed-to-fed part of the mask (the cache part is all True)
    rel_positions: torch.Tensor  # [n] positions relative to P
    logits_index: torch.Tensor  # which fed rows get logits
    causal_rows: int  # logits rows of the causal segment (m + 1; k in the padded layout)


class TidarBase(RowDecoder):
    """Options, runner, shape cache, `options()`, the prefill forward and the B-row forward."""

    name = "tidar"
    config_source: str | None = None  # where mask_token_id and block_size came from (set by the factory)
    convention_check: dict | None = None  # `checkpoint.convention_check` of a preset checkpoint

    def __init__(self, model, tokenizer=None, **options):
        """`options`: `TidarOptions` fields (checked there, against the model's vocabulary)."""
        self.o = o = TidarOptions(**options, vocab_size=model.config.vocab_size)
        self.model, self.tokenizer = model, tokenizer
        self.mask_id, self.k = o.mask_token_id, o.block_size
        self._shapes: dict[tuple, StepShape] = {}
        self.runner = steps_for(model, model, o.compile)

    @property
    def lossless(self) -> bool:
        return self.o.lossless

    def options(self) -> dict:
        o = self.o
        return {"mode": o.mode, "block_size": o.block_size, "mask_token_id": o.mask_token_id, "lossless": self.lossless,
                "compile": self.runner.compiled, "config_source": self.config_source,
                "convention_check": self.convention_check, **o.report()}

    def runners(self) -> list:
        return [self.runner]

    def _layout_shape(self, layout: TidarStepLayout, rows: list[int], causal_rows: int) -> StepShape:
        dev = self.model.device
        return StepShape(layout.n_fed, tidar_step(layout, dev), layout.positions(dev),
                         torch.tensor(rows, dtype=torch.long, device=dev), causal_rows)

    def _buffers(self, batch: int, fed: int, n: int) -> None:
        """The step buffers of B rows: ids [B, fed] (mask ids), and at B > 1 the padded step's
        per-row positions and local masks [B, n(, n)] (an empty slot's tokens see only themselves)."""
        dev = self.model.device
        self._ids = torch.full((batch, fed), self.mask_id, device=dev)
        if batch > 1:
            self._pos = torch.zeros(batch, n, dtype=torch.long, device=dev)
            self._local = inert_local(n, batch, dev)
            self._eye = self._local[0].clone()

    def _prefill(self, cache, prompt: list[int], shape: StepShape) -> torch.Tensor:
        """The first forward (variable length, so eager, at batch 1): prompt + one block."""
        ids = torch.tensor([prompt + [self.mask_id] * self.k], device=self.model.device)
        return self.model(ids, shape.rel_positions, shape.local_mask, cache, logits_index=shape.logits_index).logits[0]

    def _forward(self, cache, rows: list[Row | None], ids: torch.Tensor, shapes: dict[int, StepShape],
                 shape: StepShape) -> torch.Tensor:
        """One step of `ids` [B, n] over every row, row s with its own shapes[s] at its own offset
        rows[s].length (mask: [all cached | local [n, n], or per row [B, n, n] at B > 1, empty slots
        inert]; eager or compiled, see tidar_bench/compiled.py). `shape`: the rows' common n and
        logits rows. Logits [B, rows, V]."""
        if len(rows) == 1:
            pos, local = shapes[0].rel_positions + rows[0].length, shapes[0].local_mask
        else:
            pos, local = self._pos, self._local
            for s in range(len(rows)):
                if s in shapes:
                    torch.add(shapes[s].rel_positions, rows[s].length, out=pos[s])
                    local[s].copy_(shapes[s].local_mask)
                else:
                    local[s].copy_(self._eye)
        return self.runner(ids, pos, cache=cache, local_mask=local, logits_index=shape.logits_index,
                           starts=[r.length if r is not None else 0 for r in rows]).logits
