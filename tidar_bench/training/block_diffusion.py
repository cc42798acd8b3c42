"""Block-diffusion training objective (BD3-LM layout), continued from an AR checkpoint.

Each training sequence x_0 [S] is split into blocks of B tokens. Every block draws its own noise
level t ~ U(0, 1); each of its tokens is replaced by the mask token with probability
p = (1 - eps) * t + eps. The model sees [x_t | x_0] (2S tokens, positions 0..S-1 twice) under
`masks.block_diffusion_training`: a noised block attends bidirectionally to itself and to the clean
blocks before it; clean tokens attend block-causally. Cross-entropy is taken only at masked
positions (optionally weighted by 1/t, the ELBO weighting of masked diffusion).

Two prediction conventions (stored in `bd_config.json` so the decoder matches the training):
- token_shift = False (default, BD3-LM): the output at a masked position predicts the token at
  that position.
- token_shift = True (Fast-dLLM v2, AR-compatible): the output at position i predicts token i+1,
  so the logits keep the AR meaning. The first token of each block is never masked here: at decoding
  it is produced AR-style from the previous (committed) block's last output, so its loss would train
  nothing the decoder uses.

`complementary=True` adds, for every sequence, the copy masked at exactly the other positions
(Fast-dLLM v2's complementary masks: every token is supervised once per sequence; doubles the batch).

Packed rows with documents (`--doc-attention`): attention stays within each document and blocks
(and positions) restart at each document's start (`masks.block_diffusion_mod`); each such block
draws its own noise level. With `keep` (loss_on="completion") only kept tokens are ever masked, so
prompts stay clean context and carry no loss; inv_t averages over the kept tokens.

A checkpoint saved by this objective = config.json + model.safetensors (+ tokenizer files) +
`bd_config.json` {mask_token_id, block_size, token_shift}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import SideConfig
from ..errors import UserError
from ..masks import block_diffusion_mod, block_diffusion_training, doc_positions
from .data import unpack
from .masking import attention_mask

BD_CONFIG = "bd_config.json"
LOSS_WEIGHTINGS = ("none", "inv_t")


@dataclass
class BDConfig(SideConfig):
    mask_token_id: int
    block_size: int = 32
    token_shift: bool = False

    FILE: ClassVar[str] = BD_CONFIG
    KIND: ClassVar[str] = "block-diffusion"
    HOW: ClassVar[str] = "train one with `tidar-bench train block-diffusion`"


class BlockDiffusionObjective:
    """The `Objective` of the shared training loop for block diffusion (see the module docstring).

    model: our Transformer (trainable); tokenizer: saved beside the checkpoint (may be None).
    mask_token_id: None = the tokenizer's mask token, added to the vocabulary when absent
    (`training.data.add_mask_token`)."""

    name = "block_diffusion"
    mask_kind = "dense"  # or "block": FlexAttention block masks (long context, `masking.attention_mask`)

    def __init__(self, model: nn.Module, tokenizer=None, *, block_size: int = 32, eps: float = 1e-3,
                 loss_weighting: str = "none", token_shift: bool = False, complementary: bool = False,
                 mask_token_id: int | None = None):
        if block_size < 1 or (token_shift and block_size < 2):
            raise UserError(f"block_size must be >= {2 if token_shift else 1}, got {block_size}")
        if not 0.0 <= eps < 1.0:
            raise UserError(f"eps must be in [0, 1), got {eps}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise UserError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_weighting!r}")
        if mask_token_id is None:
            mask_token_id = _mask_token(model, tokenizer)
        if not 0 <= mask_token_id < model.config.vocab_size:
            raise UserError(f"mask_token_id {mask_token_id} outside the vocabulary [0, {model.config.vocab_size})")
        self.model = model
        self.tokenizer = tokenizer
        self.config = BDConfig(mask_token_id=mask_token_id, block_size=block_size, token_shift=token_shift)
        self.eps = eps
        self.loss_weighting = loss_weighting
        self.complementary = complementary
        self._masks: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, base: str | Path, *, dtype: str = "float32", device: str = "auto",
                        **kwargs) -> "BlockDiffusionObjective":
        """Continue from an AR checkpoint directory (weights + tokenizer)."""
        from ..model import load_model
        from ..registry import load_tokenizer

        model = load_model(base, dtype, device)
        model.requires_grad_(True)
        model.train()
        return cls(model, load_tokenizer(base), **kwargs)

    def module(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------------- noise

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None, doc: torch.Tensor | None = None,
              keep: torch.Tensor | None = None):
        """Per-block masking of x0 [b, S] -> (x_t, masked [b, S] bool, p_mask [b, S] float); blocks
        restart at each document of `doc`; only `keep` tokens are masked."""
        b, S = x0.shape
        B, dev = self.config.block_size, x0.device
        n_blocks = -(-S // B)
        if doc is None:
            t = torch.rand(b, n_blocks, device=dev, generator=generator)
            p = ((1.0 - self.eps) * t + self.eps).repeat_interleave(B, dim=1)[:, :S]
            head = torch.arange(S, device=dev) % B == 0
        else:
            head = doc_positions(doc) % B == 0
            t = torch.rand(b, S, device=dev, generator=generator)  # one level per block: its head's draw
            p = (1.0 - self.eps) * t.gather(1, head.long().cumsum(1) - 1) + self.eps
        masked = torch.rand(b, S, device=dev, generator=generator) < p
        if self.config.token_shift:
            masked &= ~head  # block heads come from the AR step at decoding
        if keep is not None:
            masked &= keep
        return x0.masked_fill(masked, self.config.mask_token_id), masked, p

    def _train_mask(self, S: int, device, doc: torch.Tensor | None = None, batch: int = 1):
        if doc is None and self.mask_kind == "dense":
            key = (S, str(device))
            if key not in self._masks:
                self._masks[key] = block_diffusion_training(S, self.config.block_size, device)
            return self._masks[key]
        doc = doc if doc is not None else torch.zeros(batch, S, dtype=torch.long, device=device)
        mod = block_diffusion_mod(doc, doc_positions(doc), self.config.block_size)
        return attention_mask(mod, doc.shape[0], 2 * S, 2 * S, device, self.mask_kind)

    # ------------------------------------------------------------------------- loss

    def loss(self, trainable: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        batch, doc, keep = unpack(batch)
        x_t, masked, p = self.noise(batch, doc=doc, keep=keep)
        if self.complementary:  # the same sequences masked at exactly the other positions
            other = ~masked
            if self.config.token_shift:
                pos = doc_positions(doc) if doc is not None else torch.arange(batch.shape[1], device=batch.device)
                other &= pos % self.config.block_size != 0
            if keep is not None:
                other &= keep
            x_t = torch.cat([x_t, batch.masked_fill(other, self.config.mask_token_id)])
            masked, p, batch = torch.cat([masked, other]), torch.cat([p, 1.0 - p]), torch.cat([batch, batch])
            doc = None if doc is None else torch.cat([doc, doc])
            keep = None if keep is None else torch.cat([keep, keep])
        return self.masked_loss(trainable, batch, x_t, masked, p, doc, keep)

    def masked_loss(self, trainable: nn.Module, x0: torch.Tensor, x_t: torch.Tensor, masked: torch.Tensor,
                    p: torch.Tensor, doc: torch.Tensor | None = None,
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the noised copy's predictions at `masked` positions of x0 [b, S]
        (documents `doc`: see the module docstring; `keep`: the supervisable tokens, for inv_t)."""
        b, S = x0.shape
        pos = torch.arange(S, device=x0.device).repeat(2) if doc is None else doc_positions(doc).repeat(1, 2)
        ids = torch.cat([x_t, x0], dim=1)
        logits = trainable(ids, pos, self._train_mask(S, x0.device, doc, b), logits_index=slice(0, S)).logits
        if self.config.token_shift:  # output i predicts token i+1; heads (i % B == 0) are never masked
            logits, x0, masked, p = logits[:, :-1], x0[:, 1:], masked[:, 1:], p[:, 1:]
            keep = None if keep is None else keep[:, 1:]
        n_sup = x0.numel() if keep is None else int(keep.sum())
        ce = F.cross_entropy(logits[masked], x0[masked], reduction="none")
        n = int(masked.sum())
        if self.loss_weighting == "inv_t":  # ELBO weight 1/p_mask, averaged over all supervisable tokens
            loss = (ce / p[masked].clamp_min(self.eps or 1e-6)).sum() / max(n_sup, 1)
        else:
            loss = ce.sum() / max(n, 1)
        return loss, {"masked_frac": n / x0.numel(), "masked_ce": float(ce.detach().mean()) if n else 0.0}

    # ------------------------------------------------------------------------- save

    def save(self, out_dir: Path) -> None:
        from ..model import save_model

        out_dir = Path(out_dir)
        save_model(self.model, out_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
        self.config.save(out_dir)


def _mask_token(model, tokenizer) -> int:
    """The mask token id: the tokenizer's, else added by training.data.add_mask_token."""
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    try:
        from .data import add_mask_token
    except ImportError:
        raise UserError("no mask token: pass mask_token_id (tidar_bench.training.data.add_mask_token is missing)")
    if tokenizer is None:
        raise UserError("no tokenizer to add a mask token to: pass mask_token_id")
    return int(add_mask_token(model, tokenizer))
