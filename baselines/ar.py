"""Autoregressive decoding over the model core: one token per forward, static KV cache.

The reference every other decoder is measured against: its greedy tokens are the ones lossless
decoders must reproduce, and its tokens/s is the denominator of every speedup. With `compile=on`
(the default where torch.compile works: `auto`) it is gpt-fast's decode loop: the 1-token step is
one compiled graph over the static cache (CUDA graphs on GPU), the position lives on the device and
is advanced there, and on CUDA the next step is launched before the previous token is read back, so
the host never waits for the GPU inside the loop (the one extra step after a stop is evicted)."""

from __future__ import annotations

from typing import Sequence

import torch

from tidar_bench.compiled import steps_for
from tidar_bench.decoding import CachedDecoder, DecodeRun, GenerationConfig, Generation, next_token
from tidar_bench.registry import DecoderContext, register_decoder


class ARDecoder(CachedDecoder):
    name = "ar"
    lossless = True

    def __init__(self, model, tokenizer=None, *, compile: str = "off"):
        self.model = model
        self.tokenizer = tokenizer
        self.steps = steps_for(model, model, compile)  # sampling: the step returns logits
        # greedy: the step returns the next token itself (argmax inside the compiled graph, as in
        # gpt-fast's decode_one_token), so the loop runs no eager op per token but the host copy
        self.greedy_steps = steps_for(model, self._greedy_forward, compile)

    def options(self) -> dict:
        return {"compile": self.steps.compiled}

    def _greedy_forward(self, tok, pos, mask=None, cache=None, start=None, kv_len=None):
        return self.model(tok, pos, mask=mask, cache=cache, start=start, kv_len=kv_len).logits[0, -1].argmax(-1).view(1, 1)

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
        model, dev = self.model, self.model.device
        run = DecodeRun(dev, config, self.tokenizer, self.steps, self.greedy_steps)
        stats, sp = run.stats, run.sp
        cache = self.cache_for(len(prompt_ids) + config.max_new_tokens + 2)
        ids = torch.tensor([list(prompt_ids)], device=dev)
        logits = model(ids, cache=cache, logits_index=slice(-1, None)).logits[0, -1]
        stats.nfe, stats.tokens_fed = 1, [ids.shape[1]]
        tok = next_token(logits, sp, run.gen).view(1, 1)
        run.prefill_done()
        pos = torch.tensor([cache.length], device=dev)  # position == cache slot of the fed token
        ahead = dev.type == "cuda"  # launch step i+1 before reading token i back
        host = torch.empty(1, dtype=torch.long, pin_memory=ahead)
        copied = torch.cuda.Event() if ahead else None
        while True:
            host.copy_(tok.view(1), non_blocking=ahead)
            if ahead:
                copied.record()
                nxt = self._step(tok, pos, cache, sp, run)
                copied.synchronize()  # waits for the copy only, not for the step just launched
            if run.stop.extend([int(host[0])]):
                if ahead:  # the step launched ahead fed a token that is not kept
                    cache.crop(cache.length - 1)
                break
            if not ahead:
                nxt = self._step(tok, pos, cache, sp, run)
            tok = nxt
            stats.nfe += 1
            stats.tokens_fed.append(1)
            stats.accepted_lengths.append(1)
        return run.finish()

    def _step(self, tok: torch.Tensor, pos: torch.Tensor, cache, sp, run) -> torch.Tensor:
        if sp.greedy:
            nxt = self.greedy_steps(tok, pos, cache=cache, start=pos)
        else:
            nxt = next_token(self.steps(tok, pos, cache=cache, start=pos).logits[0, -1], sp, run.gen).view(1, 1)
        pos += 1
        return nxt


@register_decoder("ar", help="autoregressive, one token per forward (our model core, static KV cache; "
                             "compile=auto|on|off: gpt-fast style compiled step)")
def build(ctx: DecoderContext, *, compile: str = "auto") -> ARDecoder:
    return ARDecoder(ctx.model, ctx.tokenizer, compile=compile)
