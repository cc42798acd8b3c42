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

Options (`tidar_options.TidarOptions`, docs/tidar.md): `block_size` k, `beta` (verification target =
beta*p_AR + (1-beta)*q_diffusion at the draft positions; beta < 1 is lossy), `max_blocks` (fewer
pre-draft blocks for large k, spent on the likeliest outcomes), `mode="diffusion"` (pure block
diffusion of the same checkpoint, no AR verification; lossy): a decoder of its own,
`tidar_diffusion.TidarDiffusionDecoder`, built by the same factory (and by `TidarDecoder(mode=...)`).

The TiDAR authors' own decoding rules (their SGLang worker) are options of this decoder, each off by
default and each LOSSY when on; they live in `tidar_authors` (`rule=authors` / `authors-greedy` and
their parts: first_token, prefill, ar_ratio, accept, draft_penalty, t0_as_t1), called from here only
when on. A preset checkpoint's convention is checked by `checkpoint.convention_check`.

Written once over B rows (`tidar_bench.engine.RowDecoder`; batch 1 is B = 1): every row keeps its
own cache length, drafts and outcomes; a step feeds all rows at their own offsets. Batch 1 eager
feeds each step's exact layout; compiled, or at B > 1, every row feeds the padded layout
(`masks.tidar_padded_step`: one shape, so rows stack and one graph serves every step). Verification
is `decoding.verify_chain` over the whole batch on the device (greedy, or exact speculative sampling
with each row's own generator), read back once per step (`_verify`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import tidar_authors as authors
from .checkpoint import TidarConfig, check_preset
from .decoding import GenerationConfig, next_token, sample, stack_rows, verify_chain, warp_probs
from .engine import Row, Step
from .masks import TidarStepLayout, tidar_first_step, tidar_padded_step
from .registry import DecoderContext, register_decoder
from .tidar_base import StepShape, TidarBase
from .tidar_diffusion import TidarDiffusionDecoder

log = logging.getLogger(__name__)


@dataclass
class _TidarRow:
    """A row's state between steps: its newest committed token t (KV not cached yet) and the drafts
    that follow it (device tensors), with what their verification needs."""

    t: int
    drafts: torch.Tensor  # [m]
    draft_logits: torch.Tensor
    draft_probs: torch.Tensor | None
    conf: Any  # each draft's diffusion probability (max_blocks ranks outcomes by it): host list or tensor


class TidarDecoder(TidarBase):
    """TiDAR decoding; `options`: `TidarOptions` fields. `mode="diffusion"` builds a
    `tidar_diffusion.TidarDiffusionDecoder` instead (the same options, a decoder of its own)."""

    def __new__(cls, *args, **options):
        if cls is TidarDecoder and options.get("mode") == "diffusion":
            return TidarDiffusionDecoder(*args, **options)
        return super().__new__(cls)

    def __init__(self, model, tokenizer=None, **options):
        super().__init__(model, tokenizer, **options)
        # compiled mode and B > 1 feed one fixed step shape: x + k-1 draft slots + n_blocks blocks of k
        self.n_blocks = self.o.n_blocks
        self.step_rows = self.k * (self.k + 1)  # the most tokens a row feeds in a step

    # ------------------------------------------------------------------------- shapes

    def _shape(self, m: int, outcomes: tuple[int, ...], padded: bool = False) -> StepShape:
        key = (m, outcomes, padded)
        shape = self._shapes.get(key)
        if shape is None:
            layout = (tidar_padded_step(self.k, self.n_blocks, outcomes) if padded
                      else TidarStepLayout(0, m, self.k, outcomes))
            shape = self._shapes[key] = self._make_shape(layout)
        return shape

    def _make_shape(self, layout: TidarStepLayout, prefill: bool = False) -> StepShape:
        """Logits rows: the causal rows (verification; only the last one at prefill) and block
        offsets 1..k-1 (next drafts; from offset 0 when the authors' options read it)."""
        rows = [layout.n_causal - 1] if prefill else list(range(layout.n_causal))
        for b in range(len(layout.outcomes)):
            rows += range(layout.block_start(b) + 1 - self.o.offset0, layout.block_start(b) + self.k)
        return self._layout_shape(layout, rows, 1 if prefill else layout.n_causal)

    # ------------------------------------------------------------------------- B rows (tidar_bench.engine)

    def check_batch(self, config: GenerationConfig, batch_size: int) -> str | None:
        o = self.o
        if o.draft_penalty != 1.0 and not authors.sampling(config.sampling, o.t0_as_t1).greedy and o.accept == "auto":
            return "draft_penalty needs argmax drafts: greedy decoding, accept=match or accept=ratio"
        return None

    def begin(self, batch: int, config: GenerationConfig) -> None:
        """Per-call state: the sampling rule, and the step buffers of B rows. Batch 1 eager feeds each
        step's exact layout; compiled or B > 1 the padded one (`masks.tidar_padded_step`: one shape
        for every row and step, so rows stack)."""
        k = self.k
        self._sp = authors.sampling(config.sampling, self.o.t0_as_t1)
        self._padded = batch > 1 or self.runner.compiled
        self._buffers(batch, k * (k + 1), k + self.n_blocks * k)

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        o, cache, k, dev, sp = self.o, caches["target"], self.k, self.model.device, self._sp
        if row.gen is None and (not sp.greedy or o.accept == "ratio"):  # our seeded generator, repeatable
            row.gen = torch.Generator(device=dev).manual_seed(sp.seed if sp.seed is not None else o.seed)
        L = len(prompt)
        # prefill: prompt causal + one pre-draft block at position L (where the first token goes)
        if o.prefill == "two":
            logits = authors.prefill_two(self.model, cache, prompt, self.mask_id, k, o.offset0)
            fed, forwards = [L, k], 2
        else:
            first = tidar_first_step(L, k, dev)
            logits = self._prefill(cache, prompt, self._make_shape(first, prefill=True))
            fed, forwards = first.n_fed, 1
        # the authors commit the block's offset 0 (unverified; LOSSY); we commit the AR token
        t = int(logits[1].argmax()) if o.first_token == "diffusion" else int(next_token(logits[0], sp, row.gen))
        row.state = _TidarRow(t, *self._draft(logits[1 + o.offset0 :], sp, row.gen, t))
        return Step([t], fed=fed, advance=L, forwards=forwards)  # the block's KV is dropped: the next step starts at L

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        k, o0, sp = self.k, self.o.offset0, self._sp
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
        logits = self._forward(caches["target"], rows, ids, {s: p[2] for s, p in plans.items()}, shape)
        V = logits.shape[-1]
        ar = logits[:, : shape.causal_rows]
        nb = self.n_blocks if self._padded else len(plans[0][1])
        blocks = logits[:, shape.causal_rows :].view(B, nb, k - 1 + o0, V)
        verdicts = self._verify(rows, plans, ids, ar, blocks)
        out: list[Step | None] = [None] * B
        for s in live:
            row, st, (m, outcomes, sh) = rows[s], rows[s].state, plans[s]
            n, t, accepted, conf = verdicts[s]
            # keep x + accepted drafts; t's KV is computed next step
            out[s] = Step(accepted + [t], fed=sh.n, accepted=n + 1, advance=n + 1)
            st.t = t
            if n in outcomes:  # block n starts at t's position: offsets 1..k-1 are the next drafts
                b = outcomes.index(n)
                st.drafts, st.draft_logits, st.draft_probs, st.conf = self._draft(blocks[s, b, o0:], sp, row.gen, t)
                if conf is not None:
                    st.conf = conf[b]
            else:  # no block for this outcome (max_blocks): the next step verifies nothing
                st.drafts, st.draft_logits, st.draft_probs, st.conf = self._draft(logits[s, :0], sp, row.gen)
        return out

    def _verify(self, rows, plans, ids, ar, blocks) -> dict:
        """Verification of every row: per row (n accepted, the token kept after them, the accepted
        drafts, the blocks' draft confidences or None). The rule is `decoding.verify_chain` over the
        whole batch on the device (greedy or accept=match: argmax match; sampling: exact speculative
        sampling with each row's generator), then ONE host read of n, the token, the fed drafts,
        block offset 0's argmax (first_token=diffusion) and each block's draft confidences (argmax
        drafts under max_blocks: what `_draft` ranks outcomes by, read now, not next step).
        Target (`_target`): AR, or the options' mixes (beta, ar_ratio; lossy). The authors' LOSSY
        choices stay apart (`tidar_authors`): accept=ratio (`verify_ratio`, per row, no residual) and
        first_token=diffusion (the token kept is block n's offset-0 argmax, never verified)."""
        o, k, o0, sp = self.o, self.k, self.o.offset0, self._sp
        B, c, nb = ar.shape[0], ar.shape[1], blocks.shape[1]
        target = self._target(rows, plans, ar, blocks)  # [B, c, V]
        if o.accept == "ratio":
            return authors.verify_ratio(rows, plans, target, blocks, sp, o.first_token)
        drafts = ids[:, 1:c]  # the fed drafts (padding after each row's m)
        nv = [plans[s][0] if s in plans else 0 for s in range(B)]
        argmax = sp.greedy or o.accept == "match"
        if argmax:
            n, t = verify_chain(drafts, target, n_valid=nv)
        else:
            q = stack_rows([rows[s].state.draft_probs if s in plans else None for s in range(B)], c - 1)
            n, t = verify_chain(drafts, warp_probs(target, sp), q, n_valid=nv,
                                generators=[r.gen if r is not None else None for r in rows])
        pieces = [n[:, None], t[:, None], drafts]
        if o.first_token == "diffusion":
            pieces.append(authors.offset0_token(blocks))
        confs = argmax and o.max_blocks is not None and o.draft_penalty == 1.0
        if confs:
            pieces.append(blocks[:, :, o0:].softmax(-1).amax(-1).flatten(1))
        host = torch.cat([p.double() for p in pieces], 1).tolist()  # [B, ...]; token ids are exact in float64
        verdicts = {}
        for s in plans:
            h = host[s]
            n_s, rest = int(h[0]), h[1 + c :]
            t_s = int(rest[n_s]) if o.first_token == "diffusion" else int(h[1])
            conf = [rest[b * (k - 1) : (b + 1) * (k - 1)] for b in range(nb)] if confs else None
            verdicts[s] = (n_s, t_s, [int(x) for x in h[2 : 2 + n_s]], conf)
        return verdicts

    def _target(self, rows, plans, ar: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The verification logits [B, c, V]: the AR rows (the exact rule), or under the LOSSY options
        the authors' logit mix with each outcome's block offset 0 (ar_ratio < 1, `tidar_authors.logit_mix`)
        or each row's beta mix with its drafting rows (`tidar_authors.mixed_target`)."""
        o = self.o
        if o.ar_ratio < 1.0:
            return authors.logit_mix(ar, blocks, o.ar_ratio)
        if o.beta == 1.0:
            return ar
        target = ar.clone()
        for s, (m, _, _) in plans.items():
            if m:
                target[s, : m + 1] = authors.mixed_target(ar[s, : m + 1], rows[s].state.draft_logits, o.beta)
        return target

    def _draft(self, block_logits: torch.Tensor, sp, gen, first: int | None = None):
        """Drafts from a pre-draft block's logits at offsets 1..k-1 [k-1, V]: argmax (greedy) or
        samples from the warped diffusion distribution (kept for verification). `conf` is the
        diffusion probability of each draft, used only to rank outcomes under max_blocks. The
        authors' (LOSSY): accept=ratio drafts argmax with q at temperature 1 (`tidar_authors.ratio_drafts`);
        draft_penalty != 1 picks them one offset at a time, each row penalised for the tokens before
        it in the block (`first`, the committed token at offset 0, then the earlier picks;
        `tidar_authors.penalised`), as their variant C does."""
        o = self.o
        if block_logits.shape[0] == 0:
            return block_logits.argmax(-1), block_logits, block_logits, None
        if o.draft_penalty != 1.0:
            block_logits = authors.penalised(block_logits, first, o.draft_penalty)
        if o.accept == "ratio":
            return authors.ratio_drafts(block_logits)
        if sp.greedy or o.accept == "match":
            probs = None
            drafts = block_logits.argmax(-1)
            conf = block_logits.softmax(-1).amax(-1) if o.max_blocks is not None else None
        else:
            probs = warp_probs(block_logits, sp)
            drafts = sample(probs, gen)
            conf = probs.gather(-1, drafts[:, None]).squeeze(-1)
        return drafts, block_logits, probs, conf

    def _outcomes(self, m: int, conf) -> tuple[int, ...]:
        """Which outcomes j (= drafts accepted) get a pre-draft block: all 0..m, or under
        max_blocks the j = m block plus the likeliest others. P(exactly j) is estimated as
        a_1..a_j (1 - a_{j+1}) with a_i the diffusion probability of draft i as a stand-in for
        its acceptance probability (independence assumed). `conf`: a host list (read with the
        step's verification) or a device tensor (one small host read)."""
        if self.o.max_blocks is None or m + 1 <= self.o.max_blocks:
            return tuple(range(m + 1))
        a = conf if isinstance(conf, list) else conf.tolist()
        prefix, probs = 1.0, []
        for j in range(m):
            probs.append(prefix * (1.0 - a[j]))
            prefix *= a[j]
        ranked = sorted(range(m), key=lambda j: -probs[j])[: self.o.max_blocks - 1]
        return tuple(sorted(ranked + [m]))


@register_decoder("tidar", help="TiDAR: diffusion drafts + AR verification in one forward per step "
                  "(options: block_size, beta, max_blocks, mode=tidar|diffusion, steps, compile; the authors' "
                  "lossy rules: rule=exact|authors|authors-greedy, first_token=ar|diffusion, prefill=one|two, "
                  "ar_ratio, accept=auto|match|ratio, draft_penalty, t0_as_t1, seed; preset=tidar-lm for the "
                  "authors' released checkpoints, recognised from their architectures)")
def build(ctx: DecoderContext, *, block_size: int | None = None, beta: float = 1.0,
          max_blocks: int | None = None, mode: str = "tidar", steps: int | None = None,
          compile: str = "auto", rule: str = "exact", first_token: str | None = None, prefill: str | None = None,
          ar_ratio: float | None = None, accept: str | None = None, draft_penalty: float | None = None,
          t0_as_t1: bool | None = None, seed: int = 0, preset: str | None = None) -> TidarBase:
    options = dict(locals())  # every keyword option but preset is a TidarOptions field
    del options["ctx"], options["preset"]
    cfg, source = TidarConfig.resolve(ctx.model_path, preset)
    log.info(f"tidar: mask_token_id {cfg.mask_token_id}, block_size {cfg.block_size} from {source}")
    check = check_preset(ctx.model, ctx.tokenizer, cfg, source, ctx.model_path)
    if block_size is None:
        options["block_size"] = cfg.block_size
    dec = TidarDecoder(ctx.model, ctx.tokenizer, mask_token_id=cfg.mask_token_id, **options)
    dec.config_source, dec.convention_check = source, check
    return dec
