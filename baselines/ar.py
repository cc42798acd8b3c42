"""Autoregressive decoding over the model core: one token per forward, static KV cache.

The reference every other decoder is measured against: its greedy tokens are the ones lossless
decoders must reproduce, and its tokens/s is the denominator of every speedup."""

from __future__ import annotations

from typing import Sequence

import torch

from tidar_bench.decoding import (DecodeStats, GenerationConfig, Generation, StopChecker, Timer,
                                  make_generator, next_token)
from tidar_bench.registry import DecoderContext, register_decoder


class ARDecoder:
    name = "ar"
    lossless = True

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        self._cache = None

    def options(self) -> dict:
        return {}

    def cache_for(self, needed: int):
        self._cache = self.model.new_cache(needed, reuse=self._cache)
        return self._cache

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
        model, sp = self.model, config.sampling
        timer = Timer(model.device)
        t0 = timer.now()
        stats = DecodeStats()
        stop = StopChecker(config, self.tokenizer)
        gen = make_generator(sp, model.device)
        cache = self.cache_for(len(prompt_ids) + config.max_new_tokens + 1)
        ids = torch.tensor([list(prompt_ids)], device=model.device)
        logits = model(ids, cache=cache, logits_index=slice(-1, None)).logits[0, -1]
        stats.nfe, stats.tokens_fed = 1, [ids.shape[1]]
        while True:
            tok = next_token(logits, sp, gen)
            if stats.nfe == 1:
                stats.prefill_time_s = timer.now() - t0
            if stop.extend([int(tok)]):
                break
            logits = model(tok.view(1, 1), cache=cache).logits[0, -1]
            stats.nfe += 1
            stats.tokens_fed.append(1)
            stats.accepted_lengths.append(1)
        stats.wall_time_s = timer.now() - t0
        return stop.result(stats)


@register_decoder("ar", help="autoregressive, one token per forward (our model core, static KV cache)")
def build(ctx: DecoderContext) -> ARDecoder:
    return ARDecoder(ctx.model, ctx.tokenizer)
