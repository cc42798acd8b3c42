"""Every attention mask the project uses, as pure functions returning bool tensors.

Convention: mask[i, j] is True when query i may attend to key j. Queries are the tokens fed in
this forward; keys are [cached tokens | fed tokens], so a mask for q fed tokens over a cache of
length C has shape [q, C + q]. Every row attends at least to itself, so SDPA never sees an empty row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def causal(q: int, cached: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Plain causal mask for q new tokens after `cached` tokens: [q, cached + q]."""
    i = torch.arange(q, device=device)[:, None]
    j = torch.arange(cached + q, device=device)[None, :]
    return j <= i + cached


def static_step(start: torch.Tensor, local: torch.Tensor | None, q: int, max_len: int,
                window: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of a static-shape step (compiled mode) over the WHOLE static cache: [B|1, 1, q, max_len].

    The q fed tokens are written at slots [start, start + q) (`start`: long tensor [] or [B], per
    row). `local` [q, W] or [B, q, W] covers the key window [window, window + W) (default: the fed
    tokens' own slots, window = start, W = q; None = causal); every slot before the window is
    attended (the committed prefix) and every slot after it is not (stale entries). Built from
    device tensors only: no host sync, one graph for every cache length."""
    dev = start.device
    if local is None:
        local = causal(q, device=dev)
    W = local.shape[-1]
    local = local.view(-1, q, W)
    w0 = start if window is None else window
    rel = torch.arange(max_len, device=dev)[None, :] - w0.view(-1, 1)  # [B, T] slot - window start
    B = max(rel.shape[0], local.shape[0])
    idx = rel.clamp(0, W - 1)[:, None, :].expand(B, q, max_len)
    inside = local.expand(B, q, W).gather(2, idx) & ((rel >= 0) & (rel < W))[:, None, :]
    return ((rel < 0)[:, None, :] | inside)[:, None]


def tree(parents: list[int], cached: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tree attention: node i attends to the cache and to its ancestors (and itself).

    parents[i] is the index of node i's parent among the fed nodes, or -1 for a root (a root sees
    only the cache). Nodes must be listed parents-first (parents[i] < i)."""
    n = len(parents)
    m = torch.zeros(n, cached + n, dtype=torch.bool, device=device)
    m[:, :cached] = True
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError("tree nodes must come after their parents")
        m[i, cached + i] = True
        if p >= 0:
            m[i, cached : cached + n] |= m[p, cached : cached + n]
    return m


# ----------------------------------------------------------------------------- TiDAR


def tidar_training(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """TiDAR "full mask" training mask over [clean x_0..x_{S-1} | S mask tokens]: [2S, 2S].

    Clean token i attends causally to clean tokens <= i. Mask token i (row S + i) is in block
    b = i // k; it attends to clean tokens before position b*k and to every mask token of its own
    block (bidirectional). Mask tokens never see clean tokens of their own block or later."""
    S, k = seq_len, block_size
    idx = torch.arange(S, device=device)
    blk = idx // k
    m = torch.zeros(2 * S, 2 * S, dtype=torch.bool, device=device)
    m[:S, :S] = idx[None, :] <= idx[:, None]
    m[S:, :S] = idx[None, :] < (blk * k)[:, None]
    m[S:, S:] = blk[:, None] == blk[None, :]
    return m


@dataclass(frozen=True)
class TidarStepLayout:
    """Where every fed token of one TiDAR decoding step sits.

    Fed tokens: [x, d_1..d_m] (causal segment, positions P..P+m, x is the last kept token whose KV
    is not cached yet, d_i are last step's drafts) followed by one pre-draft block of k mask tokens
    per outcome j in `outcomes` (j = number of drafts that will be accepted). Block j starts at
    position P + j + 1, the position of the token the AR head samples after d_j, and sees the cache,
    x and d_1..d_j: exactly what a training block starting there sees."""

    cached: int  # P: cache length before this step
    n_drafts: int  # m
    block_size: int  # k
    outcomes: tuple[int, ...]  # which j get a pre-draft block, ascending, subset of 0..m (`tidar_padded_step`: padded)

    @property
    def n_causal(self) -> int:
        return self.n_drafts + 1

    @property
    def n_fed(self) -> int:
        return self.n_causal + len(self.outcomes) * self.block_size

    def block_start(self, b: int) -> int:
        """Index (among fed tokens) of the first mask token of the b-th pre-draft block."""
        return self.n_causal + b * self.block_size

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        P, k = self.cached, self.block_size
        causal_pos = torch.arange(P, P + self.n_causal, device=device)
        blocks = [torch.arange(P + j + 1, P + j + 1 + k, device=device) for j in self.outcomes]
        return torch.cat([causal_pos, *blocks])


def tidar_step(layout: TidarStepLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """The decoding-step mask for `layout`: [n_fed, cached + n_fed]."""
    P, c, k = layout.cached, layout.n_causal, layout.block_size
    n = layout.n_fed
    m = torch.zeros(n, P + n, dtype=torch.bool, device=device)
    m[:, :P] = True
    m[:c, P : P + c] = causal(c, device=device)
    for b, j in enumerate(layout.outcomes):
        s = layout.block_start(b)
        m[s : s + k, P : P + j + 1] = True  # x and the first j drafts
        m[s : s + k, P + s : P + s + k] = True  # own block, bidirectional
    return m


def tidar_padded_step(block_size: int, n_blocks: int, outcomes: tuple[int, ...]) -> TidarStepLayout:
    """The fixed-shape step (compiled, and every row at B > 1): always k causal slots (x, the m
    drafts, then padding that no real row attends to and nothing verifies) and `n_blocks` blocks of
    k. Block b serves outcomes[b] exactly as in `tidar_step`; the unused blocks (outcome 0: they see
    x and themselves) are ignored. So every step has one shape and only the mask and positions
    change. A `TidarStepLayout` with m = k-1 and `n_blocks` outcomes (not ascending: the padding
    blocks come last), so `tidar_step` and `positions` give its mask and positions."""
    if len(outcomes) > n_blocks:
        raise ValueError(f"{len(outcomes)} outcomes do not fit in {n_blocks} blocks")
    padded = tuple(outcomes) + (0,) * (n_blocks - len(outcomes))
    return TidarStepLayout(cached=0, n_drafts=block_size - 1, block_size=block_size, outcomes=padded)


def tidar_first_step(prompt_len: int, block_size: int, device: torch.device | str = "cpu") -> TidarStepLayout:
    """The prefill step: the prompt is the causal segment (nothing cached) and one pre-draft block
    follows it, starting at the position the AR head fills next."""
    return TidarStepLayout(cached=0, n_drafts=prompt_len - 1, block_size=block_size, outcomes=(prompt_len - 1,))


# ----------------------------------------------------------------------------- block diffusion


def block_causal(n: int, block_size: int, cached: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Block-causal mask for n fed tokens at absolute positions [cached, cached + n): [n, cached + n].

    Blocks are aligned to absolute positions (block of position p = p // block_size). A token
    attends to every key whose block is <= its own: bidirectional inside its block, causal across
    blocks. This is both the clean stream of block-diffusion training and every block-diffusion
    decoding step (see `block_diffusion_step`)."""
    qb = torch.arange(cached, cached + n, device=device)[:, None] // block_size
    kb = torch.arange(cached + n, device=device)[None, :] // block_size
    return kb <= qb


def block_diffusion_training(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """BD3-LM training mask over [x_t (noised copy, S) | x_0 (clean, S)]: [2S, 2S].

    Noised token i (block b = i // B) attends bidirectionally to its own noised block and to clean
    blocks < b; clean token i attends to clean blocks <= b (block-causal, bidirectional inside).
    Clean tokens never see noised ones. Both copies use positions 0..S-1."""
    S, B = seq_len, block_size
    blk = torch.arange(S, device=device) // B
    m = torch.zeros(2 * S, 2 * S, dtype=torch.bool, device=device)
    m[:S, :S] = blk[:, None] == blk[None, :]
    m[:S, S:] = blk[None, :] < blk[:, None]
    m[S:, S:] = blk[None, :] <= blk[:, None]
    return m


def block_diffusion_step(cached: int, n_fed: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A block-diffusion decoding step: [n_fed, cached + n_fed].

    The cache holds committed tokens [0, cached); the fed tokens are at [cached, cached + n_fed):
    typically the current block (B tokens, some still masks), which attends to the whole cached
    prefix and bidirectionally within itself; optionally preceded by the just-finished block that
    is being committed (it must not see the next block). Exactly the rows of the training mask's
    noised copy once the clean prefix is cached, and the block-causal mask restricted to the fed
    rows, so committed KV equals a fresh block-causal prefill."""
    return block_causal(n_fed, block_size, cached, device)


# ----------------------------------------------------------------------------- packed training (documents)
#
# A packed training row holds several documents; with document attention (`--doc-attention`) a
# token attends only within its own document and positions (hence blocks) restart at each one, so
# every document is trained exactly as if it were alone in its row. Each training mask below is ONE
# predicate over (row b, query index q, key index kv), written with elementwise tensor ops only: the
# same function is a FlexAttention `mask_mod` (a block mask built from the document and block
# structure, never n x n) and, evaluated on broadcast index grids by `dense`, the boolean mask the
# SDPA path uses. `doc` [B, S] is each token's document number in its row, `pos` [B, S] its
# position in that document; without document attention doc = 0 and pos = arange(S), and the
# predicates reduce to `causal`, `tidar_training` and `block_diffusion_training` above.


def doc_positions(doc: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document: doc [B, S] (non-decreasing per row) -> [B, S]."""
    S = doc.shape[-1]
    idx = torch.arange(S, device=doc.device).expand_as(doc)
    first = torch.ones_like(doc, dtype=torch.bool)
    first[..., 1:] = doc[..., 1:] != doc[..., :-1]
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - start


def ar_mod(doc: torch.Tensor):
    """Causal attention within each document, over S tokens."""

    def mod(b, h, q, kv):
        return (kv <= q) & (doc[b, q] == doc[b, kv])

    return mod


def tidar_mod(doc: torch.Tensor, pos: torch.Tensor, k: int):
    """`tidar_training` per document over [clean | mask] (2S): a mask token at position p of its
    document (block p // k) sees its document's clean tokens before (p // k) * k and its own block."""
    S = doc.shape[-1]

    def mod(b, h, q, kv):
        mq, mk = q >= S, kv >= S
        i, j = q - S * mq, kv - S * mk
        pi, pj = pos[b, i], pos[b, j]
        rule = torch.where(mk, mq & (pi // k == pj // k), torch.where(mq, pj < (pi // k) * k, pj <= pi))
        return rule & (doc[b, i] == doc[b, j])

    return mod


def block_diffusion_mod(doc: torch.Tensor, pos: torch.Tensor, block_size: int):
    """`block_diffusion_training` per document over [x_t | x_0] (2S), blocks of `block_size`
    positions counted from each document's start."""
    S, B = doc.shape[-1], block_size

    def mod(b, h, q, kv):
        cq, ck = q >= S, kv >= S
        i, j = q - S * cq, kv - S * ck
        bi, bj = pos[b, i] // B, pos[b, j] // B
        rule = torch.where(ck, torch.where(cq, bj <= bi, bj < bi), ~cq & (bi == bj))
        return rule & (doc[b, i] == doc[b, j])

    return mod


def dense(mod, batch: int, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A mask predicate evaluated on every (row, query, key): bool [batch, 1, q_len, kv_len]."""
    b = torch.arange(batch, device=device)[:, None, None]
    q = torch.arange(q_len, device=device)[None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, :]
    return mod(b, None, q, kv)[:, None]


def block_mask(mod, batch: int, q_len: int, kv_len: int, device: torch.device | str = "cpu", tile: int = 128):
    """A mask predicate as a FlexAttention BlockMask: per 128 x 128 tile whether it is empty, full
    (attention without the predicate) or partial (the predicate decides), i.e. O(batch * (n / 128)^2)
    integers instead of n^2 booleans. Built one query tile at a time (a [128, kv_len] slice of the
    predicate), so no n x n grid exists on the way either. Tiles cut by the sequence end are partial."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-q_len // tile), -(-kv_len // tile)
    full = torch.zeros(batch, 1, nq, nk, dtype=torch.bool, device=device)
    part = torch.zeros_like(full)
    kv = torch.arange(nk * tile, device=device)
    for b in range(batch):
        bt = torch.tensor(b, device=device)
        for t in range(nq):
            q = torch.arange(t * tile, min((t + 1) * tile, q_len), device=device)
            m = mod(bt, None, q[:, None], kv[None, :].clamp(max=kv_len - 1)) & (kv < kv_len)[None, :]
            m = m.view(len(q), nk, tile)
            some, every = m.any(2).any(0), m.all(2).all(0) & (len(q) == tile)
            full[b, 0, t], part[b, 0, t] = every, some & ~every

    def blocks(x):  # (count [B, 1, nq], indices [B, 1, nq, nk]: the set tiles first)
        return x.sum(-1, dtype=torch.int32), torch.sort(x.int(), dim=-1, descending=True, stable=True).indices.int()

    return BlockMask.from_kv_blocks(*blocks(part), *blocks(full), BLOCK_SIZE=tile, mask_mod=mod,
                                    seq_lengths=(q_len, kv_len))
