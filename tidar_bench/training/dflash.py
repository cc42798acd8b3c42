"""DFlash drafter objective: train `tidar_bench.baselines.dflash_drafter.DFlashDrafter` on a frozen target.

Per batch x [B, S] the frozen target runs once (no grad) and gives, at every position, the
drafter's context features (its hidden states at `target_layer_ids`) and its next-token
distribution. Then, as in the DFlash recipe, `num_anchors` anchor positions a are drawn per
sequence (uniformly, without replacement, 1 <= a <= S - block_size: every block has context and
fits in the sequence) and each becomes one training block fed in the same drafter forward:

    block tokens  [x_a, MASK, ..., MASK]  at positions a .. a+k-1   (k = block_size)
    it sees       the context rows of positions < a (strictly: at decoding the anchor's own
                  features are not known yet) and its own block, bidirectionally; no other block

(`block_mask`). Row i >= 1 of the block predicts the token at position a+i. Labels: `target`
(default) = the target's distribution at a+i given the true prefix (soft cross-entropy: what the
verifier will compare the draft with when drafts 1..i-1 were accepted), or `data` = the token
x_{a+i} itself (the reference recipe on target-generated data, e.g. `distill` output). Row i's loss
is weighted by exp(-(i-1)/gamma): early drafts decide the accepted length (DFlash's decay; gamma
defaults to 7 for k = 16, 5 for 10, 4 for 8, else k/2). Metrics: ce (unweighted mean), acc (argmax of
row i == argmax of its label, all rows) and tau (1 + expected accepted drafts per block if each
row were verified greedily against the label argmax: mean over blocks of the length of the
leading run of hits + 1), and with target labels kl (ce minus the labels' entropy).

Packed rows with documents (`--doc-attention`): the target reads each document alone, an anchor is
drawn only where its whole block lies in one document (at least one token after the document's
start), the block sees only its own document's context, and positions restart per document. Every
row then has the same number of anchors: the fewest any row of the batch allows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..decoding import accepted_prefix
from ..errors import UserError
from ..masks import ar_mod, dense, doc_positions
from .data import unpack

LABELS = ("target", "data")
DEFAULT_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def block_mask(anchors: torch.Tensor, seq_len: int, block_size: int, doc: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, N*k, S + N*k] bool over keys [context positions 0..S-1 | the N blocks], rows = block
    tokens (block n row i): context j < anchor n (and in the anchor's document of `doc` [B, S]), same block."""
    B, N = anchors.shape
    rows_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, N*k]
    j = torch.arange(seq_len, device=anchors.device)
    ctx = j[None, None, :] < rows_anchor[:, :, None]
    if doc is not None:
        ctx = ctx & (doc[:, None, :] == doc.gather(1, rows_anchor)[:, :, None])
    blk = torch.arange(N * block_size, device=anchors.device) // block_size
    own = blk[:, None] == blk[None, :]
    return torch.cat([ctx, own[None].expand(B, -1, -1)], dim=-1)[:, None]


def sample_anchors(batch: int, seq_len: int, block_size: int, n: int, generator=None,
                   device: torch.device | str = "cpu", doc: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n'] sorted anchors in [1, S - k], distinct per row (n' = min(n, S - k)); with `doc` [B, S]
    only anchors a with a-1 and a+k-1 in a's document (n' = the fewest any row allows)."""
    hi = seq_len - block_size  # anchors 1..hi
    if hi < 1:
        raise UserError(f"--seq-len {seq_len} is too short for blocks of {block_size} (needs >= {block_size + 1})")
    n = min(n, hi)
    scores = torch.rand(batch, hi, generator=generator)
    if doc is not None:
        d = doc.cpu()
        ok = (d[:, :hi] == d[:, 1 : hi + 1]) & (d[:, 1 : hi + 1] == d[:, block_size:])
        n = min(n, int(ok.sum(1).min()))
        if n == 0:
            raise UserError(f"--doc-attention: a row has no document longer than the block ({block_size} tokens); "
                            "use longer documents or a longer --seq-len")
        scores = scores.masked_fill(~ok, -1.0)
    return (scores.topk(n, dim=1).indices + 1).sort(dim=1).values.to(device)


class DFlashObjective:
    name = "dflash"
    eval_decoder = ("dflash", "mean_accepted_length", True)  # --eval-every: accepted length of the dflash decoder

    def __init__(self, target, drafter, *, num_anchors: int = 16, labels: str = "target", gamma: float | None = None):
        if labels not in LABELS:
            raise UserError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
        if num_anchors < 1:
            raise UserError(f"num_anchors must be >= 1, got {num_anchors}")
        self.target = target.eval().requires_grad_(False)
        self.drafter = drafter
        self.k = drafter.block_size
        self.num_anchors = num_anchors
        self.labels = labels
        self.gamma = gamma if gamma else DEFAULT_GAMMA.get(self.k, self.k / 2)
        self.layers = list(drafter.target_layer_ids)
        self.generator = torch.Generator().manual_seed(0)

    def module(self):
        return self.drafter

    def loss(self, trainable, batch):
        from tidar_bench.baselines.dflash_drafter import target_context

        batch, doc, _ = unpack(batch)  # the labels are the target's (or the data's) own: no loss mask
        B, S = batch.shape
        k, dev = self.k, batch.device
        anchors = sample_anchors(B, S, k, self.num_anchors, self.generator, dev, doc)  # [B, N]
        N = anchors.shape[1]
        pos = anchors[:, :, None] + torch.arange(k, device=dev)  # [B, N, k] indices of the block rows
        tpos = torch.arange(S, device=dev)[None].expand(B, -1) if doc is None else doc_positions(doc)
        with torch.no_grad():
            if doc is None:
                out = self.target(batch, hidden_layers=self.layers, return_logits=self.labels == "target")
            else:
                out = self.target(batch, tpos, dense(ar_mod(doc), B, S, S, dev), hidden_layers=self.layers,
                                  return_logits=self.labels == "target")
            feats = target_context(out.hidden_states, self.layers).detach()
            label_pos = pos[:, :, 1:].reshape(B, -1)  # rows 1..k-1 predict the token at their position
            tokens = batch.gather(1, label_pos)
            if self.labels == "target":  # the target's distribution of that token = its logits one row before
                rows = out.logits.gather(1, (label_pos - 1)[..., None].expand(-1, -1, out.logits.shape[-1]))
                probs = rows.float().softmax(-1)
                label_top = probs.argmax(-1)
            else:
                label_top = tokens
            noise = torch.full((B, N, k), self.drafter.mask_token_id, device=dev, dtype=batch.dtype)
            noise[:, :, 0] = batch.gather(1, anchors)
            noise_emb = self.target.model.embed_tokens(noise.view(B, -1))
        positions = torch.cat([tpos, tpos.gather(1, pos.view(B, -1))], dim=1)
        states = trainable(noise_emb, feats, positions, mask=block_mask(anchors, S, k, doc))
        states = states.view(B, N, k, -1)[:, :, 1:]
        logp = self.target.lm_head(states).float().log_softmax(-1).view(B, N * (k - 1), -1)
        if self.labels == "target":
            ce = -(probs * logp).sum(-1)
        else:
            ce = -logp.gather(-1, tokens[..., None]).squeeze(-1)
        w = torch.exp(-torch.arange(k - 1, device=dev, dtype=torch.float32) / self.gamma).repeat(N)
        loss = (ce * w).sum() / (w.sum() * B)
        with torch.no_grad():
            hit = (logp.argmax(-1) == label_top).view(B, N, k - 1)
            run = accepted_prefix(hit).float()  # the chain's accepted drafts, as decoding counts them
            metrics = {"ce": ce.mean(), "acc": hit.float().mean(), "tau": 1 + run.mean()}
            if self.labels == "target":  # CE minus the label's entropy: the part the drafter can still learn
                metrics["kl"] = (ce + (probs * probs.clamp_min(1e-12).log()).sum(-1)).mean()
        return loss, metrics

    def save(self, out_dir: Path) -> None:
        self.drafter.save(out_dir)

