"""EAGLE draft-head objective: train `tidar_bench.baselines.eagle_head.EagleHead` on a frozen target.

Per batch x [B, S] the frozen target runs once (no grad) and gives, at every position, the head's
input features (`target_features`: EAGLE-3 low/mid/high taps or EAGLE-1's last normed state) and
its next-token distribution. Head pair i = (feature i, token i+1), i = 0..S-2, predicts token
i+2: the target distribution at position i+1 (soft cross-entropy over the draft vocabulary,
renormalised; positions whose target argmax lies outside the draft vocabulary are skipped, as in
EAGLE-3). The eagle1 form also regresses the head's output state onto the target feature i+1
(smooth L1), loss = reg + 0.1 * CE (EAGLE-1's weights); eagle3 uses the CE alone.

Training-time test (EAGLE-3, `ttt_steps` > 1): unrolled step a feeds, at pair i, the head's own
output of step a-1 at pair i-1 instead of the target feature, exactly what a depth-(a+1) tree node
sees at decoding; it attends to the real pairs <= i-a and to its own chain (step b at pair
i-a+b, b = 1..a), mask `ttt_mask`. Step a's loss is weighted by 0.8**a and counted where i >= a.
Each step recomputes the earlier steps' rows in the same forward (they only see themselves), so the
head needs no trainable cache.

Packed rows with documents (`--doc-attention`): the target reads each document alone (causal within
it, positions restarting), the head's mask is `ttt_mask` within each document (pairs take their
first token's document and position), a chain starts from zeros at each document's first pair, and
pair i counts only when token i+1 is in token i's document (and i is at least a pairs into it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..masks import ar_mod, dense, doc_positions
from .data import unpack

STEP_DECAY = 0.8


def ttt_mask(n_pairs: int, n_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n_steps * n_pairs]^2 mask over rows/cols (step a, pair i) for the training-time test."""
    idx = torch.arange(n_pairs, device=device)
    step = torch.arange(n_steps, device=device).repeat_interleave(n_pairs)
    pos = idx.repeat(n_steps)
    a, i = step[:, None], pos[:, None]
    b, j = step[None, :], pos[None, :]
    real = (b == 0) & (j <= i - a)
    chain = (b >= 1) & (b <= a) & (j == i - a + b)
    return real | chain


def frequent_tokens(ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent token ids of `ids` (ties: lower id first), sorted: a draft vocabulary."""
    if not 0 < n <= vocab_size:
        raise UserError(f"draft vocabulary size must be in [1, {vocab_size}], got {n}")
    counts = torch.bincount(ids.flatten().long(), minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) * 1e-9  # stable tie-break
    return counts.topk(n).indices.sort().values


class EagleHeadObjective:
    name = "eagle_head"

    def __init__(self, target, head, *, ttt_steps: int = 1, reg_weight: float | None = None,
                 ce_weight: float | None = None):
        if ttt_steps < 1:
            raise UserError(f"ttt_steps must be >= 1, got {ttt_steps}")
        self.target = target.eval().requires_grad_(False)
        self.head = head
        self.ttt_steps = ttt_steps
        eagle1 = head.form == "eagle1"
        self.reg_weight = reg_weight if reg_weight is not None else (1.0 if eagle1 else 0.0)
        self.ce_weight = ce_weight if ce_weight is not None else (0.1 if eagle1 else 1.0)
        if self.reg_weight and not eagle1:
            raise UserError("feature regression needs the eagle1 form (EAGLE-3 states are not target features)")
        self.layers = head.feature_layers(target.config.num_hidden_layers)
        self.draft_ids = torch.nonzero(head.t2d).flatten()
        self._masks: dict[tuple, torch.Tensor] = {}

    def module(self):
        return self.head

    def block_names(self) -> list[str]:
        """The head's one decoder layer: the unit FSDP shards and activation checkpointing wraps."""
        return ["midlayer"]

    def _mask(self, n_pairs: int, n_steps: int, device) -> torch.Tensor:
        key = (n_pairs, n_steps, str(device))
        if key not in self._masks:
            self._masks[key] = ttt_mask(n_pairs, n_steps, device)
        return self._masks[key]

    def loss(self, trainable, batch):
        from tidar_bench.baselines.eagle_head import target_features

        batch, doc, _ = unpack(batch)  # the labels are the target's own distributions: no loss mask
        B, S = batch.shape
        n = S - 1
        pos = torch.arange(n, device=batch.device)
        if doc is not None:
            tpos = doc_positions(doc)
            pos, pair_doc = tpos[:, :n], doc[:, :n]
            same = (pair_doc[:, :, None] == pair_doc[:, None, :])[:, None]  # [B, 1, n, n]
        with torch.no_grad():
            if doc is None:
                out = self.target(batch, hidden_layers=self.layers)
            else:
                out = self.target(batch, tpos, dense(ar_mod(doc), B, S, S, batch.device), hidden_layers=self.layers)
            feats = target_features(self.target, out.hidden_states, self.head.form, self.layers).detach()
            probs = out.logits[:, 1:].float().softmax(-1)  # target distribution of token i+2, pair i
            target_top = probs.argmax(-1)
            draft_ids = self.draft_ids.to(batch.device)
            p_draft = probs[..., draft_ids]
            p_draft = p_draft / p_draft.sum(-1, keepdim=True).clamp_min(1e-12)
            in_vocab = self.head.t2d[target_top]
            entropy = -(p_draft * p_draft.clamp_min(1e-12).log()).sum(-1)  # CE floor: CE - entropy = KL
        ids = batch[:, 1:]
        f_in, f_next = feats[:, :-1], feats[:, 1:]
        if doc is not None:
            in_vocab = in_vocab & (doc[:, 1:] == doc[:, :-1])
        total = torch.zeros((), device=batch.device)
        metrics: dict[str, torch.Tensor] = {}
        fed_hidden: list[torch.Tensor] = []
        for a in range(self.ttt_steps):
            hidden = torch.cat(fed_hidden, 1) if fed_hidden else None
            mask = self._mask(n, a + 1, batch.device)
            if doc is not None:
                mask = mask & same.repeat(1, 1, a + 1, a + 1)
            h, logits = trainable(ids.repeat(1, a + 1), target_feats=f_in, hidden=hidden,
                                  position_ids=pos.repeat(1, a + 1) if pos.dim() == 2 else pos.repeat(a + 1), mask=mask)
            h, logits = h[:, a * n:], logits[:, a * n:]
            valid = in_vocab & (pos >= a) if doc is not None else in_vocab.clone()
            valid[:, :a] = False
            count = valid.sum().clamp_min(1)
            ce = -(p_draft * logits.log_softmax(-1)).sum(-1)
            ce = (ce * valid).sum() / count
            step_loss = self.ce_weight * ce
            metrics[f"ce{a}"] = ce.detach()
            metrics[f"kl{a}"] = (ce - (entropy * valid).sum() / count).detach()
            if self.reg_weight:
                reg = F.smooth_l1_loss(h.float(), f_next.float(), reduction="none").mean(-1)
                reg = (reg * valid).sum() / count
                step_loss = step_loss + self.reg_weight * reg
                metrics[f"reg{a}"] = reg.detach()
            hit = (self.head.to_target(logits.argmax(-1)) == target_top) & valid
            metrics[f"acc{a}"] = (hit.sum() / count).detach()
            total = total + STEP_DECAY ** a * step_loss
            fed = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
            fed_hidden.append(fed if doc is None else fed * (pos != 0)[..., None])  # chains start at a document
        return total, metrics

    def save(self, out_dir: Path) -> None:
        self.head.save(out_dir)
