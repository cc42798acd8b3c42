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
`tokens_fed` the tokens per forward. `last_block_steps` (on the decoder) is the number of
forwards spent on each block of the last call.

Fast-dLLM v2 checkpoints (Efficient-Large-Model/Fast_dLLM_v2_{1.5B,7B}): the architecture is
Qwen2 (QKV bias, GQA), so the weights load into our core; their config.json says
`model_type: "Fast_dLLM_Qwen"` and `bd_size: 32`. The factory reads such a directory as qwen2
(config patched in a temporary alias directory, no change to the model loader) with mask id
151665 (`|<MASK>|`), block size bd_size and token_shift=True, sub_block 8 by default. What fits:
token shift, aligned blocks with the prompt tail as first-block head, threshold decoding with
sub-blocks, the block-level cache and the separate commit forward. What does not: their
sub-block ("DualCache") KV cache that recomputes only the active sub-block (we rerun the whole
block each step: identical outputs, more compute), batched generation, and the exact clean-stream
attention of their training (we assume BD3-LM block-causal, bidirectional inside a block; if their
clean stream is causal inside blocks the committed KV differs slightly). Not checked against the
real weights (no network here).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from tidar_bench.compiled import steps_for
from tidar_bench.decoding import CachedDecoder, DecodeRun, Generation, GenerationConfig, sample, warp_probs
from tidar_bench.errors import UserError
from tidar_bench.masks import block_causal, block_diffusion_step
from tidar_bench.registry import DecoderContext, register_decoder
from tidar_bench.training.block_diffusion import BDConfig

REMASKING = ("low_confidence", "random")
FAST_DLLM_MODEL_TYPE = "Fast_dLLM_Qwen"
FAST_DLLM_MASK_ID = 151665
FAST_DLLM_SUB_BLOCK = 8


class BlockDiffusionDecoder(CachedDecoder):
    name = "bd"
    lossless = False

    def __init__(self, model, tokenizer=None, *, mask_token_id: int, block_size: int = 32,
                 threshold: float = 0.9, steps: int | None = None, remasking: str = "low_confidence",
                 sub_block: int | None = None, block_cache: bool = True, token_shift: bool = False,
                 compile: str = "off"):
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
        if sub_block is not None:
            if not 1 <= sub_block <= block_size or block_size % sub_block:
                raise UserError(f"sub_block must divide block_size={block_size}, got {sub_block}")
            if steps is not None:
                raise UserError("sub_block works with the threshold rule; do not combine it with steps")
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
        # tests observe the committed state after every forward: on_step(cache, committed ids)
        self.on_step: Callable | None = None
        self.last_block_steps: list[int] = []
        # compiled mode: the block steps (B or 2B tokens at a block-aligned offset) are fixed shapes;
        # the first forward (prompt blocks + block) and the no-cache setting stay eager
        self.runner = steps_for(model, model, compile if block_cache else "off")
        self._local = {}

    def options(self) -> dict:
        return {"block_size": self.B, "mask_token_id": self.mask_id, "threshold": self.threshold,
                "steps": self.steps, "remasking": self.remasking, "sub_block": self.sub_block,
                "block_cache": self.block_cache, "token_shift": self.token_shift, "compile": self.runner.compiled}

    # ------------------------------------------------------------------------- one forward

    def _forward(self, fed: torch.Tensor, rows: slice, n_commit: int = 0) -> torch.Tensor:
        """Run `fed` [n] right after the P committed tokens and return the logits of fed rows
        `rows`. Fed token i sits at absolute position P + i under the block-causal mask. The first
        `n_commit` fed tokens are final: their KV stays in the cache (the rest is evicted) and they
        join the committed prefix. Without the cache the committed prefix is recomputed."""
        P, n = self._P, fed.shape[0]
        if self.block_cache and self._nfe > 0 and P % self.B == 0:  # a block step: fixed shape
            if n not in self._local:
                self._local[n] = block_causal(n, self.B, 0, self.model.device)  # == the step mask at aligned P
            pos = torch.arange(P, P + n, device=self.model.device)
            out = self.runner(fed[None], pos, cache=self._cache_live, local_mask=self._local[n],
                              logits_index=rows).logits[0]
            self._cache_live.crop(P + n_commit)
        elif self.block_cache:
            mask = block_diffusion_step(P, n, self.B, self.model.device)
            out = self.model(fed[None], mask=mask, cache=self._cache_live, logits_index=rows).logits[0]
            self._cache_live.crop(P + n_commit)
        else:
            ids = torch.cat([self._ids[:P], fed])
            mask = block_causal(P + n, self.B, device=self.model.device)
            out = self.model(ids[None], mask=mask, logits_index=slice(P + rows.start, P + rows.stop)).logits[0]
        out[:, self.mask_id] = float("-inf")  # the mask token is never an output
        self._ids[P : P + n_commit] = fed[:n_commit]
        self._P += n_commit
        self._nfe += 1
        self._fed.append(n)
        return out

    # ------------------------------------------------------------------------- generate

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
        prompt = list(prompt_ids)
        if not prompt:
            raise UserError("block diffusion needs a non-empty prompt")
        B, dev = self.B, self.model.device
        run = DecodeRun(dev, config, self.tokenizer, self.runner)
        stats, stop, sp, gen = run.stats, run.stop, run.sp, run.gen
        rgen = torch.Generator(device=dev).manual_seed(sp.seed if sp.seed is not None else 0)
        L = len(prompt)
        base = (L // B) * B  # prompt's full blocks: the first committed blocks
        total = L + config.max_new_tokens + 3 * B
        self._ids = torch.empty(total, dtype=torch.long, device=dev)
        self._cache_live = self.cache_for(total) if self.block_cache else None
        self._P, self._nfe, self._fed = 0, 0, []
        self.last_block_steps = []
        prompt_t = torch.tensor(prompt, dtype=torch.long, device=dev)

        pending = prompt_t[:base]  # tokens to commit in the next forward
        head = prompt[base:]  # known tokens at the start of the current block
        finalised = []  # per forward: generated tokens it finalised
        emit_from = L - base  # block positions before this are prompt or already given to `stop`
        done = False
        if self.token_shift and not head:  # AR step: the prompt's last output gives the first token
            logits = self._forward(pending, slice(base - 1, base), n_commit=base)
            pending = pending[:0]
            head = [int(self._pick(logits, sp, gen)[0][0])]
            finalised.append(1)
            run.prefill_done()
            self._notify()
            done, emit_from = stop.extend(head), 1
        while not done:
            block = torch.full((B,), self.mask_id, dtype=torch.long, device=dev)
            block[: len(head)] = torch.tensor(head, dtype=torch.long, device=dev)
            known = [i < len(head) for i in range(B)]
            emitted = emit_from  # block positions already given to the stop checker
            block_steps, step = 0, 0
            while not all(known) and not done:
                fed = torch.cat([pending, block])
                p = pending.shape[0]
                logits = self._forward(fed, slice(p, p + B), n_commit=p)
                if self.token_shift:  # output j-1 predicts position j (row 0 unused: always known)
                    logits = torch.cat([logits[:1], logits[:-1]])
                pending = pending[:0]
                idx = self._unmask(logits, block, known, step, sp, gen, rgen)
                step += 1
                block_steps += 1
                finalised.append(len(idx))
                if self._nfe == 1:
                    run.prefill_done()
                self._notify()
                first_unknown = known.index(False) if not all(known) else B
                if first_unknown > emitted:
                    done = stop.extend(block[emitted:first_unknown].tolist())
                    emitted = first_unknown
            if done:
                self.last_block_steps.append(block_steps)
                break
            if self.token_shift:  # commit the block; its last output is the next block's head (AR step)
                logits = self._forward(block, slice(B - 1, B), n_commit=B)
                head = [int(self._pick(logits, sp, gen)[0][0])]
                finalised.append(1)
                block_steps += 1
                self._notify()
                done, emit_from = stop.extend(head), 1
            else:
                pending, head, emit_from = block, [], 0
            self.last_block_steps.append(block_steps)
        stats.nfe = self._nfe
        stats.tokens_fed = list(self._fed)
        stats.accepted_lengths = finalised
        return run.finish()

    def _notify(self) -> None:
        if self.on_step is not None:
            self.on_step(self._cache_live, self._ids[: self._P].tolist())

    # ------------------------------------------------------------------------- unmasking rule

    @staticmethod
    def _pick(logits: torch.Tensor, sp, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """Token per row (argmax when greedy, else a sample) and its probability (the confidence)."""
        if sp.greedy:
            probs = logits.softmax(-1)
            tokens = probs.argmax(-1)
        else:
            probs = warp_probs(logits, sp)
            tokens = sample(probs, gen)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)

    def _unmask(self, logits, block, known: list[bool], step: int, sp, gen, rgen) -> list[int]:
        """Finalise some masked positions of `block` in place (and in `known`); returns them."""
        B = self.B
        eligible = [not k for k in known]
        if self.sub_block is not None:  # only the leftmost unfinished sub-block
            s = (known.index(False) // self.sub_block) * self.sub_block
            eligible = [e and s <= i < s + self.sub_block for i, e in enumerate(eligible)]
        elig = torch.tensor(eligible, device=block.device)
        tokens, conf = self._pick(logits, sp, gen)
        if self.steps is not None:
            u = math.ceil(sum(eligible) / (self.steps - step))
            if self.remasking == "random":
                score = torch.rand(B, generator=rgen, device=block.device)
            else:
                score = conf
            idx = score.masked_fill(~elig, -1.0).topk(u).indices
        else:
            conf = conf.masked_fill(~elig, -1.0)
            chosen = conf >= self.threshold
            chosen[conf.argmax()] = True
            idx = chosen.nonzero().flatten()
        block[idx] = tokens[idx]
        out = idx.tolist()
        for i in out:
            known[i] = True
        return out


# ----------------------------------------------------------------------------- construction


def _is_fast_dllm(path: Path) -> bool:
    cfg = path / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == FAST_DLLM_MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def _load_fast_dllm(ctx: DecoderContext):
    """Load a Fast_dLLM_Qwen checkpoint as qwen2: a temporary directory holds the patched
    config.json and links to the weight files, read by the ordinary loader."""
    from tidar_bench.model import load_model

    src = Path(ctx.model_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    with tempfile.TemporaryDirectory(prefix="fast_dllm_") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        for f in src.iterdir():
            if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
                try:
                    (Path(tmp) / f.name).symlink_to(f.resolve())
                except OSError:
                    shutil.copy(f, Path(tmp) / f.name)
        return load_model(tmp, ctx.dtype, ctx.device), cfg


@register_decoder("bd", help="block diffusion (BD3-LM / Fast-dLLM v2): parallel denoising of B-token blocks "
                  "over a block-causal KV cache (options: block_size, threshold, steps, remasking, sub_block, "
                  "block_cache, token_shift)")
def build(ctx: DecoderContext, *, block_size: int | None = None, threshold: float = 0.9, steps: int | None = None,
          remasking: str = "low_confidence", sub_block: int | None = None, block_cache: bool = True,
          token_shift: bool | None = None, compile: str = "auto") -> BlockDiffusionDecoder:
    path = Path(ctx.model_path)
    if BDConfig.exists(path):
        cfg = BDConfig.load(path)
        model = ctx.model
    elif _is_fast_dllm(path):
        model, raw = _load_fast_dllm(ctx)
        ctx.model = model  # share with other decoders built from this context
        cfg = BDConfig(mask_token_id=FAST_DLLM_MASK_ID, block_size=int(raw.get("bd_size", 32)), token_shift=True)
        if sub_block is None and steps is None and (block_size or cfg.block_size) % FAST_DLLM_SUB_BLOCK == 0:
            sub_block = FAST_DLLM_SUB_BLOCK
    else:
        cfg = BDConfig.load(path)  # raises the "not a block-diffusion checkpoint" error
    return BlockDiffusionDecoder(
        model, ctx.tokenizer, mask_token_id=cfg.mask_token_id,
        block_size=block_size if block_size is not None else cfg.block_size,
        threshold=threshold, steps=steps, remasking=remasking, sub_block=sub_block, block_cache=block_cache,
        token_shift=cfg.token_shift if token_shift is None else token_shift, compile=compile)
