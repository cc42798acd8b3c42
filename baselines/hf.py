"""Reference decoder: transformers' own `generate` on the same checkpoint.

Shows our model core and AR loop against the library on identical prompts: greedy tokens must
match `ar`, and tokens/s tells how much the library's generic path costs. `compile=true` is the
best a transformers user gets: a `StaticCache` (sized like ours, reused between calls) and
transformers' own automatic `torch.compile` of the decode step (`CompileConfig`: CUDA graphs on GPU,
forced on CPU too); `hf(compile=false)` is the plain eager library path."""

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
        self.times: list[float] = []  # when each new token arrived

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        self.times.append(self.timer.now())
        if n_new == 1:
            self.stats.prefill_time_s = self.times[0] - self.t0
        self.stats.nfe = n_new
        done = self.checker.extend([int(input_ids[0, -1])])
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class HFDecoder:
    name = "hf"
    lossless = True

    def __init__(self, model_path, device: str = "auto", dtype: str = "auto", tokenizer=None, compile: str = "auto"):
        from transformers import AutoModelForCausalLM

        from tidar_bench.compiled import resolve

        dev = resolve_device(device)
        self.compiled = resolve(compile, dev)
        self._static_cache, self._static_size = None, 0
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        # stopping is ours alone (StopChecker via _Stop): the checkpoint's default eos must not cut in
        self.model.generation_config.eos_token_id = None
        self.tokenizer = tokenizer
        self.device = dev

    def options(self) -> dict:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "compile": self.compiled}

    def _compile_kwargs(self, needed: int) -> tuple[dict, bool]:
        """generate() kwargs for compiled mode: our own StaticCache (power-of-two size like the
        model core's, reused, so a new prompt length is not a new graph) + CompileConfig. Returns
        (kwargs, whether this call compiles a new cache size)."""
        from transformers import CompileConfig, StaticCache

        new = self._static_cache is None or self._static_size < needed
        if new:
            self._static_size = max(256, 1 << (needed - 1).bit_length())
            self._static_cache = StaticCache(config=self.model.config, max_cache_len=self._static_size)
        else:
            self._static_cache.reset()
        cc = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if self.device.type == "cuda" else "default")
        cc._compile_all_devices = True  # transformers compiles on GPUs only unless told
        return {"cache": self._static_cache, "compile_config": cc}, new

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
        extra, compiles = self._compile_kwargs(ids.shape[1] + config.max_new_tokens + 1) if self.compiled else ({}, False)
        if "compile_config" in extra:
            gc.compile_config = extra.pop("compile_config")
        stop = _Stop(checker, ids.shape[1], timer, stats, t0)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                            stopping_criteria=StoppingCriteriaList([stop]), **extra)
        stats.accepted_lengths = [1] * max(0, stats.nfe - 1)
        stats.tokens_fed = [ids.shape[1]] + [1] * max(0, stats.nfe - 1)
        if compiles and len(stop.times) > 2:
            # the first decode step traced and compiled the graph: its excess over a typical step
            gaps = sorted(b - a for a, b in zip(stop.times[1:], stop.times[2:]))
            stats.compile_s = max(0.0, stop.times[1] - stop.times[0] - gaps[len(gaps) // 2])
        stats.wall_time_s = timer.now() - t0 - stats.compile_s
        return checker.result(stats)


@register_decoder("hf", help="transformers generate() on the same checkpoint (reference; compile=true: "
                             "StaticCache + transformers' torch.compile of the decode step)")
def build(ctx: DecoderContext, *, compile: str = "auto") -> HFDecoder:
    return HFDecoder(ctx.model_path, ctx.device, ctx.dtype, ctx.tokenizer, compile=compile)
