"""Block diffusion decoding (BD3-LM; Fast-dLLM v2-style AR-initialised block diffusion).

Generation proceeds block by block. Blocks are aligned to absolute positions (block b covers
[b*B, (b+1)*B)), exactly as in training (`masks.block_diffusion_training`), so the committed
prefix is a block-causal prefix: every committed token attends to its own block bidirectionally
and to the blocks before it. The current block starts as B mask tokens and is denoised in
parallel steps against the cached prefix (`masks.block_diffusion_step`): each step runs the whole
block, and unmasks positions by confidence (p of the chosen token):

- threshold mode (default): every masked position with confidence >= `threshold`, at least the
  single most confident one (Fast-dLLM v2); `threshold=1` is one token per step;
- `steps=N`: a fixed N steps per block, ceil(masked / steps left) positions each, by confidence
  (`remasking=low_confidence`) or at random (`remasking=random`, LLaDA);
- `sub_block=s`: only the leftmost unfinished sub-block of s positions is eligible (Fast-dLLM v2's
  small blocks).

Prompt handling (as Fast-dLLM v2): the prompt's full blocks are the first committed blocks; its
last partial block (if any) becomes the head of the first generated block, known from the start
and never remasked. So no padding token is ever inserted and every block stays aligned.

Committing: a finished block's KV is written by a forward in which it attends to the cache and to
itself: the cache is always exactly a fresh block-causal prefill of the committed text.
- BD3-LM (token_shift=False): that forward also carries the next block's B masks (they see the
  cache and the finished block), so committing costs no extra forward.
- Token shift (token_shift=True, Fast-dLLM v2): the output at position i predicts token i+1. A
  block's position j is read from output j-1 of the same block, and its first token comes from
  the last output of the commit forward of the previous block (an AR step). The commit is then a
  forward of its own (counted in NFE, as Fast-dLLM v2 does).

The mask token's logit is set to -inf: it is never produced as an output token.

`block_cache=False` is the pure-diffusion setting: no KV cache; every forward recomputes the whole
committed prefix plus the current block under the block-causal mask (same outputs as with the
cache, more compute; with a large B this approximates LLaDA/Dream-style full-canvas decoding).

Stats: `nfe` counts every forward (prefill, denoising steps, commits); `accepted_lengths` holds,
per forward, the number of generated tokens it finalised (so its mean is tokens per forward);
`tokens_fed` the tokens per forward.

Written over B rows (`tidar_bench.engine`; batch 1 is B = 1): each row keeps its own committed
length, block, known positions and phase; a step feeds every row its own forward ([finished block |
block], the block alone, or the finished block alone to commit it) at its own aligned offset, padded
to the widest row (padding and empty slots see only themselves), and each row unmasks with the same
rule, its own sampling generator and its own remasking generator. Compiled, one graph per (B, width).

Fast-dLLM v2 checkpoints (Efficient-Large-Model/Fast_dLLM_v2_{1.5B,7B}): the architecture is
Qwen2 (QKV bias, GQA), so the weights load into our core; their config.json says
`model_type: "Fast_dLLM_Qwen"` and `bd_size: 32`. The model core reads such a directory as qwen2
(its alias table, `model.MODEL_TYPE_ALIASES`); the factory takes mask id
151665 (`|<MASK>|`), block size bd_size and token_shift=True, sub_block 8 by default. What fits:
token shift, aligned blocks with the prompt tail as first-block head, threshold decoding with
sub-blocks, the block-level cache and the separate commit forward. What does not: their
sub-block ("DualCache") KV cache that recomputes only the active sub-block (we rerun the whole
block each step: identical outputs, more compute) and the exact clean-stream
attention of their training (we assume BD3-LM block-causal, bidirectional inside a block; if their
clean stream is causal inside blocks the committed KV differs slightly). Not checked against the
real weights (no network here).

SDAR checkpoints (JetLM/SDAR-{1.7B,4B,8B}-Chat; JetAstra/SDAR `generate.py` and
`modeling_sdar.py`): the body is Qwen3 (`model_type: "sdar"`, loaded as qwen3 by the model core's
alias table), `block_size` and `mask_token_id` (151669, `<|MASK|>`) are in config.json, no token
shift. SDAR's decode rules are options (`remasking=`), each with SDAR's per-step count: `steps`
(default block_size) splits the *whole block* B into `B // steps` per step, the remainder first
(`get_num_transfer_tokens`), whatever the prompt tail already fills:
- `low_confidence_dynamic` (the default for SDAR checkpoints): every masked position with
  confidence strictly > `threshold`, if at least that step's count qualify; else the top count;
- `low_confidence_static`: the top count by confidence; `sequential`: the leftmost count.
Where SDAR's count exceeds the masked positions left, its `topk` over confidences that are -inf at
final positions also picks final positions and rewrites them with the current prediction (its
prompt tail included); we take only the masked ones, so final tokens are never rewritten. SDAR
commits a finished block with a forward of its own (`store_kv=True`) and prefills the prompt's full
blocks alone; `separate_commit=true` does the same (same tokens, one more forward per block), the
default merges each commit into the next block's first step. SDAR suppresses nothing: a position
that predicts `<|MASK|>` stays masked; here the mask token is never an output. Checked against
SDAR's own code: scripts/reference/sdar_check.py, results/reference/sdar.txt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tidar_bench.compiled import steps_for
from tidar_bench.decoding import GenerationConfig
from tidar_bench.engine import Row, RowDecoder, Step
from tidar_bench.errors import UserError
from tidar_bench.masks import block_causal, block_diffusion_step
from tidar_bench.registry import DecoderContext, register_decoder
from tidar_bench.training.block_diffusion import BDConfig
from tidar_bench.unmasking import pick, unmask_count, unmask_top

SDAR_REMASKING = ("low_confidence_dynamic", "low_confidence_static", "sequential")
REMASKING = ("low_confidence", "random") + SDAR_REMASKING
FAST_DLLM_MODEL_TYPE = "Fast_dLLM_Qwen"
SDAR_MODEL_TYPE = "sdar"
FAST_DLLM_MASK_ID = 151665
FAST_DLLM_SUB_BLOCK = 8


@dataclass
class _BlockRow:
    """One row's decoding state: what its next forward feeds, and the block being denoised."""

    ids: torch.Tensor  # the committed ids (recomputed without the cache)
    pending: torch.Tensor  # tokens the next forward commits (prompt blocks, or a finished block)
    block: torch.Tensor  # [B] the block being denoised (mask id where unknown)
    known: list[bool]
    emitted: int  # block positions already given to the stop checker
    commit: bool = False  # the next forward feeds `pending` alone (token shift's AR step, separate_commit)
    step: int = 0  # denoising forwards spent on this block
    rgen: torch.Generator | None = None  # remasking=random: the row's own generator


class BlockDiffusionDecoder(RowDecoder):
    name = "bd"
    lossless = False

    def __init__(self, model, tokenizer=None, *, mask_token_id: int, block_size: int = 32,
                 threshold: float = 0.9, steps: int | None = None, remasking: str = "low_confidence",
                 sub_block: int | None = None, block_cache: bool = True, token_shift: bool = False,
                 separate_commit: bool = False, compile: str = "off"):
        vocab = model.config.vocab_size
        if not 0 <= mask_token_id < vocab:
            raise UserError(f"mask_token_id {mask_token_id} outside the vocabulary [0, {vocab})")
        if block_size < 1 or (token_shift and block_size < 2):
            raise UserError(f"block_size must be >= {2 if token_shift else 1}, got {block_size}")
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"threshold must be in (0, 1], got {threshold}")
        if steps is not None and not 1 <= steps <= block_size:
            raise UserError(f"steps must be in [1, block_size={block_size}], got {steps}")
        if remasking not in REMASKING:
            raise UserError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
        if remasking == "random" and steps is None:
            raise UserError("remasking=random needs a fixed number of steps (steps=N); "
                            "the threshold rule is confidence-based")
        if remasking in SDAR_REMASKING and steps is None:
            steps = block_size  # SDAR's generate.py default: denoising_steps = block_length
        if sub_block is not None:
            if not 1 <= sub_block <= block_size or block_size % sub_block:
                raise UserError(f"sub_block must divide block_size={block_size}, got {sub_block}")
            if steps is not None:
                raise UserError("sub_block works with the threshold rule; do not combine it with steps "
                                "or an SDAR remasking rule")
        if separate_commit and (token_shift or not block_cache):
            raise UserError("separate_commit needs the block cache and no token shift (token-shift "
                            "commits are separate forwards already; without a cache nothing is committed)")
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = mask_token_id
        self.B = block_size
        self.threshold = threshold
        self.steps = steps
        self.remasking = remasking
        self.sub_block = sub_block
        self.block_cache = block_cache
        self.token_shift = token_shift
        self.separate_commit = separate_commit
        # SDAR's per-step counts: B // steps each, the remainder to the first steps
        self.step_counts = [block_size // steps + (i < block_size % steps) for i in range(steps)] if steps else []
        self.step_rows = 3 * block_size  # cache headroom: a row feeds at most [finished block | block]
        # compiled mode: the block steps (B or 2B tokens at a block-aligned offset) are fixed shapes,
        # one graph per (batch, width); the first forward (prompt blocks + block) and the no-cache
        # setting stay eager
        self.runner = steps_for(model, model, compile if block_cache else "off")
        self._local: dict = {}

    def options(self) -> dict:
        return {"block_size": self.B, "mask_token_id": self.mask_id, "threshold": self.threshold,
                "steps": self.steps, "remasking": self.remasking, "sub_block": self.sub_block,
                "block_cache": self.block_cache, "token_shift": self.token_shift,
                "separate_commit": self.separate_commit, "compile": self.runner.compiled}

    def runners(self) -> list:
        return [self.runner]

    def new_caches(self, batch: int, max_len: int, reuse: dict) -> dict:
        return super().new_caches(batch, max_len, reuse) if self.block_cache else {}

    def begin(self, batch: int, config: GenerationConfig) -> None:
        self._sp, self._max_new, self._batch = config.sampling, config.max_new_tokens, batch

    # ------------------------------------------------------------------------- rows

    def _new_block(self, head: list[int] | torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        block = torch.full((self.B,), self.mask_id, dtype=torch.long, device=self.model.device)
        block[: len(head)] = torch.as_tensor(head, dtype=torch.long, device=self.model.device)
        return block, [i < len(head) for i in range(self.B)]

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        """The first forward, eager at batch 1 (as Fast-dLLM v2): the prompt's full blocks are
        committed, its last partial block is the head of the first block. SDAR (separate_commit)
        prefills the full blocks alone; with token shift and no partial block, that forward is the
        AR step giving the first block's head."""
        B, dev, sp = self.B, self.model.device, self._sp
        L = len(prompt)
        base = (L // B) * B
        prompt_t = torch.tensor(prompt, dtype=torch.long, device=dev)
        block, known = self._new_block(prompt_t[base:])
        ids = torch.empty(L + self._max_new + 3 * B, dtype=torch.long, device=dev)
        rgen = None
        if self.remasking == "random":
            rgen = torch.Generator(device=dev).manual_seed(sp.seed if sp.seed is not None else 0)
        commit = bool(base) and (self.separate_commit or (self.token_shift and base == L))
        row.state = _BlockRow(ids, prompt_t[:base], block, known, L - base, commit, rgen=rgen)
        logits = self._forward1(row, caches.get("target"), first=True)
        return self._advance(row, logits)  # row.length is 0 until the engine books this

    def _forward1(self, row: Row, cache, first: bool = False) -> torch.Tensor:
        """The row's forward at batch 1 (the logits of the rows `_advance` reads): fed [pending |
        block] (or pending alone when committing) right after its P committed tokens, block-causal."""
        st, P, B = row.state, row.length, self.B
        p = st.pending.shape[0]
        fed = st.pending if st.commit else torch.cat([st.pending, st.block])
        n = fed.shape[0]
        rows = slice(p - 1, p) if st.commit else slice(p, p + B)
        if cache is not None and not first:  # a block step at an aligned offset: fixed shape
            if n not in self._local:
                self._local[n] = block_causal(n, B, 0, self.model.device)  # == the step mask at aligned P
            pos = torch.arange(P, P + n, device=self.model.device)
            out = self.runner(fed[None], pos, cache=cache, local_mask=self._local[n], logits_index=rows,
                              starts=[P]).logits[0]
        elif cache is not None:
            cache.length = P
            mask = block_diffusion_step(P, n, B, self.model.device)
            out = self.model(fed[None], mask=mask, cache=cache, logits_index=rows).logits[0]
        else:
            ids = torch.cat([st.ids[:P], fed])
            mask = block_causal(P + n, B, device=self.model.device)
            out = self.model(ids[None], mask=mask, logits_index=slice(P + rows.start, P + rows.stop)).logits[0]
        return out

    def _forward_rows(self, rows: list[Row | None], cache) -> torch.Tensor:
        """One forward of B > 1 rows, each its own [pending | block] (or pending alone) at its own
        offset, padded to the widest (padding and empty slots see only themselves; nobody reads
        them): logits [B, block, V] of each row's block (its committed block's when committing)."""
        B, dev, nb = self.B, self.model.device, len(rows)
        feds, los, starts = [], [], []
        for r in rows:
            st = r.state if r is not None else None
            if st is None:
                feds.append(None)
                los.append(0)
                starts.append(0)
                continue
            feds.append(st.pending if st.commit else torch.cat([st.pending, st.block]))
            los.append(0 if st.commit else st.pending.shape[0])
            starts.append(r.length if self.block_cache else 0)
        lens = [0 if f is None else f.shape[0] for f in feds]
        lead = [0] * nb if self.block_cache else [0 if r is None else r.length for r in rows]  # no cache: the committed ids first
        T = max(a + b for a, b in zip(lead, lens))
        pad = torch.full((T,), self.mask_id, dtype=torch.long, device=dev)
        ids = torch.stack([pad if f is None else torch.cat([r.state.ids[: lead[s]], f, pad[: T - lead[s] - f.shape[0]]])
                           for s, (r, f) in enumerate(zip(rows, feds))])
        local = torch.stack([self._row_local(lead[s] + lens[s], T) for s in range(nb)])
        idx = torch.stack([self._arange(lead[s] + los[s]) for s in range(nb)])
        if not self.block_cache:
            return self.model(ids, mask=local[:, None], logits_index=idx).logits
        start = torch.tensor(starts, dtype=torch.long, device=dev)
        pos = start[:, None] + self._arange(0, T)[None]
        return self.runner(ids, pos, cache=cache, local_mask=local, logits_index=idx, start=start,
                           starts=starts).logits

    def _row_local(self, n: int, T: int) -> torch.Tensor:
        """[T, T]: block-causal over a row's n fed tokens (at a block-aligned offset), every padding
        token sees only itself."""
        key = ("row", n, T)
        if key not in self._local:
            m = torch.eye(T, dtype=torch.bool, device=self.model.device)
            m[:n, :n] = block_causal(n, self.B, 0, self.model.device)
            self._local[key] = m
        return self._local[key]

    def _arange(self, lo: int, n: int | None = None) -> torch.Tensor:
        n = self.B if n is None else n
        key = ("arange", lo, n)
        if key not in self._local:
            self._local[key] = torch.arange(lo, lo + n, device=self.model.device)
        return self._local[key]

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        if len(rows) == 1:
            return [self._advance(rows[0], self._forward1(rows[0], caches.get("target")))]
        logits = self._forward_rows(rows, caches.get("target"))
        return [None if r is None else self._advance(r, logits[s]) for s, r in enumerate(rows)]

    def _advance(self, row: Row, logits: torch.Tensor) -> Step:
        """After a forward of the row: its pending tokens are committed (the fed block's KV past
        them is evicted: overwritten by the next step); a commit forward (token shift) gives the
        next block's head, a denoising forward unmasks by the rule; a finished block becomes the
        next forward's pending. Returns the row's Step (tokens: those it newly emits)."""
        st, B, sp = row.state, self.B, self._sp
        p = st.pending.shape[0]
        fed = p if st.commit else p + B
        if p:
            st.ids[row.length : row.length + p] = st.pending
            st.pending = st.pending[:0]
        logits[:, self.mask_id] = float("-inf")  # the mask token is never an output
        out: list[int] = []
        if st.commit:
            st.commit = False
            if self.token_shift:  # its last output is the next block's head (an AR step)
                head = int(self._pick(logits[-1:], sp, row.gen)[0][0])
                st.block[0] = head
                st.known[0] = True
                st.emitted = 1
                out = [head]
            accepted = len(out)
        else:
            if self.token_shift:  # output j-1 predicts position j (row 0 unused: always known)
                logits = torch.cat([logits[:1], logits[:-1]])
            idx = self._unmask(logits, st.block, st.known, st.step, sp, row.gen, st.rgen)
            st.step += 1
            accepted = len(idx)
            first_unknown = st.known.index(False) if not all(st.known) else B
            if first_unknown > st.emitted:
                out = st.block[st.emitted : first_unknown].tolist()
                st.emitted = first_unknown
            if first_unknown == B:  # finished: committed by the next forward
                st.pending = st.block
                st.block, st.known = self._new_block([])
                st.emitted, st.step = 0, 0
                st.commit = self.token_shift or self.separate_commit
        return Step(out, fed=fed, accepted=accepted, advance=p)

    # ------------------------------------------------------------------------- unmasking rule

    _pick = staticmethod(pick)

    def _unmask(self, logits, block, known: list[bool], step: int, sp, gen, rgen) -> list[int]:
        """Finalise some masked positions of `block` in place (and in `known`); returns them."""
        B = self.B
        eligible = [not k for k in known]
        if self.sub_block is not None:  # only the leftmost unfinished sub-block
            s = (known.index(False) // self.sub_block) * self.sub_block
            eligible = [e and s <= i < s + self.sub_block for i, e in enumerate(eligible)]
        elig = torch.tensor(eligible, device=block.device)
        if self.steps is not None and self.remasking not in SDAR_REMASKING:  # ceil(masked / steps left)
            score = torch.rand(B, generator=rgen, device=block.device) if self.remasking == "random" else None
            idx = unmask_top(logits, block, elig, unmask_count(sum(eligible), self.steps, step), sp, gen, score)
            return self._known(known, idx)
        tokens, conf = self._pick(logits, sp, gen)
        if self.remasking in SDAR_REMASKING:
            # SDAR's count for this step, capped at the masked positions (see the module docstring)
            n = min(self.step_counts[min(step, self.steps - 1)], int(elig.sum()))
            conf = conf.masked_fill(~elig, -1.0)
            if self.remasking == "sequential":
                idx = elig.nonzero().flatten()[:n]
            else:
                high = conf > self.threshold  # strict, as SDAR
                if self.remasking == "low_confidence_dynamic" and int(high.sum()) >= n:
                    idx = high.nonzero().flatten()
                else:
                    idx = conf.topk(n).indices
        else:
            conf = conf.masked_fill(~elig, -1.0)
            chosen = conf >= self.threshold
            chosen[conf.argmax()] = True
            idx = chosen.nonzero().flatten()
        block[idx] = tokens[idx]
        return self._known(known, idx)

    @staticmethod
    def _known(known: list[bool], idx: torch.Tensor) -> list[int]:
        out = idx.tolist()
        for i in out:
            known[i] = True
        return out


# ----------------------------------------------------------------------------- construction


def _bd_config(path: Path, raw: dict) -> tuple[BDConfig, dict]:
    """The block-diffusion settings a checkpoint states, and the decoder defaults they imply:
    `bd_config.json` (ours), a Fast_dLLM_Qwen config, or an SDAR config (see the module docstring)."""
    mt = raw.get("model_type")
    if BDConfig.exists(path):
        return BDConfig.load(path), {}
    if mt == FAST_DLLM_MODEL_TYPE:
        cfg = BDConfig(FAST_DLLM_MASK_ID, int(raw.get("bd_size", 32)), token_shift=True)
        return cfg, {"sub_block": FAST_DLLM_SUB_BLOCK}
    if mt == SDAR_MODEL_TYPE:
        arch = raw.get("architectures") or ["SDARForCausalLM"]
        if arch != ["SDARForCausalLM"]:
            raise UserError(f"{path}: SDAR architecture {arch} is not supported (only SDARForCausalLM)")
        missing = [k for k in ("mask_token_id", "block_size") if not isinstance(raw.get(k), int)]
        if missing:
            raise UserError(f"{path}: SDAR config.json lacks an integer {missing[0]}")
        cfg = BDConfig(raw["mask_token_id"], raw["block_size"], token_shift=False)
        return cfg, {"remasking": "low_confidence_dynamic"}
    return BDConfig.load(path), {}  # raises the "not a block-diffusion checkpoint" error


@register_decoder("bd", help="block diffusion (BD3-LM / Fast-dLLM v2 / SDAR): parallel denoising of B-token blocks "
                  "over a block-causal KV cache (options: block_size, threshold, steps, remasking, sub_block, "
                  "block_cache, token_shift, separate_commit)")
def build(ctx: DecoderContext, *, block_size: int | None = None, threshold: float = 0.9, steps: int | None = None,
          remasking: str | None = None, sub_block: int | None = None, block_cache: bool = True,
          token_shift: bool | None = None, separate_commit: bool = False,
          compile: str = "auto") -> BlockDiffusionDecoder:
    from tidar_bench.model import read_config

    path = Path(ctx.model_path)
    cfg, defaults = _bd_config(path, read_config(path))
    B = block_size if block_size is not None else cfg.block_size
    sub = defaults.get("sub_block")
    if sub and sub_block is None and steps is None and remasking in (None, "low_confidence") and B % sub == 0:
        sub_block = sub  # Fast-dLLM v2's small blocks
    return BlockDiffusionDecoder(
        ctx.model, ctx.tokenizer, mask_token_id=cfg.mask_token_id, block_size=B, threshold=threshold, steps=steps,
        remasking=remasking or defaults.get("remasking", "low_confidence"), sub_block=sub_block,
        block_cache=block_cache, token_shift=cfg.token_shift if token_shift is None else token_shift,
        separate_commit=separate_commit, compile=compile)
