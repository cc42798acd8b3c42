"""EAGLE-style speculative decoding: a one-layer draft head on the target's features drafts a
token tree, the target verifies the whole tree in ONE forward (tree attention), the longest
accepted path is kept. Lossless: greedy output == AR greedy, sampling keeps the target distribution.

The draft head (`EagleHead`: the EAGLE-3 and EAGLE-1 forms) and its checkpoint formats (SafeAILab,
AngelSlim, SGLang/SpecForge, speculators; `load_eagle_head`) are in `baselines/eagle_head.py`.

Indices: "pair" i of the head = (feature of target position i, token i+1); it predicts token i+2
and outputs a hidden state standing in for the feature at i+1. The head keeps its own KV cache of
committed pairs; tree nodes are appended while drafting and cropped afterwards. Invariants after
every step: target cache == causal prefill of the committed tokens except the newest; head cache
== head prefill of the committed pairs except those of the newest accepted path (absorbed at the
start of the next step, with the target features the verification forward produced).

Drafting (EAGLE-2 dynamic tree, `tree=True`): the head's first forward (absorbing the accepted
pairs) gives the root's children; keep the top_k by log-prob; then `depth - 1` times feed the
frontier (top_k nodes), expand top_k children of each, score = cumulative log-prob, keep the
global top_k as the next frontier. All expanded nodes are reranked and the best total_tokens - 1
(parents always included) form the tree. `tree=False` drafts a chain of `chain_length` tokens
(argmax, or sampled from the head when sampling). So `depth` head forwards per step.

Verification: fed = [root (newest committed token) | tree nodes] at positions cache + node depth
under `masks.tree`; greedy: walk from the root, following the child whose token equals the target
argmax, and append the target argmax where the walk stops (bonus). Sampling: at each node the
children (deterministic candidates, best first) are tried in turn: candidate t is accepted with
probability p(t), else p(t) is zeroed and p renormalised (speculative sampling with a point-mass
proposal, exact for any draft-chosen candidate set); when all are rejected the token is drawn from
the residual p. Chains (`tree=False`, greedy or sampled from the head) are verified for every row at
once by `decoding.verify_chain`, the acceptance rule TiDAR and DFlash use. The accepted path's
target KV is compacted with `cache.keep`. Stats: nfe (target forwards), draft_forwards (the
prompt's pairs in the prefill, then `depth` per step), accepted lengths = accepted drafts + 1 (EAGLE's tau).

Written once over B rows (`tidar_bench.engine`; batch 1 is B = 1): each row has its own target
length, head length and pending pairs; every row has top_k frontier nodes after depth 1, so each
expand step is one head forward over [B, top_k] (per-row key windows over the row's tree slots);
the rerank and the tree walk are per row on the host (chains: `verify_chain`, all rows on the
device); verification is [B, total_tokens] (padded with inert nodes), and each row keeps its own
accepted path (`KVCache.keep(row=)`).
Compiled (and at B > 1) the three step shapes are fixed: absorb depth + 1 pairs, expand top_k
nodes, verify total_tokens; eager batch 1 runs exact shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidar_bench.baselines.eagle_head import EagleHead, load_eagle_head, target_features
from tidar_bench.cache import KVCache
from tidar_bench.compiled import steps_for
from tidar_bench.decoding import GenerationConfig, next_token, sample, stack_rows, verify_chain, warp_probs
from tidar_bench.engine import Row, RowDecoder, Step
from tidar_bench.registry import DecoderContext, register_decoder


@dataclass
class DraftTree:
    """Drafted nodes in creation order (parents first). parent -1 = the root."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    draft_probs: torch.Tensor | None = None  # chains sampled from the head: [n, V] proposal distributions

    def children(self) -> list[list[int]]:
        """Fed-index children lists (fed index 0 = root, node i = fed index i + 1), in order."""
        ch: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            ch[p + 1].append(i + 1)
        return ch


def tree_sample_walk(fed_tokens: list[int], children: list[list[int]], probs: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[list[int], int]:
    """Sampling verification of a tree with deterministic candidates. probs [n_fed, V] are the
    warped target distributions at every fed node. Returns (accepted fed path from the root, next token)."""
    path = [0]
    node = 0
    while True:
        p = probs[node].clone()
        moved = False
        for c in children[node]:
            t = fed_tokens[c]
            u = float(torch.rand((), generator=generator, device=p.device))
            if u < float(p[t]):
                path.append(c)
                node, moved = c, True
                break
            p[t] = 0.0
            total = float(p.sum())
            if total <= 0:  # only reachable with probability 0; keep a valid distribution
                p = probs[node].clone()
                break
            p = p / total
        if not moved:
            return path, int(sample(p, generator))


@dataclass
class _RowState:
    """One row's EAGLE state between steps (see the module doc's invariants)."""

    tok: int  # newest committed token (its target KV comes with the next verification)
    hlen: int  # committed pairs in the head cache
    pairs: list[int]  # tokens of the pairs not absorbed yet (the newest accepted path)
    feats: torch.Tensor | None  # their target features [len(pairs), F]
    front: tuple[torch.Tensor, torch.Tensor] | None  # (hidden, logits) of the newest absorbed pair, when pairs == []


def tree_masks(parents: torch.Tensor) -> torch.Tensor:
    """[B, n, n] tree attention of B rows of fed nodes (parents [B, n], -1 = a root: sees only
    itself; `masks.tree` of each row), built by following parent links (depth steps), not per node."""
    B, n = parents.shape
    m = torch.eye(n, dtype=torch.bool).repeat(B, 1, 1)
    rows, cols = torch.arange(B)[:, None].expand(B, n), torch.arange(n)[None].expand(B, n)
    anc = parents.clone()
    while bool((anc >= 0).any()):
        live = anc >= 0
        m[rows[live], cols[live], anc[live]] = True
        anc = torch.where(live, parents.gather(1, anc.clamp(min=0)), anc)
    return m


class EagleDecoder(RowDecoder):
    """Written over B rows (`tidar_bench.engine`): every step drafts a tree (or chain) per row, the
    head's expand steps batched as [B, top_k], and verifies [B, total_tokens] in one target forward;
    batch 1 is B = 1."""

    name = "eagle"
    lossless = True

    def __init__(self, model, head: EagleHead, tokenizer=None, *, tree: bool = True, depth: int = 6, top_k: int = 4,
                 total_tokens: int = 32, chain_length: int = 5, compile: str = "off"):
        if min(depth, top_k, chain_length) < 1 or total_tokens < 2:
            raise ValueError("depth, top_k and chain_length must be >= 1 and total_tokens >= 2")
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.tree = tree
        if tree:
            self.depth, self.top_k, self.total_tokens = depth, min(top_k, head.lm_head.out_features), total_tokens
        else:
            self.depth, self.top_k, self.total_tokens = chain_length, 1, chain_length + 1
        # cache headroom past a row's committed length: verification, absorb (depth + 1), tree nodes
        self.step_rows = max(self.total_tokens, self.depth + 1, (self.depth - 1) * self.top_k + 1)
        self.layers = head.feature_layers(model.config.num_hidden_layers)
        # compiled mode (and B > 1): three fixed shapes (absorb depth+1 pairs, expand top_k nodes,
        # verify total_tokens), padded where a step has fewer; see tidar_bench/compiled.py
        self.target_steps = steps_for(model, model, compile)
        self.head_steps = steps_for(model, head, compile)

    def options(self) -> dict:
        o = {"form": self.head.form, "format": self.head.config.format, "target_layers": list(self.layers),
             "draft_vocab_size": self.head.lm_head.out_features, "tree": self.tree,
             "depth": self.depth, "compile": self.target_steps.compiled}
        if self.tree:
            o.update(top_k=self.top_k, total_tokens=self.total_tokens)
        else:
            o.update(chain_length=self.depth)
        return o

    def runners(self) -> list:
        return [self.target_steps, self.head_steps]

    def new_caches(self, batch: int, max_len: int, reuse: dict) -> dict:
        return {"target": self.model.new_cache(max_len, batch=batch, reuse=reuse.get("target")),
                "head": self.head.new_cache(max_len, reuse=reuse.get("head"), batch=batch)}

    def begin(self, batch: int, config: GenerationConfig) -> None:
        self._sp = config.sampling

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        """Target prefill, then the head absorbs every prompt pair (feature i, token i+1)."""
        dev, L = self.model.device, len(prompt)
        out = self.model(torch.tensor([prompt], device=dev), cache=caches["target"], hidden_layers=self.layers,
                         logits_index=slice(-1, None))
        tok = int(next_token(out.logits[0, -1], self._sp, row.gen))
        feats = target_features(self.model, out.hidden_states, self.head.form, self.layers)
        hidden, logits = self.head(torch.tensor([prompt[1:] + [tok]], device=dev), target_feats=feats,
                                   cache=caches["head"])
        row.state = _RowState(tok, L, [], None, (hidden[0, -1], logits[0, -1]))
        return Step([tok], fed=L, advance=L, draft_forwards=1)

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        B, dev, sp = len(rows), self.model.device, self._sp
        cache, hcache = caches["target"], caches["head"]
        live = [s for s, r in enumerate(rows) if r is not None]
        st: list[_RowState | None] = [r.state if r is not None else None for r in rows]
        padded = self.target_steps.compiled or B > 1  # fixed shapes (eager batch 1: exact shapes)
        absorbed = {s for s in live if st[s].pairs}
        if absorbed:
            self._absorb(rows, st, hcache, padded)
        trees = self._draft(rows, st, hcache)

        # verification: [root (newest token) | tree nodes] of every row, padded with inert nodes
        n = self.total_tokens if padded else len(trees[live[0]].tokens) + 1
        fed = [[0] * n for _ in range(B)]
        pos = [[0] * n for _ in range(B)]
        parents = [[-1] * n for _ in range(B)]
        for s in live:
            t, r = trees[s], rows[s]
            m = len(t.tokens) + 1
            fed[s][:m] = [st[s].tok] + t.tokens
            parents[s][1:m] = [p + 1 for p in t.parents]
            pos[s] = [r.length] + [r.length + d for d in t.depths] + [r.length] * (n - m)
        local = tree_masks(torch.tensor(parents)).to(dev)
        starts = [r.length if r is not None else 0 for r in rows]
        fed_t = torch.tensor(fed, device=dev)
        out = self.target_steps(fed_t, torch.tensor(pos, device=dev), cache=cache,
                                local_mask=local, hidden_layers=self.layers, starts=starts)
        chains = None if self.tree else self._verify_chains(rows, trees, fed_t, out.logits)
        best = out.logits.argmax(-1).tolist() if sp.greedy and self.tree else None
        feats = target_features(self.model, out.hidden_states, self.head.form, self.layers)
        committed: list[Step | None] = [None] * B
        for s in live:
            row, x, t = rows[s], st[s], trees[s]
            fed_tokens = fed[s][: len(t.tokens) + 1]
            if chains is not None:  # a chain: its first n drafts, then the target's token
                path, tok = list(range(chains[s][0] + 1)), chains[s][1]
            else:
                path, tok = self._verify(out.logits[s], best[s] if best else None, fed_tokens, t, row.gen)
            if path[-1] != len(path) - 1:  # a branch, not the fed prefix: move its KV behind the cache
                cache.keep([row.length + i for i in path], row=s)
            accepted = [fed_tokens[i] for i in path[1:]] + [tok]
            x.tok, x.pairs, x.feats = tok, accepted, feats[s, path]
            committed[s] = Step(accepted, fed=n, accepted=len(accepted), advance=len(path),
                                draft_forwards=(s in absorbed) + self.depth - 1)  # head: absorb + expand steps
        return committed

    def _absorb(self, rows: list[Row | None], st: list[_RowState | None], hcache: KVCache, padded: bool) -> None:
        """Feed every row's newly committed pairs to the head; keep (hidden, logits) of each row's
        last one. Padded: always depth + 1 pairs per row, causal, so the real pairs come first and
        never see the padding (its outputs are dropped, its KV lies past the row's head length)."""
        dev, B = self.model.device, len(rows)
        live = [s for s, x in enumerate(st) if x is not None and x.pairs]
        A = self.depth + 1 if padded else len(st[live[0]].pairs)
        F = st[live[0]].feats.shape[-1]
        ids = [[0] * A for _ in range(B)]
        f = torch.zeros(B, A, F, dtype=st[live[0]].feats.dtype, device=dev)
        for s in live:
            n = len(st[s].pairs)
            ids[s][:n] = st[s].pairs
            f[s, :n] = st[s].feats
        hl = [x.hlen if x is not None else 0 for x in st]
        pos = torch.tensor(hl, device=dev)[:, None] + torch.arange(A, device=dev)
        hidden, logits = self.head_steps(torch.tensor(ids, device=dev), cache=hcache, target_feats=f,
                                         position_ids=pos, starts=hl)
        for s in live:
            x, n = st[s], len(st[s].pairs)
            x.front = (hidden[s, n - 1], logits[s, n - 1])
            x.hlen += n
            x.pairs, x.feats = [], None

    def _draft(self, rows: list[Row | None], st: list[_RowState | None], hcache: KVCache) -> list[DraftTree | None]:
        """Grow every row's draft tree from its newest pair's (hidden, logits): depth 1 takes the
        top_k children of the root, then each expand step feeds every row's top_k frontier nodes
        ([B, top_k], one head forward) over the key window of the row's tree slots. The head
        cache keeps only the committed pairs (tree nodes lie past each row's head length)."""
        head, dev, sp, B = self.head, self.model.device, self._sp, len(rows)
        k, sampled_chain = self.top_k, not self.tree and not sp.greedy
        live = [s for s in range(B) if st[s] is not None]
        tokens: list[list[int]] = [[] for _ in range(B)]
        parents: list[list[int]] = [[] for _ in range(B)]
        depths: list[list[int]] = [[] for _ in range(B)]
        scores: list[list[float]] = [[] for _ in range(B)]
        q_rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
        anc_slots: list[dict[int, list[int]]] = [{} for _ in range(B)]  # node -> its ancestors' + own tree slots

        def expand(logits_rows: torch.Tensor, parent_nodes: list[list[int]], depth: int) -> list[list[int]]:
            """Add the top-k children of each parent of each row (logits_rows [B, r, V_d]); the new ids."""
            if sampled_chain:  # one child, sampled from the head with the row's generator
                d = torch.zeros(B, 1, 1, dtype=torch.long, device=dev)
                for s in live:
                    q = warp_probs(logits_rows[s, 0], sp)
                    d[s, 0, 0] = sample(q, rows[s].gen)
                    q_rows[s].append(torch.zeros(head.config.vocab_size, device=dev).index_put_(
                        (head.to_target(torch.arange(q.numel(), device=dev)),), q))
                lp = [[[0.0]]] * B
            else:
                lp, d = logits_rows.log_softmax(-1).topk(k, dim=-1)
                lp = lp.tolist()
            tgt = head.to_target(d).tolist()
            new: list[list[int]] = [[] for _ in range(B)]
            for s in live:
                for r, par in enumerate(parent_nodes[s]):
                    base = 0.0 if par == -1 else scores[s][par]
                    for j, t in enumerate(tgt[s][r]):
                        new[s].append(len(tokens[s]))
                        tokens[s].append(t)
                        parents[s].append(par)
                        depths[s].append(depth)
                        scores[s].append(base + lp[s][r][j])
            return new

        zero = st[live[0]].front
        front = [st[s].front if st[s] is not None else (torch.zeros_like(zero[0]), torch.zeros_like(zero[1]))
                 for s in range(B)]
        frontier = expand(torch.stack([f[1] for f in front])[:, None], [[-1]] * B, 1)
        front_hidden = torch.stack([f[0] for f in front])[:, None].expand(-1, k, -1).contiguous()
        hl = [x.hlen if x is not None else 0 for x in st]
        W = (self.depth - 1) * k  # head-cache slots the tree can take: the key window of every expand step
        for depth in range(2, self.depth + 1):
            base = (depth - 2) * k  # this step's nodes' slots in the window
            local = torch.zeros(B, k, W, dtype=torch.bool)
            ids = [[0] * k for _ in range(B)]
            for s in range(B):
                for r in range(k):
                    if st[s] is None:  # an empty slot: each node sees only itself
                        local[s, r, base + r] = True
                        continue
                    node = frontier[s][r]
                    anc_slots[s][node] = anc_slots[s].get(parents[s][node], []) + [base + r]
                    local[s, r, anc_slots[s][node]] = True
                    ids[s][r] = tokens[s][node]
            pos = torch.tensor([h + depth - 2 for h in hl], device=dev)[:, None].expand(B, k)
            h, lg = self.head_steps(torch.tensor(ids, device=dev), cache=hcache, local_mask=local.to(dev), window=hl,
                                    hidden=front_hidden, position_ids=pos, starts=[x + base for x in hl])
            children = expand(lg, frontier, depth)
            best = [[] for _ in range(B)]
            idx = [[0] * k for _ in range(B)]
            for s in live:
                best[s] = children[s] if sampled_chain else sorted(children[s], key=lambda i: -scores[s][i])[:k]
                idx[s] = [frontier[s].index(parents[s][i]) for i in best[s]]
            front_hidden = h.gather(1, torch.tensor(idx, device=dev)[..., None].expand(-1, -1, h.shape[-1]))
            frontier = best
        if B == 1:
            hcache.length = hl[0]
        return [self._rerank(tokens[s], parents[s], depths[s], scores[s], q_rows[s] if sampled_chain else None)
                if st[s] is not None else None for s in range(B)]

    def _rerank(self, tokens: list[int], parents: list[int], depths: list[int], scores: list[float],
                q_rows: list[torch.Tensor] | None) -> DraftTree:
        """The total_tokens - 1 best nodes by cumulative log-prob, parents always included."""
        chosen: set[int] = set()
        for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i])):
            if len(chosen) == self.total_tokens - 1:
                break
            if parents[i] == -1 or parents[i] in chosen:
                chosen.add(i)
        keep = sorted(chosen)
        fed_index = {node: j for j, node in enumerate(keep)}
        return DraftTree(tokens=[tokens[i] for i in keep],
                         parents=[-1 if parents[i] == -1 else fed_index[parents[i]] for i in keep],
                         depths=[depths[i] for i in keep],
                         draft_probs=torch.stack(q_rows) if q_rows is not None else None)

    def _verify_chains(self, rows: list[Row | None], trees: list[DraftTree | None], fed: torch.Tensor,
                       logits: torch.Tensor) -> list[list[int]]:
        """Chains (tree=False), every row at once: `decoding.verify_chain` (greedy, or speculative
        sampling against the head's proposal rows with each row's own generator) on the device, one
        host read. fed [B, n] = [root | chain | padding]; logits [B, n, V]. Per row [n accepted, token]."""
        sp = self._sp
        drafts = fed[:, 1:]
        nv = [len(t.tokens) if t is not None else 0 for t in trees]
        if sp.greedy:
            n, tok = verify_chain(drafts, logits, n_valid=nv)
        else:
            q = stack_rows([t.draft_probs if t is not None else None for t in trees], drafts.shape[1])
            n, tok = verify_chain(drafts, warp_probs(logits, sp), q, n_valid=nv,
                                  generators=[r.gen if r is not None else None for r in rows])
        return torch.stack([n, tok], 1).tolist()

    def _verify(self, logits: torch.Tensor, best: list[int] | None, fed_tokens: list[int], tree: DraftTree,
                gen) -> tuple[list[int], int]:
        """One row of a tree: (accepted path of fed indices, starting with the root; the target's next
        token). logits [n, V] of the fed nodes (padding after them); best: their argmax (greedy). The
        tree walk is its own rule (several candidates per node), not `decoding.verify_chain`."""
        children = tree.children()
        if best is None:
            return tree_sample_walk(fed_tokens, children, warp_probs(logits, self._sp), gen)
        path = [0]
        while True:
            nxt = next((c for c in children[path[-1]] if fed_tokens[c] == best[path[-1]]), None)
            if nxt is None:
                return path, best[path[-1]]
            path.append(nxt)


@register_decoder("eagle", needs_draft=True,
                  help="EAGLE-style speculative decoding: one-layer draft head (--draft DIR, EAGLE-3 layout), "
                       "dynamic draft tree verified in one target forward")
def build(ctx: DecoderContext, *, tree: bool = True, depth: int = 6, top_k: int = 4, total_tokens: int = 32,
          chain_length: int = 5, compile: str = "auto") -> EagleDecoder:
    head = load_eagle_head(ctx.draft_path, ctx.model)
    return EagleDecoder(ctx.model, head, ctx.tokenizer, tree=tree, depth=depth, top_k=top_k,
                        total_tokens=total_tokens, chain_length=chain_length, compile=compile)
