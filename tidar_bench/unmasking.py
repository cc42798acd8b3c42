"""The unmasking rule of block diffusion, shared by `bd` (baselines/block_diffusion.py) and TiDAR's
diffusion mode (tidar_bench/tidar_diffusion.py): a token and its confidence per masked position
(`pick`), how many positions a fixed-steps schedule finalises at each step (`unmask_count`), and the
rule that finalises the most confident ones (`unmask_top`)."""

from __future__ import annotations

import math

import torch

from .decoding import sample, warp_probs


def pick(logits: torch.Tensor, sp, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Token per row (argmax when greedy, else a sample) and its probability (the confidence)."""
    if sp.greedy:
        probs = logits.softmax(-1)
        tokens = probs.argmax(-1)
    else:
        probs = warp_probs(logits, sp)
        tokens = sample(probs, gen)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def unmask_count(masked: int, steps: int, step: int) -> int:
    """A fixed-steps schedule: positions to unmask at `step` (0-based) of `steps`, `masked` left."""
    return math.ceil(masked / (steps - step))


def unmask_top(logits: torch.Tensor, block: torch.Tensor, eligible: torch.Tensor, u: int, sp, gen,
               score: torch.Tensor | None = None) -> torch.Tensor:
    """The fixed-steps rule (`steps=N`; also `tidar(mode=diffusion)`): a token per position (`pick`),
    then the u `eligible` positions with the highest `score` (default: the token's confidence,
    `remasking=low_confidence`; a random score is `remasking=random`) take theirs, in `block` in
    place. Returns their indices (a device tensor: no host read)."""
    tokens, conf = pick(logits, sp, gen)
    idx = (conf if score is None else score).masked_fill(~eligible, -1.0).topk(u).indices
    block[idx] = tokens[idx]
    return idx
