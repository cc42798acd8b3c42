"""DFlash (arXiv 2602.06036, reference code z-lab/dflash): speculative decoding with a small
block-diffusion drafter conditioned on the target's hidden features. Lossless: greedy output ==
AR greedy, sampling keeps the target distribution. Details and choices: docs/dflash.md.

The drafter (`DFlashDrafter`) and its checkpoint formats (z-lab, speculators DFlash / DSpark;
`load_dflash_drafter`) are in `baselines/dflash_drafter.py`: its layers read the target's hidden
features of the committed positions (KV injection) and, from a block [newest committed token,
MASK x (B-1)] at positions P..P+B-1, propose B-1 tokens in one forward (row i predicts position P+i).

Decoding step (cache invariant as in TiDAR / EAGLE: the target cache holds every committed token
except the newest, x, at position P; the drafter cache holds the context entries of positions the
drafter has absorbed, the rest of the committed features arrive with the next step; the prefill
absorbs the prompt's context but its last position). Each step runs over B rows at once
(`tidar_bench.engine`, batch 1 = B = 1), every row at its own offsets:
  1. drafter forward over [pending context features | x, MASK..] -> drafts d_1..d_{B-1};
     the block's drafter KV is dropped at once (only context entries stay);
  2. ONE target forward over [x, d_1..d_{B-1}] (causal, positions P..P+B-1, hidden states at the
     feature layers): row i verifies d_{i+1}, row B-1 gives the bonus;
  3. `decoding.verify_chain` over all rows on the device, one host read: greedy, the longest prefix
     equal to the target argmax + the target's token there; sampling (each row with its own
     generator), exact speculative sampling with the proposal the drafts came from (the drafter's
     warped distribution, or a point mass on its argmax, as in the reference code, which drafts
     argmax at any temperature);
  4. the row's target length becomes P+j+1 (x + the j accepted drafts); their features (rows 0..j)
     are the next step's pending context; commit d_1..d_j + the target's token.
Stats: nfe (target forwards), draft_forwards (one per step), accepted lengths = accepted + 1.

speculators drafters decode with the same step: a reduced draft vocabulary maps draft ids to target
ids (`d2t`); `sample_from_anchor` (DSpark's default) drafts B tokens, not B-1; DSpark's Markov head
makes the drafts chosen left to right, and sampled drafts keep their exact proposal rows, so
speculative sampling stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidar_bench.baselines.dflash_drafter import DFlashDrafter, load_dflash_drafter, target_context
from tidar_bench.cache import KVCache
from tidar_bench.compiled import steps_for
from tidar_bench.decoding import GenerationConfig, next_token, sample, verify_chain, warp_probs
from tidar_bench.engine import Row, RowDecoder, Step
from tidar_bench.errors import UserError
from tidar_bench.registry import DecoderContext, register_decoder, resolve_model


@dataclass
class _RowState:
    dlen: int  # drafter cache: context entries of positions 0..dlen-1 absorbed; dlen..length-1 pending


class DFlashDecoder(RowDecoder):
    """Written over B rows (`tidar_bench.engine`; batch 1 is B = 1). Per row: `row.length` = P (the
    target cache holds every committed token but the newest), its drafter cache length `dlen` and
    its pending context, the verification features of its last step (rows 0..length-dlen-1 valid);
    every step is one drafter forward and one target forward over all rows, each at its own offsets.
    The prompt's context (all but its last position) is absorbed into the drafter cache by the
    prefill (a drafter forward with one throw-away block row, part of the prefill time), so every
    step feeds 1..nv context rows, padded to nv in the static form: one step shape, compiled or not."""

    name = "dflash"
    lossless = True

    def __init__(self, model, drafter: DFlashDrafter, tokenizer=None, *, block_size: int | None = None,
                 draft_sample: bool = False, compile: str = "off"):
        drafter.check_target(model)
        self.model, self.drafter, self.tokenizer = model, drafter, tokenizer
        self.block_size = block_size or drafter.block_size
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        self.draft_sample = draft_sample
        self.layers = list(drafter.target_layer_ids)
        # anchor-first drafters (sample_from_anchor) draft from every block row, others from rows 1..B-1
        self.first_row = 0 if drafter.config.sample_from_anchor else 1
        self.nv = self.block_size + 1 - self.first_row  # verification: [x, drafts]; also the most pending context
        self.step_rows = self.nv + 2 * self.block_size  # the drafter step writes nv context rows + the block
        # compiled mode: two fixed shapes, the verification (nv tokens) and the drafter step (nv context
        # rows, padded, + the block). See tidar_bench/compiled.py. Sliding-window drafters run their
        # (small) drafter steps uncompiled (batch 1: eager; B > 1: the static form).
        self.target_steps = steps_for(model, model, compile)
        self.draft_steps = steps_for(model, drafter, "off" if drafter.config.sliding_layers else compile)

    def options(self) -> dict:
        c = self.drafter.config
        o = {"block_size": self.block_size, "draft_layers": len(self.drafter.layers),
             "target_layers": self.layers, "draft_sample": self.draft_sample,
             "compile": self.target_steps.compiled}
        if c.format != "zlab-dflash":
            o.update(format=c.format, draft_vocab_size=c.draft_vocab_size, sample_from_anchor=c.sample_from_anchor,
                     markov_rank=c.markov_rank, sliding_layers=c.sliding_layers)
        return o

    def runners(self) -> list:
        return [self.target_steps, self.draft_steps]

    def new_caches(self, batch: int, max_len: int, reuse: dict) -> dict:
        return {"target": self.model.new_cache(max_len, batch=batch, reuse=reuse.get("target")),
                "draft": self.drafter.new_cache(max_len, reuse=reuse.get("draft"), batch=batch)}

    def begin(self, batch: int, config: GenerationConfig) -> None:
        dev, bs = self.model.device, self.block_size
        self._sp = config.sampling
        F = len(self.layers) * self.model.config.hidden_size
        # device state of the B rows: the block each drafts from ([newest token, MASK..]), the pending
        # context (the last verification's features) and the offsets of the static steps
        self._block = torch.full((batch, bs), int(self.drafter.mask_token_id), dtype=torch.long, device=dev)
        self._ctx = torch.zeros(batch, self.nv, F, dtype=self.model.dtype, device=dev)
        n = self.nv + bs
        self._local = torch.eye(n, dtype=torch.bool, device=dev).repeat(batch, 1, 1)  # rows: see `_draft`
        self._local[:, self.nv:, self.nv:] = True
        self._ar_ctx = torch.arange(self.nv, device=dev)
        self._ar_blk = torch.arange(bs, device=dev)
        self._ar_ver = torch.arange(self.nv, device=dev)

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        model, dev, L = self.model, self.model.device, len(prompt)
        out = model(torch.tensor([prompt], device=dev), cache=caches["target"], hidden_layers=self.layers,
                    logits_index=slice(-1, None))
        tok = next_token(out.logits[0, -1], self._sp, row.gen)
        ctx = target_context(out.hidden_states, self.layers)  # [1, L, F]
        if L > 1:  # the drafter absorbs the context of positions 0..L-2 (the block row is thrown away)
            self.drafter(model.model.embed_tokens(tok.view(1, 1)), ctx[:, :-1], torch.arange(L, device=dev),
                         cache=caches["draft"])
            caches["draft"].crop(L - 1)
        row.state = _RowState(L - 1)
        self._block[row.slot, 0] = tok
        self._ctx[row.slot, :1] = ctx[0, -1:]
        return Step([int(tok)], fed=L, advance=L)

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        model, drafter, sp, nv = self.model, self.drafter, self._sp, self.nv
        live = [(s, r) for s, r in enumerate(rows) if r is not None]
        P = [r.length if r is not None else 0 for r in rows]
        D = [r.state.dlen if r is not None else 0 for r in rows]
        DP = torch.tensor([D, P], device=self._block.device)  # the rows' offsets on the device: one copy
        # 1. the drafter: every row's pending context + its block -> drafts (and their proposal rows)
        states = self._draft(caches["draft"], model.model.embed_tokens(self._block), self._ctx, P, D, DP)
        anchor = self._block[:, 0]
        drafts, q = self._choose(drafter.draft_logits(states[:, self.first_row:], model), anchor, rows)
        # 2. one target forward over [x, drafts] of every row at its own offset
        out = self.target_steps(torch.cat([anchor[:, None], drafts], 1), DP[1][:, None] + self._ar_ver,
                                cache=caches["target"], hidden_layers=self.layers, starts=P, start=DP[1])
        # 3. verification of every row on the device (`decoding.verify_chain`: greedy, or speculative
        # sampling with each row's own generator): n accepted drafts + the target's token, one host read
        if q is None:
            n, nxt = verify_chain(drafts, out.logits)
        else:
            n, nxt = verify_chain(drafts, warp_probs(out.logits, sp), q,
                                  generators=[r.gen if r is not None else None for r in rows])
        host = torch.cat([n[:, None], nxt[:, None], drafts], 1).tolist()
        self._block[:, 0] = nxt
        self._ctx = target_context(out.hidden_states, self.layers)  # the next step's pending context
        out: list[Step | None] = [None] * len(rows)
        for s, row in live:
            k, t = host[s][0], host[s][1]
            row.state.dlen = P[s]
            # x + the k accepted drafts are kept; the target's token is the new x
            out[s] = Step(host[s][2: 2 + k] + [t], fed=nv, accepted=k + 1, advance=k + 1, draft_forwards=1)
        return out

    def _choose(self, logits: torch.Tensor, anchor: torch.Tensor,
                rows: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(drafts [B, r] as target ids, their proposal rows [B, r, V] over the target vocabulary or
        None when greedy) from the block rows' draft logits [B, r, Vd]. With a Markov head row k's
        logits are biased by the token before the one it predicts, so the drafts are chosen left to
        right; a sampled draft's row is the exact distribution it was drawn from (what
        verify_chain needs), drawn with its row's own generator."""
        d, sp = self.drafter, self._sp
        sampled = not sp.greedy and self.draft_sample

        def draw(probs):  # one draw per live row, from its own generator (an empty slot draws nothing)
            return torch.stack([sample(probs[s], r.gen) if r is not None else probs[s].argmax(-1)
                                for s, r in enumerate(rows)])

        if d.markov_head is None:
            q = warp_probs(logits, sp) if sampled else None
            ids = draw(q) if sampled else logits.argmax(-1)
        else:
            prev, picked, qs = anchor, [], []
            for k in range(logits.shape[1]):
                lg = logits[:, k] + d.markov_head(prev)
                if sampled:
                    qs.append(warp_probs(lg, sp))
                    picked.append(draw(qs[-1]))
                else:
                    picked.append(lg.argmax(-1))
                prev = d.to_target(picked[-1])
            ids = torch.stack(picked, 1)
            q = torch.stack(qs, 1) if sampled else None
        drafts = d.to_target(ids)
        if sp.greedy:
            return drafts, None
        V = self.model.config.vocab_size
        if q is None:  # argmax drafts: a point-mass proposal (the reference's rule)
            return drafts, torch.nn.functional.one_hot(drafts, V).float()
        if d.lm_head is not None:  # draft vocabulary -> target vocabulary
            full = q.new_zeros(*q.shape[:-1], V)
            full[..., d.to_target(torch.arange(q.shape[-1], device=q.device))] = q
            q = full
        return drafts, q

    def _draft(self, dcache: KVCache, block_emb: torch.Tensor, ctx: torch.Tensor, P: list[int], D: list[int],
               DP: torch.Tensor | None = None) -> torch.Tensor:
        """One drafter forward over every row's [pending context | block]: row s has the context of
        positions D[s]..P[s]-1 in ctx[s, :P[s]-D[s]] and its block at P[s]..P[s]+block_size-1;
        returns the block states [B, block_size, H]. Afterwards row s of the drafter cache holds the
        context entries of positions 0..P[s]-1 (the block's entries are left past them, unread).
        Batch 1 eager: the live rows only, as the model core's eager forward. Otherwise the static
        form: the context padded to nv rows (pad rows see only themselves and nobody sees them), a
        block row sees its row's cached context, its c context rows and the whole block."""
        bs, nv, dev = self.block_size, self.nv, block_emb.device
        if dcache.batch == 1 and not self.draft_steps.compiled:
            dcache.length = D[0]
            states = self.drafter(block_emb, ctx[:, : P[0] - D[0]], torch.arange(D[0], P[0] + bs, device=dev),
                                  cache=dcache)
        else:
            if ctx.shape[1] < nv:
                ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], nv - ctx.shape[1], ctx.shape[2])], 1)
            if DP is None:
                DP = torch.tensor([D, P], device=dev)  # [2, B]
            c = DP[1] - DP[0]
            self._local[:, nv:, :nv] = self._ar_ctx[None, None, :] < c[:, None, None]
            pos = torch.cat([DP[0][:, None] + self._ar_ctx, DP[1][:, None] + self._ar_blk], 1)
            states = self.draft_steps(block_emb, ctx, pos, cache=dcache, local_mask=self._local, q=nv + bs,
                                      starts=D, start=DP[0])
        dcache.length = P[0]  # batch 1: the absorbed context (the block's entries are dropped)
        return states


@register_decoder("dflash",
                  help="DFlash: a block-diffusion drafter (--draft DIR or dflash.draft=DIR, official DFlash layout) "
                       "conditioned on the target's features proposes a block in one forward; the target verifies it")
def build(ctx: DecoderContext, *, block_size: int | None = None, draft_sample: bool = False,
          draft: str | None = None, compile: str = "auto") -> DFlashDecoder:
    """`draft` (a folder or hub id) overrides --draft, so one run can hold eagle (--draft HEAD) and dflash
    side by side."""
    path = resolve_model(draft, "dflash.draft") if draft else ctx.draft_path
    if path is None:
        raise UserError("decoder 'dflash' needs a drafter: pass --draft DIR or --decoder-arg dflash.draft=DIR")
    drafter = load_dflash_drafter(path, ctx.model)
    return DFlashDecoder(ctx.model, drafter, ctx.tokenizer, block_size=block_size, draft_sample=draft_sample,
                         compile=compile)
