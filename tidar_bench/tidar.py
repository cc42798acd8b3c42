"""TiDAR decoding (arXiv 2511.08923): one model, drafting in diffusion and verifying in AR, in
ONE forward per step.

Step layout (`masks.TidarStepLayout`, P = cache length, k = block size):

    fed = [x, d_1..d_m | block_0 | block_1 | ... ]   (one k-long mask block per outcome j)
           causal        block j starts at position P+j+1 and sees cache + x + d_1..d_j

x is the newest committed token (its KV is not cached yet), d_i are last step's drafts. The causal
rows give the AR distributions that verify d_1..d_m (row m is the bonus position). If j drafts are
accepted, the AR head's token at the first rejected / bonus position (position P+j+1) is always
kept, so block j, which starts exactly there, is the one whose predictions at offsets 1..k-1 become
the next k-1 drafts. Then the cache is cropped to P+j+1 (x + accepted drafts): the rejected drafts
and every mask block are evicted, and the cache again equals a causal prefill of all committed
tokens except the newest. The prefill is `masks.tidar_first_step`: prompt + one block.

Options (see docs/tidar.md): `block_size` k, `beta` (verification target = beta*p_AR +
(1-beta)*q_diffusion at the draft positions; beta < 1 is lossy), `max_blocks` (fewer pre-draft
blocks for large k, spent on the likeliest outcomes), `mode="diffusion"` (pure block diffusion of
the same checkpoint, `steps` denoising forwards per block, no AR verification; lossy).

The TiDAR authors' own decoding rules (their SGLang worker, ../shared/reference/tidar-official.md
sections 3-4 and 6) are options of this decoder, each off by default and each LOSSY when on, so their
released checkpoints can be decoded both exactly and the way their authors do:
`first_token=diffusion` (commit block n's offset-0 argmax unverified, also at prefill), `prefill=two`
(a causal prefill, then the block alone; timing only), `ar_ratio=r` (verify against
r*AR + (1-r)*diffusion logits, the diffusion row being the current step's block offset 0),
`accept=match|ratio` (argmax match whatever the temperature, or p/q >= u without residual, drafts
argmax with q at temperature 1), `draft_penalty` (repetition penalty within a block's drafts) and
`t0_as_t1` (temperature 0 run as temperature 1, as SGLang does). `rule=authors` / `authors-greedy`
set them as the release worker (B) / the older greedy worker (A) does; options given explicitly win.

Written once over B rows (`tidar_bench.engine.RowDecoder`; batch 1 is B = 1): every row keeps its
own cache length, drafts and outcomes; a step feeds all rows at their own offsets. Batch 1 eager
feeds each step's exact layout; compiled, or at B > 1, every row feeds the padded layout
(`_padded_shape`: one shape, so rows stack and one graph serves every step). Verification is
`decoding.verify_chain` over the whole batch on the device (greedy, or exact speculative sampling
with each row's own generator), read back once per step (`_verify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .checkpoint import TidarConfig
from .compiled import steps_for
from .decoding import (GenerationConfig, next_token, ratio_verify, repetition_penalty, sample, stack_rows,
                       verify_chain, warp_probs)
from .engine import Row, RowDecoder, inert_local
from .errors import UserError
from .masks import TidarStepLayout, tidar_first_step, tidar_step
from .registry import DecoderContext, register_decoder

MODES = ("tidar", "diffusion")

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


@dataclass
class _StepShape:
    """Everything about a step that depends only on (m, outcomes), not on the cache length P:
    cached once per shape and shifted by P each step."""

    n: int  # tokens fed
    local_mask: torch.Tensor  # [n, n] the fed-to-fed part of the mask (the cache part is all True)
    rel_positions: torch.Tensor  # [n] positions relative to P
    logits_index: torch.Tensor  # which fed rows get logits
    causal_rows: int  # logits rows of the causal segment (m + 1; k in the padded layout)


@dataclass
class _TidarRow:
    """A row's state between steps: its newest committed token t (KV not cached yet) and the drafts
    that follow it (device tensors), with what their verification needs."""

    t: int
    drafts: torch.Tensor  # [m]
    draft_logits: torch.Tensor
    draft_probs: torch.Tensor | None
    conf: Any  # each draft's diffusion probability (max_blocks ranks outcomes by it): host list or tensor
    history: list[int] | None = None  # prompt + committed tokens, kept only for `on_step`


@dataclass
class _DiffusionRow:
    block: torch.Tensor  # [k] the block being denoised (mask ids where unknown)
    masked: torch.Tensor  # [k] bool
    remaining: int
    it: int = 0  # denoising forwards spent on this block
    commit: bool = False  # finished: the next forward commits it and starts the next block


class TidarDecoder(RowDecoder):
    name = "tidar"

    def __init__(self, model, tokenizer=None, *, mask_token_id: int, block_size: int = 8, beta: float = 1.0,
                 max_blocks: int | None = None, mode: str = "tidar", steps: int | None = None,
                 compile: str = "off", rule: str = "exact", first_token: str | None = None,
                 prefill: str | None = None, ar_ratio: float | None = None, accept: str | None = None,
                 draft_penalty: float | None = None, t0_as_t1: bool | None = None, seed: int = 0):
        vocab = model.config.vocab_size
        if not 0 <= mask_token_id < vocab:
            raise UserError(f"mask_token_id {mask_token_id} outside the vocabulary [0, {vocab})")
        if block_size < 1:
            raise UserError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= beta <= 1.0:
            raise UserError(f"beta must be in [0, 1], got {beta}")
        if max_blocks is not None and max_blocks < 1:
            raise UserError(f"max_blocks must be >= 1 (or None for one block per outcome), got {max_blocks}")
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if steps is not None and not 1 <= steps <= block_size:
            raise UserError(f"steps must be in [1, block_size={block_size}], got {steps}")
        if rule not in RULES:
            raise UserError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        given = dict(first_token=first_token, prefill=prefill, ar_ratio=ar_ratio, accept=accept,
                     draft_penalty=draft_penalty, t0_as_t1=t0_as_t1)
        rv = {k: (RULES[rule][k] if v is None else v) for k, v in given.items()}
        for k, ok in CHOICES.items():
            if rv[k] not in ok:
                raise UserError(f"{k} must be one of {', '.join(ok)}, got {rv[k]!r}")
        if not 0.0 <= rv["ar_ratio"] <= 1.0:
            raise UserError(f"ar_ratio must be in [0, 1], got {rv['ar_ratio']}")
        if rv["draft_penalty"] <= 0:
            raise UserError(f"draft_penalty must be > 0, got {rv['draft_penalty']}")
        self.rule = rule
        self.first_token, self.prefill_rule, self.ar_ratio = rv["first_token"], rv["prefill"], rv["ar_ratio"]
        self.accept, self.draft_penalty, self.t0_as_t1 = rv["accept"], rv["draft_penalty"], rv["t0_as_t1"]
        self.seed = seed
        # exact: every rule option at its exact value (prefill=two changes the timing only); offset-0
        # rows are needed when the first token or the verification target comes from the blocks
        self._plain = rv == RULES["exact"] | {"prefill": rv["prefill"]}
        self._offset0 = int(self.first_token == "diffusion" or self.ar_ratio < 1.0)
        if self._offset0 and max_blocks is not None:
            raise UserError("first_token=diffusion and ar_ratio < 1 read every outcome's block (the authors' "
                            "layout): drop max_blocks")
        if self.ar_ratio < 1.0 and beta < 1.0:
            raise UserError("ar_ratio (logit-space mix with the current block) and beta (probability-space mix with "
                            "the drafting row) are two different mixes: set one")
        if mode == "diffusion" and (rv != RULES["exact"]):
            raise UserError("the authors' rule options apply to mode=tidar only")
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = mask_token_id
        self.k = block_size
        self.beta = beta
        self.max_blocks = max_blocks
        self.mode = mode
        self.steps = steps if steps is not None else block_size
        # tests observe every TiDAR step: on_step(cache, prompt + committed tokens)
        self.on_step: Callable | None = None
        self._shapes: dict[tuple, _StepShape] = {}
        self.runner = steps_for(model, model, compile)
        # compiled mode and B > 1 feed one fixed step shape: x + k-1 draft slots + n_blocks blocks of k
        self.n_blocks = min(block_size, max_blocks or block_size)
        self.step_rows = block_size * (block_size + 1)  # the most tokens a row feeds in a step

    @property
    def lossless(self) -> bool:
        return self.mode == "tidar" and self.beta == 1.0 and self._plain

    config_source: str | None = None  # where mask_token_id and block_size came from (set by the factory)
    convention_check: dict | None = None  # `convention_check` of a preset checkpoint

    def options(self) -> dict:
        opts = {"mode": self.mode, "block_size": self.k, "mask_token_id": self.mask_id, "lossless": self.lossless,
                "compile": self.runner.compiled, "config_source": self.config_source,
                "convention_check": self.convention_check}
        if self.mode == "tidar":
            opts.update(beta=self.beta, max_blocks=self.max_blocks, drafts_per_step=self.k - 1, rule=self.rule,
                        first_token=self.first_token, prefill=self.prefill_rule, ar_ratio=self.ar_ratio,
                        accept=self.accept, draft_penalty=self.draft_penalty, t0_as_t1=self.t0_as_t1,
                        seed=self.seed)
        else:
            opts.update(steps=self.steps)
        return opts

    # ------------------------------------------------------------------------- buffers

    def _shape(self, m: int, outcomes: tuple[int, ...], padded: bool = False, diffusion: bool = False) -> _StepShape:
        key = (m, outcomes, padded, diffusion)
        shape = self._shapes.get(key)
        if shape is None:
            if padded and not diffusion:
                shape = self._padded_shape(m, outcomes)
            else:
                shape = self._make_shape(TidarStepLayout(0, m, self.k, outcomes), diffusion)
            self._shapes[key] = shape
        return shape

    def _make_shape(self, layout: TidarStepLayout, diffusion: bool, prefill: bool = False) -> _StepShape:
        """Logits rows. TiDAR: the causal rows (verification; only the last one at prefill) and
        block offsets 1..k-1 (next drafts; from offset 0 when the authors' options read it).
        Diffusion: every row of the (single) block."""
        dev = self.model.device
        k = self.k
        if diffusion:
            rows = list(range(layout.block_start(0), layout.block_start(0) + k))
        else:
            rows = [layout.n_causal - 1] if prefill else list(range(layout.n_causal))
            for b in range(len(layout.outcomes)):
                rows += range(layout.block_start(b) + 1 - self._offset0, layout.block_start(b) + k)
        return _StepShape(layout.n_fed, tidar_step(layout, dev), layout.positions(dev),
                          torch.tensor(rows, dtype=torch.long, device=dev), 1 if prefill else layout.n_causal)

    def _padded_shape(self, m: int, outcomes: tuple[int, ...]) -> _StepShape:
        """The compiled (and B > 1) step: always k causal slots (x, the m drafts, then padding that no real row
        attends to and nothing verifies) and `n_blocks` blocks of k (block b serves outcomes[b]
        exactly as in `tidar_step`; unused blocks see x and themselves and are ignored), so every
        step has one shape and only the mask and positions (device tensors) change."""
        k, nb, dev = self.k, self.n_blocks, self.model.device
        n = k + nb * k
        local = torch.zeros(n, n, dtype=torch.bool, device=dev)
        local[:k, :k] = torch.ones(k, k, dtype=torch.bool, device=dev).tril()
        pos = torch.zeros(n, dtype=torch.long, device=dev)
        pos[:k] = torch.arange(k, device=dev)
        rows = list(range(k))
        for b in range(nb):
            s = k + b * k
            j = outcomes[b] if b < len(outcomes) else 0
            local[s : s + k, : j + 1] = True  # x and the first j drafts
            local[s : s + k, s : s + k] = True  # own block, bidirectional
            pos[s : s + k] = torch.arange(j + 1, j + 1 + k, device=dev)
            rows += range(s + 1 - self._offset0, s + k)
        return _StepShape(n, local, pos, torch.tensor(rows, dtype=torch.long, device=dev), k)

    def _forward(self, cache, ids: torch.Tensor, pos: torch.Tensor, local: torch.Tensor, shape: _StepShape,
                 starts: list[int]) -> torch.Tensor:
        """One step of `ids` [B, n] over every row, row b at its own offset starts[b] (mask: [all
        cached | local [n, n] or per row [B, n, n]]; eager or compiled, see tidar_bench/compiled.py).
        Logits [B, rows, V]."""
        return self.runner(ids, pos, cache=cache, local_mask=local, logits_index=shape.logits_index,
                           starts=starts).logits

    def _prefill(self, cache, prompt: list[int], shape: _StepShape) -> torch.Tensor:
        """The first forward (variable length, so eager in both modes, at batch 1): prompt + one block."""
        ids = torch.tensor([prompt + [self.mask_id] * self.k], device=self.model.device)
        return self.model(ids, shape.rel_positions, shape.local_mask, cache, logits_index=shape.logits_index).logits[0]

    # ------------------------------------------------------------------------- B rows (tidar_bench.engine)

    def runners(self) -> list:
        return [self.runner]

    def _sampling(self, config: GenerationConfig):
        sp = config.sampling
        if self.t0_as_t1 and sp.greedy:  # SGLang: temperature 0 -> 1 (its top_k = 1 is ignored by the worker)
            sp = replace(sp, temperature=1.0)
        return sp

    def check_batch(self, config: GenerationConfig, batch_size: int) -> str | None:
        if self.draft_penalty != 1.0 and not self._sampling(config).greedy and self.accept == "auto":
            return "draft_penalty needs argmax drafts: greedy decoding, accept=match or accept=ratio"
        return None

    def begin(self, batch: int, config: GenerationConfig) -> None:
        """Per-call state: the sampling rule, and the step buffers of B rows. Batch 1 eager feeds each
        step's exact layout; compiled or B > 1 the padded one (`_padded_shape`: one shape for every
        row and step, so rows stack; diffusion pads a denoising block to the commit step's 2k)."""
        dev, k = self.model.device, self.k
        self._sp = self._sampling(config)
        self._padded = batch > 1 or (self.runner.compiled and self.mode == "tidar")
        self._ids = torch.full((batch, 2 * k if self.mode == "diffusion" else k * (k + 1)), self.mask_id, device=dev)
        if batch > 1:  # per-row positions and local masks of the padded step (an empty slot's tokens see only themselves)
            n = 2 * k if self.mode == "diffusion" else k + self.n_blocks * k
            self._pos = torch.zeros(batch, n, dtype=torch.long, device=dev)
            self._local = inert_local(n, batch, dev)
            self._eye = self._local[0].clone()

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> list[int]:
        if self.mode == "diffusion":
            return self._prefill_diffusion(row, prompt, caches["target"])
        cache, k, dev, o0, sp = caches["target"], self.k, self.model.device, self._offset0, self._sp
        if row.gen is None and (not sp.greedy or self.accept == "ratio"):  # our seeded generator, repeatable
            row.gen = torch.Generator(device=dev).manual_seed(sp.seed if sp.seed is not None else self.seed)
        L, stats = len(prompt), row.stats
        # prefill: prompt causal + one pre-draft block at position L (where the first token goes)
        if self.prefill_rule == "two":
            logits = self._prefill_two(cache, prompt)
            stats.nfe, stats.prefill_forwards, stats.tokens_fed = 2, 2, [L, k]
        else:
            first = tidar_first_step(L, k, dev)
            logits = self._prefill(cache, prompt, self._make_shape(first, diffusion=False, prefill=True))
            stats.nfe, stats.tokens_fed = 1, [first.n_fed]
        # the authors commit the block's offset 0 (unverified); we commit the AR token
        t = int(logits[1].argmax()) if self.first_token == "diffusion" else int(next_token(logits[0], sp, row.gen))
        row.length = L  # the block's KV is dropped: the next step starts at L
        row.state = _TidarRow(t, *self._draft(logits[1 + o0 :], sp, row.gen, t),
                              history=list(prompt) + [t] if self.on_step is not None else None)
        return [t]

    def step(self, rows: list[Row | None]) -> list[list[int] | None]:
        if self.mode == "diffusion":
            return self._step_diffusion(rows)
        k, o0, sp, cache = self.k, self._offset0, self._sp, self.caches["target"]
        B = len(rows)
        live = [s for s, r in enumerate(rows) if r is not None]
        plans = {}
        for s in live:
            st = rows[s].state
            m = st.drafts.shape[0]
            outcomes = self._outcomes(m, st.conf)
            plans[s] = (m, outcomes, self._shape(m, outcomes, self._padded))
        shape = plans[live[0]][2]  # B > 1: every row has the padded shape's n and logits rows
        ids = self._ids[:, : shape.n]
        for s in live:
            st, (m, _, sh) = rows[s].state, plans[s]
            ids[s, 0] = st.t
            ids[s, 1 : 1 + m] = st.drafts
            ids[s, 1 + m :] = self.mask_id
        if B == 1:
            row = rows[0]
            if self.on_step is not None:  # tests observe every step: the cache as the row sees it
                cache.length = row.length
                self.on_step(cache, row.state.history)
            pos, local = shape.rel_positions + row.length, shape.local_mask
        else:
            pos, local = self._pos, self._local
            for s in range(B):
                if s in plans:
                    torch.add(plans[s][2].rel_positions, rows[s].length, out=pos[s])
                    local[s].copy_(plans[s][2].local_mask)
                else:
                    local[s].copy_(self._eye)
        logits = self._forward(cache, ids, pos, local, shape, [r.length if r is not None else 0 for r in rows])
        V = logits.shape[-1]
        ar = logits[:, : shape.causal_rows]
        nb = self.n_blocks if self._padded else len(plans[0][1])
        blocks = logits[:, shape.causal_rows :].view(B, nb, k - 1 + o0, V)
        verdicts = self._verify(rows, plans, ids, ar, blocks)
        out: list[list[int] | None] = [None] * B
        for s in live:
            row, st, (m, outcomes, sh) = rows[s], rows[s].state, plans[s]
            n, t, accepted, conf = verdicts[s]
            out[s] = accepted + [t]
            row.stats.nfe += 1
            row.stats.tokens_fed.append(sh.n)
            row.stats.accepted_lengths.append(n + 1)
            row.length += n + 1  # keep x + accepted drafts; t's KV is computed next step
            st.t = t
            if st.history is not None:
                st.history += out[s]
            if n in outcomes:  # block n starts at t's position: offsets 1..k-1 are the next drafts
                b = outcomes.index(n)
                st.drafts, st.draft_logits, st.draft_probs, st.conf = self._draft(blocks[s, b, o0:], sp, row.gen, t)
                if conf is not None:
                    st.conf = conf[b]
            else:  # no block for this outcome (max_blocks): the next step verifies nothing
                st.drafts, st.draft_logits, st.draft_probs, st.conf = self._draft(logits[s, :0], sp, row.gen)
        if B == 1:
            cache.length = rows[0].length
        return out

    def _verify(self, rows, plans, ids, ar, blocks) -> dict:
        """Verification of every row: per row (n accepted, the token kept after them, the accepted
        drafts, the blocks' draft confidences or None). The rule is `decoding.verify_chain` over the
        whole batch on the device (greedy or accept=match: argmax match; sampling: exact speculative
        sampling with each row's generator), then ONE host read of n, the token, the fed drafts,
        block offset 0's argmax (first_token=diffusion) and each block's draft confidences (argmax
        drafts under max_blocks: what `_draft` ranks outcomes by, read now, not next step).
        Target (`_target`): AR, or the options' mixes (beta, ar_ratio; lossy). The authors' LOSSY
        choices stay apart: accept=ratio (`decoding.ratio_verify`, per row, no residual) and
        first_token=diffusion (the token kept is block n's offset-0 argmax, never verified)."""
        k, o0, sp = self.k, self._offset0, self._sp
        B, c, nb = ar.shape[0], ar.shape[1], blocks.shape[1]
        target = self._target(rows, plans, ar, blocks)  # [B, c, V]
        if self.accept == "ratio":
            return self._verify_ratio(rows, plans, target, blocks)
        drafts = ids[:, 1:c]  # the fed drafts (padding after each row's m)
        nv = [plans[s][0] if s in plans else 0 for s in range(B)]
        argmax = sp.greedy or self.accept == "match"
        if argmax:
            n, t = verify_chain(drafts, target, n_valid=nv)
        else:
            q = stack_rows([rows[s].state.draft_probs if s in plans else None for s in range(B)], c - 1)
            n, t = verify_chain(drafts, warp_probs(target, sp), q, n_valid=nv,
                                generators=[r.gen if r is not None else None for r in rows])
        pieces = [n[:, None], t[:, None], drafts]
        if self.first_token == "diffusion":
            pieces.append(blocks[:, :, 0].argmax(-1))
        confs = argmax and self.max_blocks is not None and self.draft_penalty == 1.0
        if confs:
            pieces.append(blocks[:, :, o0:].softmax(-1).amax(-1).flatten(1))
        host = torch.cat([p.double() for p in pieces], 1).tolist()  # [B, ...]; token ids are exact in float64
        verdicts = {}
        for s in plans:
            h = host[s]
            n_s, rest = int(h[0]), h[1 + c :]
            t_s = int(rest[n_s]) if self.first_token == "diffusion" else int(h[1])
            conf = [rest[b * (k - 1) : (b + 1) * (k - 1)] for b in range(nb)] if confs else None
            verdicts[s] = (n_s, t_s, [int(x) for x in h[2 : 2 + n_s]], conf)
        return verdicts

    def _target(self, rows, plans, ar: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The verification logits [B, c, V]: the AR rows (the exact rule), or under the lossy options
        r*AR + (1-r)*(block j offset 0) logits (ar_ratio; row j <-> the block of outcome j: both
        predict position P+j+1, the block sees one more committed token than the row that drafted
        d_{j+1}), or each row's beta mix with its drafting rows (`_mixed_target`)."""
        if self.ar_ratio < 1.0:  # the authors' logit mix with each outcome's block offset 0 (all blocks present)
            return self.ar_ratio * ar + (1.0 - self.ar_ratio) * blocks[:, : ar.shape[1], 0]
        if self.beta == 1.0:
            return ar
        target = ar.clone()
        for s, (m, _, _) in plans.items():
            if m:
                target[s, : m + 1] = self._mixed_target(ar[s, : m + 1], rows[s].state.draft_logits)
        return target

    def _verify_ratio(self, rows, plans, target, blocks) -> dict:
        """accept=ratio, the authors' release worker (LOSSY, per row): `decoding.ratio_verify` (p/q >= u,
        no residual); the token kept is a sample of the target there (no residual) or, with
        first_token=diffusion, block n's offset-0 argmax."""
        verdicts = {}
        for s, (m, _, _) in plans.items():
            st, gen = rows[s].state, rows[s].gen
            p = warp_probs(target[s, : m + 1], self._sp)
            n = ratio_verify(st.drafts, st.draft_probs, p, gen)
            t = int(blocks[s, n, 0].argmax()) if self.first_token == "diffusion" else int(sample(p[n], gen))
            verdicts[s] = (n, t, st.drafts[:n].tolist(), None)
        return verdicts

    def _prefill_two(self, cache, prompt: list[int]) -> torch.Tensor:
        """The authors' prefill (tidar-official.md section 3): a causal forward of the prompt (its
        last AR row kept), then the k masks alone at positions L..L+k-1, each seeing the whole prompt
        and the whole block; their KV is dropped by the caller's crop. Same rows as `_prefill`."""
        dev, k, L = self.model.device, self.k, len(prompt)
        ar = self.model(torch.tensor([prompt], device=dev), cache=cache, logits_index=torch.tensor([L - 1], device=dev))
        ids = torch.full((1, k), self.mask_id, device=dev)
        mask = torch.ones(k, L + k, dtype=torch.bool, device=dev)
        blk = self.model(ids, torch.arange(L, L + k, device=dev), mask, cache,
                         logits_index=torch.arange(1 - self._offset0, k, device=dev))
        return torch.cat([ar.logits[0], blk.logits[0]])

    def _draft(self, block_logits: torch.Tensor, sp, gen, first: int | None = None):
        """Drafts from a pre-draft block's logits at offsets 1..k-1 [k-1, V]: argmax (greedy) or
        samples from the warped diffusion distribution (kept for verification). `conf` is the
        diffusion probability of each draft, used only to rank outcomes under max_blocks.
        accept=ratio (the authors'): argmax drafts, each with its probability q at temperature 1.
        draft_penalty != 1: the drafts are picked one offset at a time, each row's logits penalised
        for the tokens before it in the block (`first`, the committed token at offset 0, then the
        earlier picks), as the authors' variant C does."""
        if block_logits.shape[0] == 0:
            return block_logits.argmax(-1), block_logits, block_logits, None
        if self.draft_penalty != 1.0:
            block_logits = self._penalised(block_logits, first)
        if self.accept == "ratio":
            drafts = block_logits.argmax(-1)
            q = block_logits.softmax(-1).gather(-1, drafts[:, None]).squeeze(-1)
            return drafts, block_logits, q, q
        if sp.greedy or self.accept == "match":
            probs = None
            drafts = block_logits.argmax(-1)
            conf = block_logits.softmax(-1).amax(-1) if self.max_blocks is not None else None
        else:
            probs = warp_probs(block_logits, sp)
            drafts = sample(probs, gen)
            conf = probs.gather(-1, drafts[:, None]).squeeze(-1)
        return drafts, block_logits, probs, conf

    def _penalised(self, block_logits: torch.Tensor, first: int) -> torch.Tensor:
        """Rows of `block_logits` with the repetition penalty applied sequentially: row o is penalised
        for the offset-0 token and the argmax picks of the rows before it (penalised themselves)."""
        rows, ctx = [], torch.tensor([first], device=block_logits.device)
        for row in block_logits:
            row = repetition_penalty(row, ctx, self.draft_penalty)
            rows.append(row)
            ctx = torch.cat([ctx, row.argmax()[None]])
        return torch.stack(rows)

    def _mixed_target(self, ar_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
        """Verification logits: log(beta*p_AR + (1-beta)*q_diff) at the m draft positions (raw
        distributions, warped afterwards like any logits); the bonus row stays pure AR."""
        m = draft_logits.shape[0]
        mix = self.beta * ar_logits[:m].softmax(-1) + (1.0 - self.beta) * draft_logits.softmax(-1)
        return torch.cat([mix.clamp_min(1e-30).log(), ar_logits[m:]])

    def _outcomes(self, m: int, conf) -> tuple[int, ...]:
        """Which outcomes j (= drafts accepted) get a pre-draft block: all 0..m, or under
        max_blocks the j = m block plus the likeliest others. P(exactly j) is estimated as
        a_1..a_j (1 - a_{j+1}) with a_i the diffusion probability of draft i as a stand-in for
        its acceptance probability (independence assumed). `conf`: a host list (read with the
        step's verification) or a device tensor (one small host read)."""
        if self.max_blocks is None or m + 1 <= self.max_blocks:
            return tuple(range(m + 1))
        a = conf if isinstance(conf, list) else conf.tolist()
        prefix, probs = 1.0, []
        for j in range(m):
            probs.append(prefix * (1.0 - a[j]))
            prefix *= a[j]
        ranked = sorted(range(m), key=lambda j: -probs[j])[: self.max_blocks - 1]
        return tuple(sorted(ranked + [m]))

    # ------------------------------------------------------------------------- pure diffusion

    def _diffusion_shapes(self) -> tuple[_StepShape, _StepShape]:
        """(commit, denoise) layouts. Commit: [block b | k masks] (m = k-1, one block): block b's KV
        is written causally and block b+1 starts. Denoise: the block alone, seeing the cache and all
        of itself; at B > 1 padded to the commit step's 2k as [k inert tokens | block], so both have
        their block's logits in rows k..2k-1 and rows stack (the pads' KV lands after the row's
        committed length and is never kept)."""
        key = ("diffusion", self._padded)
        if key not in self._shapes:
            k, dev = self.k, self.model.device
            commit = self._shape(k - 1, (k - 1,), diffusion=True)
            if self._padded:
                local = torch.eye(2 * k, dtype=torch.bool, device=dev)
                local[k:, k:] = True
                pos = torch.arange(k, device=dev).repeat(2)
                denoise = _StepShape(2 * k, local, pos, commit.logits_index, k)
            else:
                denoise = _StepShape(k, torch.ones(k, k, dtype=torch.bool, device=dev), torch.arange(k, device=dev),
                                     torch.arange(k, device=dev), 0)
            self._shapes[key] = (commit, denoise)
        return self._shapes[key]

    def _prefill_diffusion(self, row: Row, prompt: list[int], cache) -> list[int]:
        """Block-by-block iterative denoising with the diffusion rows only (no AR verification).
        Each block of k masks (seeing every committed token before it, as in training) takes
        `steps` forwards; each unmasks the most confident still-masked positions (ceil of the
        remaining / steps left). The forward that starts block b+1 also writes block b's KV
        causally (the same one-step layout as TiDAR with m = k-1 and one block). Per row, a step
        is one of those forwards; a finished block is committed to the output at once."""
        k, dev, L = self.k, self.model.device, len(prompt)
        first = tidar_first_step(L, k, dev)
        logits = self._prefill(cache, prompt, self._make_shape(first, diffusion=True))
        row.stats.nfe, row.stats.tokens_fed = 1, [first.n_fed]
        row.length = L
        row.state = _DiffusionRow(torch.full((k,), self.mask_id, device=dev), torch.ones(k, dtype=torch.bool, device=dev), k)
        return self._denoised(row, logits, count=False)

    def _denoised(self, row: Row, logits: torch.Tensor, count: bool = True) -> list[int]:
        """Unmask this forward's share of the row's block; a finished block is its output."""
        st = row.state
        u = math.ceil(st.remaining / (self.steps - st.it))
        self._unmask(logits, st.block, st.masked, u, self._sp, row.gen)
        st.remaining -= u
        st.it += 1
        if count:  # the prefill's own unmasking is not a decoding step
            row.stats.accepted_lengths.append(u)
        if st.it < self.steps:
            return []
        st.commit = True
        return st.block.tolist()

    def _step_diffusion(self, rows: list[Row | None]) -> list[list[int] | None]:
        k, cache, B = self.k, self.caches["target"], len(rows)
        commit, denoise = self._diffusion_shapes()
        ids = self._ids
        plans = {}
        for s, row in enumerate(rows):
            if row is None:
                continue
            st = row.state
            sh = commit if st.commit else denoise
            at = 0 if st.commit or B == 1 else k  # where the block goes among the fed tokens
            ids[s, at : at + k] = st.block
            ids[s, k - at : 2 * k - at] = self.mask_id
            plans[s] = sh
        if B == 1:
            sh = plans[0]
            pos, local = sh.rel_positions + rows[0].length, sh.local_mask
        else:
            sh, pos, local = commit, self._pos, self._local
            for s in range(B):
                if s in plans:
                    torch.add(plans[s].rel_positions, rows[s].length, out=pos[s])
                    local[s].copy_(plans[s].local_mask)
                else:
                    local[s].copy_(self._eye)
        logits = self._forward(cache, ids[:, : sh.n], pos, local, sh, [r.length if r is not None else 0 for r in rows])
        out: list[list[int] | None] = [None] * B
        for s, psh in plans.items():
            row, st = rows[s], rows[s].state
            row.stats.nfe += 1
            row.stats.tokens_fed.append(psh.n)
            if st.commit:  # block b's KV kept; block b+1 starts from this forward's logits
                row.length += k
                st.block.fill_(self.mask_id)
                st.masked.fill_(True)
                st.remaining, st.it, st.commit = k, 0, False
            out[s] = self._denoised(row, logits[s])
        if B == 1:
            cache.length = rows[0].length
        return out

    @staticmethod
    def _unmask(logits, block, masked, u, sp, gen) -> None:
        """Fill the u most confident masked positions of `block` in place."""
        if sp.greedy:
            probs = logits.softmax(-1)
            tokens = probs.argmax(-1)
        else:
            probs = warp_probs(logits, sp)
            tokens = sample(probs, gen)
        conf = probs.gather(-1, tokens[:, None]).squeeze(-1).masked_fill(~masked, -1.0)
        idx = conf.topk(u).indices
        block[idx] = tokens[idx]
        masked[idx] = False


CHECK_TEXTS = ("The capital of France is", "def fibonacci(n):\n    ", "Question: Tom has 3 apples and buys 5 more. "
               "How many apples does he have?\nAnswer:", "In 1905, Albert Einstein published")


@torch.inference_mode()
def convention_check(model, mask_id: int, k: int, prompts: list[list[int]]) -> dict:
    """Do the checkpoint's mask tokens predict their own position (our convention and, by their
    inference code, the authors') or the next one? Per prompt: the prefill block's offset-0 argmax
    (position L) against the AR argmax for position L (prompt's last row) and for L+1 (after feeding
    that AR token). Two forwards per prompt, no cache."""
    same = nxt = 0
    dev = model.device
    for p in prompts:
        lay = tidar_first_step(len(p), k, dev)
        ids = torch.tensor([p + [mask_id] * k], device=dev)
        logits = model(ids, lay.positions(dev), tidar_step(lay, dev)).logits[0]
        a_l, d0 = int(logits[len(p) - 1].argmax()), int(logits[len(p)].argmax())
        a_next = int(model(torch.tensor([p + [a_l]], device=dev)).logits[0, -1].argmax())
        same += d0 == a_l
        nxt += d0 == a_next
    n = len(prompts)
    verdict = "looks shifted by one position" if nxt > same else "unshifted"
    return {"prompts": n, "offset0_agrees_with_ar_same_position": same / n,
            "offset0_agrees_with_ar_next_position": nxt / n, "verdict": verdict}


def _check_prompts(tokenizer, vocab: int, mask_id: int) -> list[list[int]]:
    if tokenizer is not None:
        return [tokenizer.encode(t, add_special_tokens=False) for t in CHECK_TEXTS]
    g = torch.Generator().manual_seed(0)
    return [[int(x) % mask_id for x in torch.randint(0, vocab, (12,), generator=g)] for _ in CHECK_TEXTS]


@register_decoder("tidar", help="TiDAR: diffusion drafts + AR verification in one forward per step "
                  "(options: block_size, beta, max_blocks, mode=tidar|diffusion, steps, compile; the authors' "
                  "lossy rules: rule=exact|authors|authors-greedy, first_token=ar|diffusion, prefill=one|two, "
                  "ar_ratio, accept=auto|match|ratio, draft_penalty, t0_as_t1, seed; preset=tidar-lm for the "
                  "authors' released checkpoints, recognised from their architectures)")
def build(ctx: DecoderContext, *, block_size: int | None = None, beta: float = 1.0,
          max_blocks: int | None = None, mode: str = "tidar", steps: int | None = None,
          compile: str = "auto", rule: str = "exact", first_token: str | None = None, prefill: str | None = None,
          ar_ratio: float | None = None, accept: str | None = None, draft_penalty: float | None = None,
          t0_as_t1: bool | None = None, seed: int = 0, preset: str | None = None) -> TidarDecoder:
    import sys

    cfg, source = TidarConfig.resolve(ctx.model_path, preset)
    print(f"tidar: mask_token_id {cfg.mask_token_id}, block_size {cfg.block_size} from {source}", file=sys.stderr)
    check = None
    if source.startswith("preset"):  # someone else's checkpoint: is its diffusion convention ours?
        check = convention_check(ctx.model, cfg.mask_token_id, cfg.block_size,
                                 _check_prompts(ctx.tokenizer, ctx.model.config.vocab_size, cfg.mask_token_id))
        if check["verdict"] != "unshifted":
            print(f"warning: {ctx.model_path}: the prefill block's offset-0 argmax agrees with the AR argmax one position "
                  f"later ({check['offset0_agrees_with_ar_next_position']:.0%}) more than at its own position "
                  f"({check['offset0_agrees_with_ar_same_position']:.0%}): the checkpoint looks shifted by one",
                  file=sys.stderr)
    dec = TidarDecoder(ctx.model, ctx.tokenizer, mask_token_id=cfg.mask_token_id,
                        block_size=block_size if block_size is not None else cfg.block_size,
                        beta=beta, max_blocks=max_blocks, mode=mode, steps=steps, compile=compile, rule=rule,
                        first_token=first_token, prefill=prefill, ar_ratio=ar_ratio, accept=accept,
                        draft_penalty=draft_penalty, t0_as_t1=t0_as_t1, seed=seed)
    dec.config_source, dec.convention_check = source, check
    return dec
