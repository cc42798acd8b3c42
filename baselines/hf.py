"""Reference decoder: transformers' own `generate` on the same checkpoint.

Shows our model core and AR loop against the library on identical prompts: greedy tokens must
match `ar`, and tokens/s tells how much the library's generic path costs."""

from __future__ import annotations

from typing import Sequence

import torch

from tidar_bench.decoding import DecodeStats, GenerationConfig, Generation, StopChecker, Timer
from tidar_bench.model import resolve_device, resolve_dtype
from tidar_bench.registry import DecoderContext, register_decoder


class _Stop:
    """transformers StoppingCriteria that feeds each new token to our StopChecker, so stop strings,
    stop ids and max_new_tokens are applied by exactly the same rule as every other decoder."""

    def __init__(self, checker: StopChecker, prompt_len: int, timer: Timer, stats: DecodeStats, t0: float):
        self.checker, self.prompt_len, self.timer, self.stats, self.t0 = checker, prompt_len, timer, stats, t0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        if n_new == 1:
            self.stats.prefill_time_s = self.timer.now() - self.t0
        self.stats.nfe = n_new
        done = self.checker.extend([int(input_ids[0, -1])])
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class HFDecoder:
    name = "hf"
    lossless = True

    def __init__(self, model_path, device: str = "auto", dtype: str = "auto", tokenizer=None):
        from transformers import AutoModelForCausalLM

        dev = resolve_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        # stopping is ours alone (StopChecker via _Stop): the checkpoint's default eos must not cut in
        self.model.generation_config.eos_token_id = None
        self.tokenizer = tokenizer
        self.device = dev

    def options(self) -> dict:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
        from transformers import GenerationConfig as HFGenConfig, StoppingCriteriaList

        sp = config.sampling
        timer = Timer(self.device)
        t0 = timer.now()
        stats = DecodeStats()
        checker = StopChecker(config, self.tokenizer)
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        gc = HFGenConfig(max_new_tokens=config.max_new_tokens, do_sample=not sp.greedy,
                         temperature=sp.temperature if not sp.greedy else None,
                         top_k=sp.top_k if not sp.greedy else None,
                         top_p=sp.top_p if not sp.greedy else None,
                         eos_token_id=None, pad_token_id=0)
        if not sp.greedy and sp.seed is not None:
            torch.manual_seed(sp.seed)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                            stopping_criteria=StoppingCriteriaList([_Stop(checker, ids.shape[1], timer, stats, t0)]))
        stats.accepted_lengths = [1] * max(0, stats.nfe - 1)
        stats.tokens_fed = [ids.shape[1]] + [1] * max(0, stats.nfe - 1)
        stats.wall_time_s = timer.now() - t0
        return checker.result(stats)


@register_decoder("hf", help="transformers generate() on the same checkpoint (reference)")
def build(ctx: DecoderContext) -> HFDecoder:
    return HFDecoder(ctx.model_path, ctx.device, ctx.dtype, ctx.tokenizer)
