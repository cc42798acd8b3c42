"""The LOSSY rules `tidar` can decode by: the TiDAR authors' own (their SGLang worker,
as docs/decoders.md "TiDAR: the authors' rules" describes it), and our probability mix `beta`. Every
function here is LOSSY: greedy outputs are not `ar`'s. Each is off by default; `TidarDecoder` calls
them only when its options (`tidar_options.TidarOptions`) turn them on, and the exact path never
touches this module.

The authors' rules, as options of `tidar` (docs/decoders.md, "TiDAR: the authors' rules"):
`first_token=diffusion` (commit block n's offset-0 argmax unverified, also at prefill: `offset0_token`),
`prefill=two` (a causal prefill, then the block alone: `prefill_two`; timing only), `ar_ratio=r`
(verify against r*AR + (1-r)*diffusion logits, the diffusion row being the current step's block
offset 0: `logit_mix`), `accept=match|ratio` (argmax match whatever the temperature, or p/q >= u
without residual: `verify_ratio`, drafts argmax with q at temperature 1: `ratio_drafts`),
`draft_penalty` (repetition penalty within a block's drafts: `penalised`) and `t0_as_t1`
(temperature 0 run as temperature 1, as SGLang does: `sampling`). `rule=authors` / `authors-greedy`
set them as the release worker (B) / the older greedy worker (A) does (`RULES`); options given
explicitly win.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .decoding import ratio_verify, repetition_penalty, sample, warp_probs

# The authors' rules as option values (tidar-official.md: A = python/.../tidar_worker.py @ 1870a84,
# B = tidar_sglang/.../tidar_worker.py @ 8f861c6; C = B + draft_penalty=1.2 @ 198bc1a). "exact" is ours.
RULES = {
    "exact": dict(first_token="ar", prefill="one", ar_ratio=1.0, accept="auto", draft_penalty=1.0, t0_as_t1=False),
    "authors": dict(first_token="diffusion", prefill="two", ar_ratio=0.0, accept="ratio", draft_penalty=1.0,
                    t0_as_t1=True),
    "authors-greedy": dict(first_token="diffusion", prefill="two", ar_ratio=1.0, accept="match", draft_penalty=1.0,
                           t0_as_t1=False),
}
CHOICES = {"first_token": ("ar", "diffusion"), "prefill": ("one", "two"), "accept": ("auto", "match", "ratio")}


def sampling(sp, t0_as_t1: bool):
    """t0_as_t1 (LOSSY): SGLang runs temperature 0 as temperature 1 (its top_k = 1 is ignored by the worker)."""
    return replace(sp, temperature=1.0) if t0_as_t1 and sp.greedy else sp


def offset0_token(block_logits: torch.Tensor) -> torch.Tensor:
    """first_token=diffusion (LOSSY): the token kept at the step boundary is the argmax of the
    block's offset 0 (`block_logits` [..., k(+), V] -> [...]), never verified."""
    return block_logits[..., 0, :].argmax(-1)


def prefill_two(model, cache, prompt: list[int], mask_id: int, k: int, offset0: int) -> torch.Tensor:
    """prefill=two, the authors' prefill (tidar-official.md section 3): a causal forward of the
    prompt (its last AR row kept), then the k masks alone at positions L..L+k-1, each seeing the whole
    prompt and the whole block; their KV is dropped by the caller's crop. The same logits rows as the
    one-forward prefill: [the last AR row | block offsets (1 - offset0)..k-1]."""
    dev, L = model.device, len(prompt)
    ar = model(torch.tensor([prompt], device=dev), cache=cache, logits_index=torch.tensor([L - 1], device=dev))
    ids = torch.full((1, k), mask_id, device=dev)
    mask = torch.ones(k, L + k, dtype=torch.bool, device=dev)
    blk = model(ids, torch.arange(L, L + k, device=dev), mask, cache,
                logits_index=torch.arange(1 - offset0, k, device=dev))
    return torch.cat([ar.logits[0], blk.logits[0]])


def ratio_drafts(block_logits: torch.Tensor):
    """accept=ratio (LOSSY), the authors' drafts: argmax, each with its probability q at temperature 1.
    Returns `_draft`'s tuple (drafts, logits, q as the draft probabilities, q as the confidences)."""
    drafts = block_logits.argmax(-1)
    q = block_logits.softmax(-1).gather(-1, drafts[:, None]).squeeze(-1)
    return drafts, block_logits, q, q


def penalised(block_logits: torch.Tensor, first: int, penalty: float) -> torch.Tensor:
    """draft_penalty (LOSSY, the authors' variant C): rows of `block_logits` with the repetition
    penalty applied sequentially: row o is penalised for the offset-0 token `first` and the argmax
    picks of the rows before it (penalised themselves)."""
    rows, ctx = [], torch.tensor([first], device=block_logits.device)
    for row in block_logits:
        row = repetition_penalty(row, ctx, penalty)
        rows.append(row)
        ctx = torch.cat([ctx, row.argmax()[None]])
    return torch.stack(rows)


def logit_mix(ar: torch.Tensor, blocks: torch.Tensor, ar_ratio: float) -> torch.Tensor:
    """ar_ratio < 1 (LOSSY, the release worker's `trust_ar_ratio`): verification logits [B, c, V] =
    r*AR + (1-r)*(block j offset 0) logits, row j <-> the block of outcome j (both predict position
    P+j+1; the block sees one more committed token than the row that drafted d_{j+1}). Needs every
    outcome's block (`blocks` [B, nb, ., V] with offset 0 read)."""
    return ar_ratio * ar + (1.0 - ar_ratio) * blocks[:, : ar.shape[1], 0]


def mixed_target(ar_logits: torch.Tensor, draft_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """beta < 1 (LOSSY, ours, not the authors'): verification logits log(beta*p_AR + (1-beta)*q_diff)
    at the m draft positions (raw distributions, warped afterwards like any logits); the bonus row
    stays pure AR."""
    m = draft_logits.shape[0]
    mix = beta * ar_logits[:m].softmax(-1) + (1.0 - beta) * draft_logits.softmax(-1)
    return torch.cat([mix.clamp_min(1e-30).log(), ar_logits[m:]])


def verify_ratio(rows, plans: dict, target: torch.Tensor, blocks: torch.Tensor, sp, first_token: str) -> dict:
    """accept=ratio, the authors' release worker (LOSSY, per row): `decoding.ratio_verify` (p/q >= u,
    no residual); the token kept is a sample of the target there (no residual) or, with
    first_token=diffusion, block n's offset-0 argmax. Returns `TidarDecoder._verify`'s verdicts:
    per row (n accepted, the token kept, the accepted drafts, None)."""
    verdicts = {}
    for s, (m, _, _) in plans.items():
        st, gen = rows[s].state, rows[s].gen
        p = warp_probs(target[s, : m + 1], sp)
        n = ratio_verify(st.drafts, st.draft_probs, p, gen)
        t = int(offset0_token(blocks[s, n])) if first_token == "diffusion" else int(sample(p[n], gen))
        verdicts[s] = (n, t, st.drafts[:n].tolist(), None)
    return verdicts
